//! The protocol's choices, as pure functions over what a step read from etcd. A step in
//! [`crate::tx`], [`crate::reaper`] or [`crate::repair`] reads (at one revision), hands
//! the plain records it read to one of these, and writes what it returns with the
//! compares it relies on. Nothing here talks to etcd, reads a clock or logs, so every
//! branch carries a unit test. The vote-counting rules underneath are [`crate::quorum`].
//!
//! - [`begin`]: who votes in a new transaction, and whether it may begin at all.
//! - [`vote`]: whether a voter's vote counts, and what it does next on its key.
//! - [`finalize`]: which keys abort, which count as committed, who is promoted and who
//!   is outdated, the new generation, and what the client may be told.
//! - [`race`]: which of the open transactions racing on one key must abort (all but
//!   the oldest).
//! - [`repair`]: what a claim marks, what a finished copy and a failed attempt
//!   record, and how long a failed job waits.
//! - [`verdict`]: GitLab's checks in a transaction: who runs them, what their verdict
//!   lets commit, and when a waiting voter fences the one that ran them.
//! - [`verify`]: which shards of the repositories a router's background verifier
//!   takes, and which replicas a quiet checksum comparison finds changed behind the
//!   cluster's back.
//!
//! It does not build etcd keys or compares: the callers do, from the same reads.

use crate::records::TxRecord;

pub mod begin;
pub mod finalize;
pub mod key;
pub mod race;
pub mod repair;
pub mod verdict;
pub mod verify;
pub mod vote;

/// Whether `voter`'s node, whose registration holds lease `now` (`None`: not
/// registered), still holds the lease it had when transaction `record` began. One that
/// does not has failed: it can vote and confirm no more, and nobody waits for it.
pub fn holds_lease(record: &TxRecord, voter: &str, now: Option<i64>) -> bool {
    now.is_some() && now == record.voter_leases.get(voter).copied()
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Records for the tests of the pure steps.

    use std::collections::{BTreeMap, BTreeSet};

    use crate::records::{Decision, ReplicaRecord, ReplicaState, RepoRecord, TxRecord};
    use crate::repo::RepoId;

    pub fn repo_id() -> RepoId {
        RepoId::new("default", "a.git").unwrap()
    }

    /// Transaction `t1` with voters `a`, `b`, `c` (leases 1, 2, 3) of three assigned
    /// replicas, begun at generation 7.
    pub fn record() -> TxRecord {
        TxRecord {
            id: "t1".into(),
            repo: repo_id(),
            voters: names(&["a", "b", "c"]),
            threshold: 2,
            assigned: 3,
            base_generation: 7,
            creator: "router1".into(),
            voter_leases: [("a", 1), ("b", 2), ("c", 3)]
                .into_iter()
                .map(|(v, l)| (v.to_owned(), l))
                .collect(),
            repo_create_revision: 10,
            designated: None,
        }
    }

    /// The repository of [`record`] at `generation`, assigned to `a`, `b`, `c`.
    pub fn repo(generation: u64) -> RepoRecord {
        RepoRecord {
            repo: repo_id(),
            assigned: names(&["a", "b", "c"]),
            replication_factor: 3,
            generation,
            creation_checksum: String::new(),
        }
    }

    pub fn replica(node: &str, state: ReplicaState, generation: u64) -> ReplicaRecord {
        ReplicaRecord {
            node: node.into(),
            generation,
            state,
            repair_epoch: 4,
            checksum: "old".into(),
            reason: String::new(),
        }
    }

    /// Every node of `nodes` up to date at `generation`.
    pub fn replicas(nodes: &[&str], generation: u64) -> BTreeMap<String, ReplicaRecord> {
        nodes
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    replica(n, ReplicaState::UpToDate, generation),
                )
            })
            .collect()
    }

    /// The leases of [`record`]'s voters' nodes, as when it began.
    pub fn leases() -> BTreeMap<String, i64> {
        record().voter_leases
    }

    pub fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    pub fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    pub fn abort(agreed: usize) -> Decision {
        crate::quorum::abort(agreed, 2, 3, "someone")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voter_holds_its_lease_only_while_its_node_is_registered_under_it() {
        let record = fixtures::record();
        assert!(holds_lease(&record, "a", Some(1)));
        assert!(!holds_lease(&record, "a", Some(5)), "registered again");
        assert!(!holds_lease(&record, "a", None), "not registered");
        assert!(!holds_lease(&record, "z", None), "not a voter");
        assert!(!holds_lease(&record, "z", Some(1)), "not a voter");
    }
}
