//! Who votes in a new transaction (DESIGN.md §2 steps 1-2), and whether it may begin.

use crate::error::{Error, Result};
use crate::records::TxRecord;
use crate::repository::RepoView;

/// Transaction `id`, created by `creator`, on the repository as `view` read it: the
/// voters are the up-to-date replicas whose node holds its lease (each with that lease,
/// so a node that registers again counts as failed), in placement order; the threshold
/// is a majority of the assigned replicas, whatever is alive. Refused while the
/// repository is locked ([`Error::Locked`]) or with fewer voters than threshold
/// ([`Error::NoQuorum`], saying how many are up and how many are needed).
pub fn transaction(view: &RepoView, id: &str, creator: &str) -> Result<TxRecord> {
    if let Some(lock) = &view.lock {
        return Err(crate::lock::locked_error(&view.record.repo, lock));
    }
    let voters = view.up_to_date_live();
    let threshold = view.record.threshold();
    if voters.len() < threshold {
        return Err(Error::NoQuorum {
            up: voters.len(),
            assigned: view.record.assigned.len(),
            needed: threshold,
        });
    }
    let voter_leases = voters
        .iter()
        .map(|v| (v.clone(), view.live_nodes[v].1.lease))
        .collect();
    Ok(TxRecord {
        id: id.to_owned(),
        repo: view.record.repo.clone(),
        voters,
        threshold,
        assigned: view.record.assigned.len(),
        base_generation: view.record.generation,
        creator: creator.to_owned(),
        voter_leases,
        repo_create_revision: view.record_entry.create_revision,
        designated: None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::fixtures::{names, replica, replicas, repo};
    use super::*;
    use crate::records::{LockRecord, NodeRecord, ReplicaState};
    use crate::store::{Entry, encode};

    fn entry(key: &str, value: Vec<u8>, lease: i64) -> Entry {
        Entry {
            key: key.into(),
            value,
            create_revision: 10,
            mod_revision: 20,
            lease,
        }
    }

    /// A repository at generation 7 on `a`, `b`, `c`, every replica up to date and
    /// every node live (leases 1, 2, 3).
    fn view() -> RepoView {
        let record = repo(7);
        let live_nodes: BTreeMap<_, _> = [("a", 1), ("b", 2), ("c", 3)]
            .into_iter()
            .map(|(n, lease)| {
                let node = NodeRecord {
                    name: n.into(),
                    address: String::new(),
                    storages: Vec::new(),
                    version: String::new(),
                    gitlab_api: false,
                    custom_hooks: false,
                    draining: false,
                };
                let e = entry(n, encode(&node), lease);
                (n.to_owned(), (node, e))
            })
            .collect();
        RepoView {
            revision: 30,
            record_entry: entry("repo", encode(&record), 0),
            record,
            replicas: replicas(&["a", "b", "c"], 7)
                .into_iter()
                .map(|(n, r)| {
                    let e = entry(&n, encode(&r), 0);
                    (n, (r, e))
                })
                .collect(),
            live_nodes,
            lock: None,
        }
    }

    #[test]
    fn every_up_to_date_live_replica_votes_with_its_lease() {
        let tx = transaction(&view(), "t9", "router1").unwrap();
        assert_eq!(tx.voters, names(&["a", "b", "c"]));
        assert_eq!((tx.threshold, tx.assigned, tx.base_generation), (2, 3, 7));
        assert_eq!(tx.voter_leases["b"], 2);
        assert_eq!((tx.id.as_str(), tx.creator.as_str()), ("t9", "router1"));
        assert_eq!(tx.repo_create_revision, 10);
    }

    #[test]
    fn a_draining_node_does_not_vote_in_a_new_transaction() {
        let mut v = view();
        v.live_nodes.get_mut("b").unwrap().0.draining = true;
        let tx = transaction(&v, "t9", "r").unwrap();
        assert_eq!(tx.voters, names(&["a", "c"]));
        assert_eq!(tx.threshold, 2);
        v.live_nodes.get_mut("c").unwrap().0.draining = true;
        let err = transaction(&v, "t9", "r").unwrap_err();
        assert!(matches!(err, Error::NoQuorum { up: 1, .. }), "{err}");
    }

    #[test]
    fn replicas_behind_or_on_dead_nodes_do_not_vote_and_the_threshold_stays() {
        let mut v = view();
        v.replicas.get_mut("a").unwrap().0 = replica("a", ReplicaState::UpToDate, 6);
        v.live_nodes.remove("c");
        let err = transaction(&v, "t9", "r").unwrap_err();
        assert!(
            matches!(
                err,
                Error::NoQuorum {
                    up: 1,
                    assigned: 3,
                    needed: 2
                }
            ),
            "{err}"
        );
        let mut v = view();
        v.replicas.get_mut("c").unwrap().0 = replica("c", ReplicaState::Repairing, 7);
        v.replicas.remove("a");
        let err = transaction(&v, "t9", "r").unwrap_err();
        assert!(matches!(err, Error::NoQuorum { up: 1, .. }), "{err}");
        let mut v = view();
        v.replicas.get_mut("c").unwrap().0 = replica("c", ReplicaState::Outdated, 7);
        let tx = transaction(&v, "t9", "r").unwrap();
        assert_eq!(tx.voters, names(&["a", "b"]), "two of three are enough");
        assert_eq!(tx.threshold, 2);
    }

    #[test]
    fn a_locked_repository_takes_no_transaction() {
        let mut v = view();
        let lock = LockRecord {
            holder: "router2".into(),
            operation: "repair".into(),
            since_unix_ms: 0,
        };
        v.lock = Some(entry("lock", encode(&lock), 5));
        let err = transaction(&v, "t9", "r").unwrap_err().to_string();
        assert!(err.contains("locked by repair (router2)"), "{err}");
    }
}
