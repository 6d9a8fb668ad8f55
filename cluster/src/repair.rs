//! The etcd side of repair (DESIGN.md §4): listing the repair jobs, claiming one under
//! the worker's lease, the plan read before the copy, and the one fenced txn that
//! declares the copy up to date. Running the copy itself (a node RPC) is the worker's
//! business; this module only guarantees that a copy made from an older state can
//! never be recorded as current.

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

use crate::decide::repair::{claimed, copied, failed_attempt, unmarked};
use crate::error::{Error, Result};
use crate::lock::RepoLock;
use crate::records::{JobRecord, ReplicaRecord, now_unix_ms};
use crate::repo::RepoId;
use crate::repository::RepoView;
use crate::store::{Entry, Store, by_tail, encode, get_op, get_prefix_op, ranges};

pub use crate::decide::repair::backoff;

/// A job as listed, with who works on it right now.
#[derive(Debug, Clone)]
pub struct RepairJob {
    pub job: JobRecord,
    pub entry: Entry,
    /// The claim's value (the worker's id), if one is held.
    pub claimed_by: Option<String>,
    /// The create revision of the target node's current registration, if it has one.
    pub node_registered: Option<i64>,
}

impl RepairJob {
    /// Whether a worker should try the job now: its back-off is over, or its node
    /// registered again after the last failure (a node back from a crash is repaired
    /// at once, not when a back-off grown while it was down runs out).
    pub fn is_due(&self, now_unix_ms: u64) -> bool {
        self.job.not_before_unix_ms <= now_unix_ms
            || self
                .node_registered
                .is_some_and(|rev| rev > self.entry.mod_revision)
    }
}

/// A claim this worker holds on one job.
#[derive(Debug, Clone)]
pub struct Claim {
    pub repo: RepoId,
    pub node: String,
    /// The claim key's create revision.
    pub revision: i64,
}

/// What a repair relies on, read at one revision before the copy starts.
#[derive(Debug, Clone)]
pub struct RepairPlan {
    pub view: RepoView,
    /// The job's entry (`None`: it was finished or dropped meanwhile).
    pub job: Option<Entry>,
    /// The target replica's record, if it still has one.
    pub target: Option<(ReplicaRecord, Entry)>,
}

impl RepairPlan {
    /// The repository generation the copy will be recorded at.
    pub fn generation(&self) -> u64 {
        self.view.record.generation
    }

    /// Up-to-date replicas on live nodes other than `target`, in placement order.
    pub fn sources(&self, target: &str) -> Vec<String> {
        self.view
            .up_to_date_live()
            .into_iter()
            .filter(|n| n != target)
            .collect()
    }
}

/// How a finished attempt was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The replica is up to date at the plan's generation; the job is gone.
    Done,
    /// Something the plan relied on changed (a write advanced the generation, the job
    /// or the replica changed, the claim or lock was lost): nothing was written.
    Moved,
}

impl Store {
    /// Every repair job, with its claim if one is held, read at one revision.
    pub async fn repair_jobs(&self) -> Result<Vec<RepairJob>> {
        let keys = self.keys();
        let resp = self
            .txn(Txn::new().and_then([
                get_prefix_op(&keys.repair_jobs()),
                get_prefix_op(&keys.repair_claims()),
                get_prefix_op(&keys.nodes()),
            ]))
            .await?;
        let r = ranges(&resp);
        let claims = by_tail(&r[1], &keys.repair_claims());
        let nodes = by_tail(&r[2], &keys.nodes());
        let mut out = Vec::new();
        for (tail, entry) in by_tail(&r[0], &keys.repair_jobs()) {
            let job: JobRecord = entry.decode()?;
            out.push(RepairJob {
                claimed_by: claims
                    .get(&tail)
                    .map(|c| String::from_utf8_lossy(&c.value).into_owned()),
                node_registered: nodes.get(&job.node).map(|e| e.create_revision),
                job,
                entry,
            });
        }
        Ok(out)
    }

    /// Claims `job` for `holder` under `lease` (create-only, so one worker at a time;
    /// a dead worker's claim lapses with its lease) and marks the replica `repairing`.
    /// `plan` must be read before; its target entry is updated to the marked record.
    /// `None`: someone else holds it, or the job or replica changed since.
    pub async fn claim_repair(
        &self,
        job: &RepairJob,
        plan: &mut RepairPlan,
        holder: &str,
        lease: i64,
    ) -> Result<Option<Claim>> {
        let keys = self.keys();
        let (repo, node) = (&job.job.repo, &job.job.node);
        let key = keys.repair_claim(repo, node);
        let mut cmp = vec![
            Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            Compare::mod_revision(
                keys.repair_job(repo, node),
                CompareOp::Equal,
                job.entry.mod_revision,
            ),
        ];
        let mut ops = vec![TxnOp::put(
            key.as_str(),
            holder.as_bytes(),
            Some(PutOptions::new().with_lease(lease)),
        )];
        if let Some((replica, entry)) = &plan.target
            && let Some(marked) = claimed(replica)
        {
            cmp.push(Compare::mod_revision(
                keys.replica(repo, node),
                CompareOp::Equal,
                entry.mod_revision,
            ));
            ops.push(TxnOp::put(keys.replica(repo, node), encode(&marked), None));
        }
        ops.push(get_op(&key));
        ops.push(get_op(&keys.replica(repo, node)));
        let resp = self.txn(Txn::new().when(cmp).and_then(ops)).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        let r = ranges(&resp);
        let revision = r[0].first().map(|e| e.create_revision).unwrap_or(0);
        if let Some(e) = r[1].first() {
            plan.target = Some((e.decode()?, e.clone()));
        }
        Ok(Some(Claim {
            repo: repo.clone(),
            node: node.clone(),
            revision,
        }))
    }

    /// Gives a claim up (after a failure was recorded, or when there was nothing to do).
    pub async fn release_claim(&self, claim: &Claim) -> Result<()> {
        let key = self.keys().repair_claim(&claim.repo, &claim.node);
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                claim.revision,
            )])
            .and_then([TxnOp::delete(key, None)]);
        self.txn(txn).await?;
        Ok(())
    }

    /// Reads what a repair of `node`'s replica relies on, linearizably, before the copy
    /// starts: the copy then holds at least everything up to the plan's generation.
    pub async fn repair_plan(&self, repo: &RepoId, node: &str) -> Result<RepairPlan> {
        let keys = self.keys();
        let (view, extra) = self
            .repo_view_with(repo, vec![get_op(&keys.repair_job(repo, node))])
            .await?;
        let target = view.replicas.get(node).cloned();
        Ok(RepairPlan {
            job: extra[0].first().cloned(),
            target,
            view,
        })
    }

    /// Records the copy made after `plan` as up to date at the plan's generation, with
    /// `checksum`, and removes the job — in one txn that compares the repository record
    /// (so no write finalized since the plan), the job, the target's record, the claim,
    /// and the lock (absent, or `lock` when the repair holds it).
    pub async fn finish_repair(
        &self,
        plan: &RepairPlan,
        claim: &Claim,
        checksum: &str,
        lock: Option<&RepoLock>,
    ) -> Result<Finish> {
        let keys = self.keys();
        let repo = &claim.repo;
        let node = &claim.node;
        // A plan that found no job (finished or dropped meanwhile) or no target record
        // has nothing to record, nor anything to compare.
        let (Some(job), Some((target, replica_entry))) = (&plan.job, &plan.target) else {
            return Ok(Finish::Moved);
        };
        let mut cmp = vec![
            Compare::mod_revision(
                keys.repo(repo),
                CompareOp::Equal,
                plan.view.record_entry.mod_revision,
            ),
            Compare::mod_revision(
                keys.repair_job(repo, node),
                CompareOp::Equal,
                job.mod_revision,
            ),
            Compare::mod_revision(
                keys.replica(repo, node),
                CompareOp::Equal,
                replica_entry.mod_revision,
            ),
            Compare::create_revision(
                keys.repair_claim(repo, node),
                CompareOp::Equal,
                claim.revision,
            ),
        ];
        cmp.push(match lock {
            Some(l) => l.held(self),
            None => Compare::create_revision(keys.lock(repo), CompareOp::Equal, 0),
        });
        // No transaction of the repository is open: one is, it began without this
        // replica (it was not up to date), and its finalize would mark the replica
        // outdated again at once ("missed transaction"). Under the lock, drained, this
        // holds by itself.
        cmp.push(Compare::create_revision(keys.txrepo(repo), CompareOp::Equal, 0).with_prefix());
        let record = copied(Some(target), node, plan.generation(), checksum);
        let txn = Txn::new().when(cmp).and_then([
            TxnOp::put(keys.replica(repo, node), encode(&record), None),
            TxnOp::delete(keys.repair_job(repo, node), None),
            TxnOp::delete(keys.repair_claim(repo, node), None),
        ]);
        if self.txn(txn).await?.succeeded() {
            tracing::info!(%repo, node, generation = plan.generation(), "replica repaired");
            Ok(Finish::Done)
        } else {
            Ok(Finish::Moved)
        }
    }

    /// Removes a job that has nothing left to do (the replica is up to date, or no
    /// longer exists), if it is still the one in `plan`.
    pub async fn drop_job(&self, plan: &RepairPlan, claim: &Claim) -> Result<bool> {
        let keys = self.keys();
        let Some(job) = &plan.job else {
            return Ok(true);
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                keys.repair_job(&claim.repo, &claim.node),
                CompareOp::Equal,
                job.mod_revision,
            )])
            .and_then([
                TxnOp::delete(keys.repair_job(&claim.repo, &claim.node), None),
                TxnOp::delete(keys.repair_claim(&claim.repo, &claim.node), None),
            ]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// A replica left `repairing` by a failed attempt goes back to `outdated`, with why.
    async fn unmark_repairing(&self, claim: &Claim, error: &str) -> Result<()> {
        let key = self.keys().replica(&claim.repo, &claim.node);
        for _ in 0..8 {
            let Some(entry) = self.get(&key).await? else {
                return Ok(());
            };
            let replica: ReplicaRecord = entry.decode()?;
            let Some(replica) = unmarked(&replica, error) else {
                return Ok(());
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    entry.mod_revision,
                )])
                .and_then([TxnOp::put(key.as_str(), encode(&replica), None)]);
            if self.txn(txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(Error::Contention(8))
    }

    /// Removes a job whose repository is no longer registered, if it is still the one
    /// listed.
    pub async fn drop_orphan_job(&self, job: &RepairJob) -> Result<bool> {
        let keys = self.keys();
        let key = keys.repair_job(&job.job.repo, &job.job.node);
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.as_str(), CompareOp::Equal, job.entry.mod_revision),
                Compare::create_revision(keys.repo(&job.job.repo), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::delete(key, None)]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// Counts a failed attempt on the job (attempts, last error, time) and sets its
    /// back-off ([`backoff`]), then releases the claim.
    pub async fn fail_repair(&self, claim: &Claim, error: &str) -> Result<()> {
        let keys = self.keys();
        let key = keys.repair_job(&claim.repo, &claim.node);
        for _ in 0..8 {
            let Some(entry) = self.get(&key).await? else {
                break;
            };
            let job: JobRecord = entry.decode()?;
            let job = failed_attempt(&job, error, now_unix_ms());
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    entry.mod_revision,
                )])
                .and_then([TxnOp::put(key.as_str(), encode(&job), None)]);
            if self.txn(txn).await?.succeeded() {
                tracing::warn!(repo = %claim.repo, node = %claim.node, attempts = job.attempts, error, "repair failed");
                self.unmark_repairing(claim, error).await?;
                return self.release_claim(claim).await;
            }
        }
        self.release_claim(claim).await?;
        Err(Error::Contention(8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_due_after_its_backoff_or_once_its_node_registered_again() {
        let mut job = JobRecord::new(
            RepoId::new("default", "a.git").unwrap(),
            "node2".into(),
            3,
            "missed a write".into(),
        );
        job.attempts = 5;
        job.not_before_unix_ms = 10_000;
        let entry = Entry {
            key: "jobs/repair/default/a.git/node2".into(),
            value: Vec::new(),
            create_revision: 40,
            mod_revision: 50,
            lease: 0,
        };
        let at = |node_registered| RepairJob {
            job: job.clone(),
            entry: entry.clone(),
            claimed_by: None,
            node_registered,
        };
        assert!(!at(None).is_due(9_999), "down, backing off");
        assert!(!at(Some(30)).is_due(9_999), "registered before the failure");
        assert!(at(Some(51)).is_due(9_999), "registered again after it");
        assert!(at(None).is_due(10_000), "back-off over");
    }
}
