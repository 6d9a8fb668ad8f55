//! Changing a repository's replica set under its write lock (DESIGN.md §4): adding and
//! removing replicas, recording synchronized copies, removing the repository. Every
//! change is one etcd txn that compares the lock's create revision (the fencing token)
//! and the repository record as read under the lock.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};

use crate::decide::repair::copied;
use crate::error::{Error, Result};
use crate::lock::RepoLock;
use crate::records::RepoRecord;
use crate::repository::RepoView;
use crate::store::{Store, by_tail, encode, get_prefix_op, ranges};

/// One fenced change of a repository's replicas.
#[derive(Debug, Clone, Default)]
pub struct ReplicaChange {
    /// The new assigned set (placement order); `None` keeps it.
    pub assigned: Option<Vec<String>>,
    /// Replicas recorded up to date at the view's generation, with their checksums.
    pub current: BTreeMap<String, String>,
    /// Replicas whose records (and repair jobs) go.
    pub removed: Vec<String>,
}

impl Store {
    /// Applies `change` to the repository as `view` read it, under `lock`. `false`:
    /// the repository changed since `view`, or the lock was lost; nothing written.
    pub async fn change_replicas(
        &self,
        lock: &RepoLock,
        view: &RepoView,
        change: &ReplicaChange,
    ) -> Result<bool> {
        let keys = self.keys();
        let repo = &view.record.repo;
        let mut cmp = vec![
            lock.held(self),
            Compare::mod_revision(
                keys.repo(repo),
                CompareOp::Equal,
                view.record_entry.mod_revision,
            ),
        ];
        let mut ops = Vec::new();
        if let Some(assigned) = &change.assigned {
            let unique: BTreeSet<&String> = assigned.iter().collect();
            if unique.len() != assigned.len() || assigned.is_empty() {
                return Err(Error::Invalid(
                    "a repository needs at least one replica, one per node".into(),
                ));
            }
            let record = RepoRecord {
                assigned: assigned.clone(),
                replication_factor: assigned.len() as u32,
                ..view.record.clone()
            };
            ops.push(TxnOp::put(keys.repo(repo), encode(&record), None));
        }
        for (node, checksum) in &change.current {
            let previous = view.replicas.get(node);
            cmp.push(match previous {
                Some((_, e)) => Compare::mod_revision(
                    keys.replica(repo, node),
                    CompareOp::Equal,
                    e.mod_revision,
                ),
                None => Compare::create_revision(keys.replica(repo, node), CompareOp::Equal, 0),
            });
            let previous = previous.map(|(r, _)| r);
            let record = copied(previous, node, view.record.generation, checksum);
            ops.push(TxnOp::put(keys.replica(repo, node), encode(&record), None));
            ops.push(TxnOp::delete(keys.repair_job(repo, node), None));
        }
        for node in &change.removed {
            ops.push(TxnOp::delete(keys.replica(repo, node), None));
            ops.push(TxnOp::delete(keys.repair_job(repo, node), None));
            ops.push(TxnOp::delete(keys.repair_claim(repo, node), None));
        }
        Ok(self
            .txn(Txn::new().when(cmp).and_then(ops))
            .await?
            .succeeded())
    }

    /// Deletes the repository's records (registration, replicas, repair jobs and
    /// claims) as `view` read them, under `lock`; the lock itself stays until the
    /// caller releases it. `false`: something changed, nothing deleted.
    pub async fn remove_repository_records(
        &self,
        lock: &RepoLock,
        view: &RepoView,
    ) -> Result<bool> {
        let keys = self.keys();
        let repo = &view.record.repo;
        let prefix = || Some(DeleteOptions::new().with_prefix());
        let txn = Txn::new()
            .when([
                lock.held(self),
                Compare::mod_revision(
                    keys.repo(repo),
                    CompareOp::Equal,
                    view.record_entry.mod_revision,
                ),
            ])
            .and_then([
                TxnOp::delete(keys.repo(repo), None),
                TxnOp::delete(keys.replicas(repo), prefix()),
                TxnOp::delete(keys.repair_jobs_of(repo), prefix()),
                TxnOp::delete(keys.repair_claims_of(repo), prefix()),
            ]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// `count` live nodes without a replica of the repository in `view`, the least
    /// loaded first (ties by name).
    pub async fn place_more(&self, view: &RepoView, count: usize) -> Result<Vec<String>> {
        let keys = self.keys();
        let resp = self
            .txn(Txn::new().and_then([get_prefix_op(&keys.repos())]))
            .await?;
        let mut load: BTreeMap<String, usize> = view
            .live_nodes
            .keys()
            .filter(|n| !view.record.assigned.contains(*n))
            .map(|n| (n.clone(), 0))
            .collect();
        for (_, e) in by_tail(&ranges(&resp)[0], &keys.repos()) {
            let record: RepoRecord = e.decode()?;
            for node in &record.assigned {
                if let Some(n) = load.get_mut(node) {
                    *n += 1;
                }
            }
        }
        crate::repository::place(&load, count).map_err(|e| match e {
            Error::TooFewNodes { live, .. } => Error::Invalid(format!(
                "only {live} live nodes hold no replica of {} yet, {count} needed",
                view.record.repo
            )),
            e => e,
        })
    }
}
