//! What operators read about the cluster, shared by `votingctl` (its `--json`) and the
//! router's ops web (its `/api/…`), so the two can never describe the same thing with
//! different fields: a repository's replicas summarized from its records
//! ([`summarize`]), and an etcd member or a lease holder (a node, a router) as listed.
//! Pure: it reads nothing itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::records::{ReplicaRecord, ReplicaState, RepoRecord};

/// An etcd member as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub client_urls: Vec<String>,
    pub leader: bool,
}

/// A registration held on a lease: a node or a router.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub name: String,
    pub address: String,
    /// The lease the registration hangs on (hex), and the seconds it has left.
    pub lease: String,
    pub ttl_secs: i64,
}

/// One replica as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RepoId;

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
