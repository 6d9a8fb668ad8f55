//! `repos list` and `dataloss`: every repository's replicas as etcd records them,
//! read at one revision.

use std::collections::BTreeMap;

use etcd_client::Txn;
use refvote_cluster::RepoId;
use refvote_cluster::records::{ReplicaRecord, RepoRecord};
use refvote_cluster::store::{by_tail, get_prefix_op, ranges};
pub use refvote_cluster::summary::{ReplicaSummary, RepoSummary, state_name, summarize};

use crate::connect::{Ctl, etcd_error, table};

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
