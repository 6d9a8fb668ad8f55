//! `repos list` and `dataloss`: every repository's replicas as etcd records them,
//! read at one revision.

use std::collections::BTreeMap;

use etcd_client::Txn;
use refvote_cluster::RepoId;
use refvote_cluster::records::{ReplicaRecord, ReplicaState, RepoRecord};
use refvote_cluster::store::{by_tail, get_prefix_op, ranges};
use serde::Serialize;

use crate::connect::{Ctl, etcd_error, table};

/// One replica as listed.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaSummary {
    pub node: String,
    /// `up_to_date`, `outdated`, `repairing`, or `missing` (assigned, no record).
    pub state: String,
    pub generation: u64,
    /// Recorded up to date at the repository's generation.
    pub up_to_date: bool,
    /// Its node holds its etcd lease.
    pub live: bool,
    pub reason: String,
}

/// One repository as listed.
#[derive(Debug, Clone, Serialize)]
pub struct RepoSummary {
    pub repo: String,
    pub generation: u64,
    pub replication_factor: u32,
    /// Replicas a write needs.
    pub threshold: usize,
    pub up_to_date: usize,
    /// Up to date and on a live node: the replicas that can vote and serve reads.
    pub available: usize,
    pub outdated: usize,
    pub repairing: usize,
    /// No up-to-date replica on a live node: reads and writes fail.
    pub dataloss: bool,
    pub replicas: Vec<ReplicaSummary>,
}

/// Every repository, with its replicas, read at one revision.
pub async fn snapshot(ctl: &Ctl) -> anyhow::Result<Vec<RepoSummary>> {
    let keys = ctl.store.keys();
    let replicas_prefix = format!("{}replicas/", keys.prefix());
    let resp = ctl
        .store
        .txn(Txn::new().and_then([
            get_prefix_op(&keys.repos()),
            get_prefix_op(&replicas_prefix),
            get_prefix_op(&keys.nodes()),
        ]))
        .await
        .map_err(etcd_error)?;
    let r = ranges(&resp);
    let live = by_tail(&r[2], &keys.nodes());
    let mut replicas: BTreeMap<String, BTreeMap<String, ReplicaRecord>> = BTreeMap::new();
    for (tail, e) in by_tail(&r[1], &replicas_prefix) {
        // tail = <storage>/<encoded path>/<node>
        if let Some((repo, node)) = tail.rsplit_once('/') {
            replicas
                .entry(repo.to_owned())
                .or_default()
                .insert(node.to_owned(), e.decode()?);
        }
    }
    let mut out = Vec::new();
    for (tail, e) in by_tail(&r[0], &keys.repos()) {
        let record: RepoRecord = e.decode()?;
        let segment = RepoId::from_key_segment(&tail)
            .map(|r| r.key_segment())
            .unwrap_or(tail);
        let recs = replicas.remove(&segment).unwrap_or_default();
        out.push(summarize(&record, &recs, |n| live.contains_key(n)));
    }
    Ok(out)
}

pub fn summarize(
    record: &RepoRecord,
    replicas: &BTreeMap<String, ReplicaRecord>,
    live: impl Fn(&str) -> bool,
) -> RepoSummary {
    let mut list = Vec::new();
    for node in &record.assigned {
        let s = match replicas.get(node) {
            Some(r) => ReplicaSummary {
                node: node.clone(),
                state: state_name(r.state).into(),
                generation: r.generation,
                up_to_date: r.is_up_to_date(record),
                live: live(node),
                reason: r.reason.clone(),
            },
            None => ReplicaSummary {
                node: node.clone(),
                state: "missing".into(),
                generation: 0,
                up_to_date: false,
                live: live(node),
                reason: "assigned but has no replica record".into(),
            },
        };
        list.push(s);
    }
    let count = |f: &dyn Fn(&ReplicaSummary) -> bool| list.iter().filter(|r| f(r)).count();
    let available = count(&|r| r.up_to_date && r.live);
    RepoSummary {
        repo: record.repo.to_string(),
        generation: record.generation,
        replication_factor: record.replication_factor,
        threshold: record.threshold(),
        up_to_date: count(&|r| r.up_to_date),
        available,
        outdated: count(&|r| !r.up_to_date && r.state != "repairing"),
        repairing: count(&|r| r.state == "repairing"),
        dataloss: available == 0,
        replicas: list,
    }
}

pub fn state_name(s: ReplicaState) -> &'static str {
    match s {
        ReplicaState::UpToDate => "up_to_date",
        ReplicaState::Outdated => "outdated",
        ReplicaState::Repairing => "repairing",
    }
}

fn replica_cell(r: &ReplicaSummary) -> String {
    let state = if r.up_to_date {
        "ok"
    } else if r.state == "up_to_date" {
        "behind"
    } else {
        r.state.as_str()
    };
    format!(
        "{}:{}@{}{}",
        r.node,
        state,
        r.generation,
        if r.live { "" } else { "(down)" }
    )
}

/// `votingctl repos list`.
pub async fn list(ctl: &Ctl) -> anyhow::Result<i32> {
    let repos = snapshot(ctl).await?;
    ctl.print(&repos, || {
        if repos.is_empty() {
            return "no repositories are registered\n".into();
        }
        let rows: Vec<Vec<String>> = repos
            .iter()
            .map(|r| {
                vec![
                    r.repo.clone(),
                    r.generation.to_string(),
                    format!("{}/{}", r.available, r.replication_factor),
                    r.outdated.to_string(),
                    r.repairing.to_string(),
                    r.replicas
                        .iter()
                        .map(replica_cell)
                        .collect::<Vec<_>>()
                        .join(" "),
                ]
            })
            .collect();
        table(
            &[
                "REPOSITORY",
                "GENERATION",
                "AVAILABLE",
                "OUTDATED",
                "REPAIRING",
                "REPLICAS (node:state@generation)",
            ],
            &rows,
        )
    });
    Ok(0)
}

/// `votingctl dataloss`: exit 0 when no repository lost all its up-to-date replicas,
/// 1 when some did (they are listed).
pub async fn dataloss(ctl: &Ctl) -> anyhow::Result<i32> {
    let lost: Vec<RepoSummary> = snapshot(ctl)
        .await?
        .into_iter()
        .filter(|r| r.dataloss)
        .collect();
    ctl.print(&lost, || {
        if lost.is_empty() {
            return "no data loss: every repository has an up-to-date replica on a live node\n"
                .into();
        }
        let rows: Vec<Vec<String>> = lost
            .iter()
            .map(|r| {
                let up: Vec<&str> = r
                    .replicas
                    .iter()
                    .filter(|x| x.up_to_date)
                    .map(|x| x.node.as_str())
                    .collect();
                let live: Vec<&str> = r
                    .replicas
                    .iter()
                    .filter(|x| x.live)
                    .map(|x| x.node.as_str())
                    .collect();
                vec![
                    r.repo.clone(),
                    r.generation.to_string(),
                    if up.is_empty() {
                        "-".into()
                    } else {
                        up.join(",")
                    },
                    if live.is_empty() {
                        "-".into()
                    } else {
                        live.join(",")
                    },
                ]
            })
            .collect();
        let mut out = table(
            &[
                "REPOSITORY",
                "GENERATION",
                "UP-TO-DATE (down)",
                "LIVE REPLICAS (outdated)",
            ],
            &rows,
        );
        out.push_str(
            "Start a node that holds an up-to-date replica; or, if none will come back, \
             `votingctl accept-dataloss <repo> --authoritative <live node>` (writes the \
             newer ones lack are lost)\n",
        );
        out
    });
    Ok(if lost.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(node: &str, generation: u64, state: ReplicaState) -> (String, ReplicaRecord) {
        (
            node.to_owned(),
            ReplicaRecord {
                node: node.to_owned(),
                generation,
                state,
                repair_epoch: 0,
                checksum: String::new(),
                reason: String::new(),
            },
        )
    }

    fn record() -> RepoRecord {
        RepoRecord {
            repo: RepoId::new("default", "a.git").unwrap(),
            assigned: vec!["n1".into(), "n2".into(), "n3".into()],
            replication_factor: 3,
            generation: 5,
            creation_checksum: String::new(),
        }
    }

    #[test]
    fn counts_states_and_finds_data_loss() {
        let replicas: BTreeMap<_, _> = [
            replica("n1", 4, ReplicaState::UpToDate),
            replica("n2", 5, ReplicaState::UpToDate),
            replica("n3", 3, ReplicaState::Repairing),
        ]
        .into_iter()
        .collect();
        let s = summarize(&record(), &replicas, |n| n != "n2");
        // n1 says up to date but is behind the repository's generation.
        assert_eq!((s.up_to_date, s.available), (1, 0));
        assert_eq!((s.outdated, s.repairing), (1, 1));
        assert!(s.dataloss, "{s:?}");
        let s = summarize(&record(), &replicas, |_| true);
        assert_eq!(s.available, 1);
        assert!(!s.dataloss);
        // An assigned node without a record is listed as missing.
        let mut partial = replicas.clone();
        partial.remove("n3");
        let s = summarize(&record(), &partial, |_| true);
        assert_eq!(s.replicas[2].state, "missing");
        assert_eq!(s.outdated, 2);
    }
}
