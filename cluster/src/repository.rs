//! Repository and replica records: registration, the consistent view a transaction is
//! planned from, and marking a replica outdated.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::error::{Error, Result};
use crate::records::{JobRecord, NodeRecord, ReplicaRecord, ReplicaState, RepoRecord};
use crate::repo::RepoId;
use crate::store::{Entry, Store, by_tail, encode, get_op, get_prefix_op, ranges, revision};

/// A repository's records, all read at one etcd revision.
#[derive(Debug, Clone)]
pub struct RepoView {
    pub revision: i64,
    pub record: RepoRecord,
    pub record_entry: Entry,
    /// node → (record, entry) of every replica that has a record.
    pub replicas: BTreeMap<String, (ReplicaRecord, Entry)>,
    /// Nodes that hold their lease, with the entry (its lease id and revision).
    pub live_nodes: BTreeMap<String, (NodeRecord, Entry)>,
    /// The admin lock, if one is held.
    pub lock: Option<Entry>,
}

impl RepoView {
    /// Assigned replicas that are up to date and whose node holds its lease and is not
    /// draining, in placement order: the voters of a new transaction, and the replicas
    /// reads may use. A draining node finishes what it has but takes nothing new.
    pub fn up_to_date_live(&self) -> Vec<String> {
        self.record
            .assigned
            .iter()
            .filter(|n| {
                self.live_nodes
                    .get(*n)
                    .is_some_and(|(node, _)| !node.draining)
                    && self
                        .replicas
                        .get(*n)
                        .is_some_and(|(r, _)| r.is_up_to_date(&self.record))
            })
            .cloned()
            .collect()
    }
}

impl Store {
    /// Registers a new repository whose replicas on `assigned` all start up to date at
    /// generation 0. Fails if it exists (create-only compare).
    pub async fn create_repository(
        &self,
        repo: &RepoId,
        assigned: &[String],
        checksum: &str,
    ) -> Result<RepoRecord> {
        let (record, replicas) = new_repository(repo, assigned, checksum)?;
        let keys = self.keys();
        let mut ops = vec![TxnOp::put(keys.repo(repo), encode(&record), None)];
        for replica in &replicas {
            ops.push(TxnOp::put(
                keys.replica(repo, &replica.node),
                encode(replica),
                None,
            ));
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                keys.repo(repo),
                CompareOp::Equal,
                0,
            )])
            .and_then(ops);
        if self.txn(txn).await?.succeeded() {
            Ok(record)
        } else {
            Err(Error::RepoExists(repo.clone()))
        }
    }

    /// Chooses `factor` live nodes for a new repository: those holding the fewest
    /// repositories (per the `repos/` records), ties by name; never two replicas on one
    /// node, none on a draining node. Fewer such nodes than `factor` is
    /// [`Error::TooFewNodes`].
    pub async fn place(&self, factor: usize) -> Result<Vec<String>> {
        let keys = self.keys();
        let txn = Txn::new().and_then([get_prefix_op(&keys.repos()), get_prefix_op(&keys.nodes())]);
        let resp = self.txn(txn).await?;
        let r = ranges(&resp);
        let mut load = BTreeMap::new();
        for (n, e) in by_tail(&r[1], &keys.nodes()) {
            let node: NodeRecord = e.decode()?;
            if !node.draining {
                load.insert(n, 0usize);
            }
        }
        for e in &r[0] {
            let record: RepoRecord = e.decode()?;
            for node in &record.assigned {
                if let Some(n) = load.get_mut(node) {
                    *n += 1;
                }
            }
        }
        place(&load, factor)
    }

    /// Records a new repository's checksum in its `repos/` record, if the record is
    /// still the one created at `create_revision` and still at `generation` (no write
    /// landed since the checksum was taken). Returns whether it was recorded.
    pub async fn set_creation_checksum(
        &self,
        repo: &RepoId,
        create_revision: i64,
        generation: u64,
        checksum: &str,
    ) -> Result<bool> {
        let key = self.keys().repo(repo);
        for _ in 0..8 {
            let Some(entry) = self.get(&key).await? else {
                return Ok(false);
            };
            let mut record: RepoRecord = entry.decode()?;
            if entry.create_revision != create_revision || record.generation != generation {
                return Ok(false);
            }
            record.creation_checksum = checksum.to_owned();
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    entry.mod_revision,
                )])
                .and_then([TxnOp::put(key.as_str(), encode(&record), None)]);
            if self.txn(txn).await?.succeeded() {
                return Ok(true);
            }
        }
        Err(Error::Contention(8))
    }

    /// Removes a repository's registration and replica records, if its record is still
    /// the one created at `create_revision` (a failed creation undone).
    pub async fn unregister_repository(&self, repo: &RepoId, create_revision: i64) -> Result<bool> {
        let keys = self.keys();
        let txn = Txn::new()
            .when([Compare::create_revision(
                keys.repo(repo),
                CompareOp::Equal,
                create_revision,
            )])
            .and_then([
                TxnOp::delete(keys.repo(repo), None),
                TxnOp::delete(
                    keys.replicas(repo),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ),
                TxnOp::delete(
                    keys.repair_jobs_of(repo),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ),
            ]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// Reads the repository record, its replicas, the live nodes and the lock in one
    /// linearizable round trip.
    pub async fn repo_view(&self, repo: &RepoId) -> Result<RepoView> {
        let (view, _) = self.repo_view_with(repo, Vec::new()).await?;
        Ok(view)
    }

    /// [`Store::repo_view`] plus `extra` range reads made at the same revision; their
    /// results come back in order.
    pub async fn repo_view_with(
        &self,
        repo: &RepoId,
        extra: Vec<TxnOp>,
    ) -> Result<(RepoView, Vec<Vec<Entry>>)> {
        let keys = self.keys();
        let mut reads = vec![
            get_op(&keys.repo(repo)),
            get_prefix_op(&keys.replicas(repo)),
            get_prefix_op(&keys.nodes()),
            get_op(&keys.lock(repo)),
        ];
        reads.extend(extra);
        let resp = self.txn(Txn::new().and_then(reads)).await?;
        let rev = revision(&resp);
        let mut r = ranges(&resp);
        let rest = r.split_off(4);
        let record_entry = r[0]
            .first()
            .cloned()
            .ok_or_else(|| Error::UnknownRepo(repo.clone()))?;
        let record: RepoRecord = record_entry.decode()?;
        let mut replicas = BTreeMap::new();
        for (node, e) in by_tail(&r[1], &keys.replicas(repo)) {
            replicas.insert(node, (e.decode()?, e));
        }
        let mut live_nodes = BTreeMap::new();
        for (node, e) in by_tail(&r[2], &keys.nodes()) {
            live_nodes.insert(node, (e.decode()?, e));
        }
        let view = RepoView {
            revision: rev,
            record,
            record_entry,
            replicas,
            live_nodes,
            lock: r[3].first().cloned(),
        };
        Ok((view, rest))
    }

    /// Marks `node`'s replica of `repo` outdated (it knows it is behind) and queues its
    /// repair job. Keeps its generation; a no-op if it is already not up to date.
    pub async fn mark_outdated(&self, repo: &RepoId, node: &str, reason: &str) -> Result<()> {
        let key = self.keys().replica(repo, node);
        for _ in 0..16 {
            let Some(entry) = self.get(&key).await? else {
                return Ok(());
            };
            let replica: ReplicaRecord = entry.decode()?;
            if replica.state != ReplicaState::UpToDate {
                return Ok(());
            }
            let replica = replica.outdated(reason);
            let job = JobRecord::new(
                repo.clone(),
                node.to_owned(),
                replica.generation,
                reason.to_owned(),
            );
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    entry.mod_revision,
                )])
                .and_then([
                    TxnOp::put(key.as_str(), encode(&replica), None),
                    put_job_if_absent(self.keys(), &job),
                ]);
            if self.txn(txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(Error::Contention(16))
    }

    /// Marks `node`'s replica outdated and queues its repair because its data was found
    /// to differ (`votingctl verify`, the routers' background verifier), only if the
    /// repository record and the replica are still as in `view` (the checksums were
    /// taken after `view` was read), no transaction of the repository is open and no
    /// admin lock is held: a write in flight can never get a replica outdated this way.
    /// `false`: something moved; nothing written.
    pub async fn mark_outdated_if_unchanged(
        &self,
        view: &RepoView,
        node: &str,
        reason: &str,
    ) -> Result<bool> {
        let keys = self.keys();
        let repo = &view.record.repo;
        let Some((replica, entry)) = view.replicas.get(node) else {
            return Ok(false);
        };
        if !replica.is_up_to_date(&view.record) {
            return Ok(false);
        }
        let marked = ReplicaRecord {
            state: ReplicaState::Outdated,
            reason: reason.to_owned(),
            ..replica.clone()
        };
        let job = JobRecord::new(
            repo.clone(),
            node.to_owned(),
            replica.generation,
            reason.to_owned(),
        );
        let txn = Txn::new()
            .when([
                Compare::mod_revision(
                    keys.repo(repo),
                    CompareOp::Equal,
                    view.record_entry.mod_revision,
                ),
                Compare::mod_revision(
                    keys.replica(repo, node),
                    CompareOp::Equal,
                    entry.mod_revision,
                ),
                Compare::create_revision(keys.txrepo(repo), CompareOp::Equal, 0).with_prefix(),
                Compare::create_revision(keys.lock(repo), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(keys.replica(repo, node), encode(&marked), None),
                TxnOp::put(keys.repair_job(repo, node), encode(&job), None),
            ]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// Registers (or refreshes) a node under `lease`.
    pub async fn register_node(&self, node: &NodeRecord, lease: i64) -> Result<()> {
        let key = self.keys().node(&node.name);
        let value = encode(node);
        self.request(|mut c| {
            let opts = etcd_client::PutOptions::new().with_lease(lease);
            let (key, value) = (key.clone(), value.clone());
            async move { c.put(key, value, Some(opts)).await }
        })
        .await?;
        Ok(())
    }

    /// Registers (or refreshes) a router under `lease`; the value says where it listens.
    pub async fn register_router(&self, id: &str, address: &str, lease: i64) -> Result<()> {
        let key = self.keys().router(id);
        let value = address.as_bytes().to_vec();
        self.request(|mut c| {
            let opts = etcd_client::PutOptions::new().with_lease(lease);
            let (key, value) = (key.clone(), value.clone());
            async move { c.put(key, value, Some(opts)).await }
        })
        .await?;
        Ok(())
    }
}

/// Creates the repair job unless one exists: an existing job keeps its attempts and
/// back-off, and a worker's claim on it stays valid.
pub(crate) fn put_job_if_absent(keys: &crate::keys::Keys, job: &JobRecord) -> TxnOp {
    let key = keys.repair_job(&job.repo, &job.node);
    TxnOp::txn(
        Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), encode(job), None)]),
    )
}

/// The records of a new repository on `assigned` (placement order) whose replicas all
/// start up to date at generation 0 with the repository's `checksum`. Refused without
/// a replica, or with two on one node.
pub fn new_repository(
    repo: &RepoId,
    assigned: &[String],
    checksum: &str,
) -> Result<(RepoRecord, Vec<ReplicaRecord>)> {
    if assigned.is_empty() {
        return Err(Error::Invalid(
            "a repository needs at least one replica".into(),
        ));
    }
    let mut unique = assigned.to_vec();
    unique.sort();
    unique.dedup();
    if unique.len() != assigned.len() {
        return Err(Error::Invalid("two replicas may not share a node".into()));
    }
    let record = RepoRecord {
        repo: repo.clone(),
        assigned: assigned.to_vec(),
        replication_factor: assigned.len() as u32,
        generation: 0,
        creation_checksum: checksum.to_owned(),
    };
    let replicas = assigned
        .iter()
        .map(|node| ReplicaRecord {
            node: node.clone(),
            generation: 0,
            state: ReplicaState::UpToDate,
            repair_epoch: 0,
            checksum: checksum.to_owned(),
            reason: String::new(),
        })
        .collect();
    Ok((record, replicas))
}

/// The `factor` least loaded nodes of `load` (node → repositories it holds), ties by
/// name.
pub fn place(load: &BTreeMap<String, usize>, factor: usize) -> Result<Vec<String>> {
    if load.len() < factor {
        return Err(Error::TooFewNodes {
            live: load.len(),
            needed: factor,
        });
    }
    let mut nodes: Vec<(&String, &usize)> = load.iter().collect();
    nodes.sort_by(|a, b| a.1.cmp(b.1).then_with(|| a.0.cmp(b.0)));
    Ok(nodes
        .into_iter()
        .take(factor)
        .map(|(n, _)| n.clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_repository_starts_every_replica_up_to_date_at_generation_0() {
        let repo = RepoId::new("default", "a.git").unwrap();
        let nodes = ["n2".to_string(), "n1".to_string()];
        let (record, replicas) = new_repository(&repo, &nodes, "sum").unwrap();
        assert_eq!(record.assigned, nodes, "placement order kept");
        assert_eq!((record.replication_factor, record.generation), (2, 0));
        assert_eq!(record.creation_checksum, "sum");
        assert_eq!(replicas.len(), 2);
        for (r, node) in replicas.iter().zip(&nodes) {
            assert!(r.is_up_to_date(&record));
            assert_eq!(
                (&r.node, r.checksum.as_str(), r.repair_epoch),
                (node, "sum", 0)
            );
        }
        let e = new_repository(&repo, &[], "").unwrap_err().to_string();
        assert!(e.contains("at least one replica"), "{e}");
        let twice = ["n1".to_string(), "n2".to_string(), "n1".to_string()];
        let e = new_repository(&repo, &twice, "").unwrap_err().to_string();
        assert!(e.contains("may not share a node"), "{e}");
    }

    #[test]
    fn placement_takes_the_least_loaded_nodes_ties_by_name() {
        let load: BTreeMap<String, usize> = [("a", 2), ("b", 0), ("c", 1), ("d", 0)]
            .into_iter()
            .map(|(n, c)| (n.to_owned(), c))
            .collect();
        assert_eq!(place(&load, 3).unwrap(), ["b", "d", "c"]);
        let e = place(&load, 5).unwrap_err().to_string();
        assert!(e.contains("4 live") && e.contains("5 needed"), "{e}");
    }
}
