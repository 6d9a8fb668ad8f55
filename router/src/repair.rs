//! The repair worker every router runs (DESIGN.md §4). It lists the repair jobs in
//! etcd, claims one under the router's lease, reads the repository's generation
//! linearizably, has the outdated node copy the repository from an up-to-date replica
//! on a live node (`ReplicateRepository`) unless it already holds the repository's
//! generation (its checksum is the one recorded for it: then no copy, and no source, is
//! needed), and records the replica up to date only if that
//! generation is still the repository's (one fenced etcd txn, see
//! [`refvote_cluster::repair`]). When writes keep moving the generation, the last try
//! takes the repository's write lock for a bounded time, drains its open transactions
//! and copies once more. Failures are counted on the job, with back-off. Recording a
//! failure and releasing the claim and the lock are retried until etcd takes them (or
//! the router's lease, which they are bound to, is gone).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use refvote_cluster::Store;
use refvote_cluster::decide::repair::holds_generation;
use refvote_cluster::lock::RepoLock;
use refvote_cluster::records::now_unix_ms;
use refvote_cluster::repair::{Claim, Finish, RepairJob, RepairPlan};
use tokio::sync::watch;

use crate::nodes::{NodeError, checksum, replicate};
use crate::pool::Pool;

#[derive(Debug, Clone)]
pub struct RepairConfig {
    /// This router's id: the claims' and locks' holder.
    pub id: String,
    pub interval: Duration,
    pub concurrency: usize,
    /// Tries without the lock before the repair takes it.
    pub unlocked_tries: u32,
    /// How long the locked try waits for open transactions to finish.
    pub drain_wait: Duration,
    /// Bound on one copy (the node's ReplicateRepository) without the lock.
    pub copy_timeout: Duration,
    /// Bound on the locked try's copy: writes wait for it.
    pub locked_copy_timeout: Duration,
}

impl RepairConfig {
    pub fn new(id: String, interval: Duration, concurrency: usize) -> RepairConfig {
        RepairConfig {
            id,
            interval,
            concurrency,
            unlocked_tries: 3,
            drain_wait: Duration::from_secs(5),
            copy_timeout: Duration::from_secs(600),
            locked_copy_timeout: Duration::from_secs(30),
        }
    }
}

/// Why one repair attempt did not finish; recorded on the job.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RepairError {
    #[error("no up-to-date replica on a live node to copy from")]
    NoSource,
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("etcd: {0}")]
    Etcd(#[from] refvote_cluster::Error),
    #[error("writes kept moving the repository even under its lock")]
    MovedUnderLock,
}

/// Runs until the task is dropped.
pub async fn run(
    store: Store,
    pool: Arc<Pool>,
    lease: watch::Receiver<Option<i64>>,
    config: RepairConfig,
) {
    let worker = Arc::new(Worker {
        store,
        pool,
        config,
        running: Mutex::new(HashSet::new()),
        lease: lease.clone(),
    });
    loop {
        let current = *lease.borrow();
        if let Some(lease) = current {
            match worker.store.repair_jobs().await {
                Ok(jobs) => worker.start_jobs(jobs, lease),
                Err(e) => tracing::debug!(error = %e, "cannot list repair jobs"),
            }
        }
        // The next look at the jobs: after the interval, or at once when etcd answers
        // again after an outage or the router holds a new lease.
        let mut lease_changed = lease.clone();
        tokio::select! {
            _ = worker.store.pause(worker.config.interval) => {}
            _ = lease_changed.changed() => {}
        }
    }
}

struct Worker {
    store: Store,
    pool: Arc<Pool>,
    config: RepairConfig,
    /// Jobs this router works on (`<repo>/<node>`).
    running: Mutex<HashSet<String>>,
    /// The router's current lease: claims and locks are bound to it.
    lease: watch::Receiver<Option<i64>>,
}

/// Most tries of one clean-up write (with back-off up to 0.5 s, cut short when etcd
/// answers again: at least 5 minutes).
const CLEANUP_TRIES: u32 = 600;

impl Worker {
    fn start_jobs(self: &Arc<Self>, jobs: Vec<RepairJob>, lease: i64) {
        let now = now_unix_ms();
        for job in jobs {
            if job.claimed_by.is_some() || !job.is_due(now) {
                continue;
            }
            let name = format!("{}/{}", job.job.repo, job.job.node);
            {
                let mut running = self.running.lock().expect("running set");
                if running.len() >= self.config.concurrency || !running.insert(name.clone()) {
                    continue;
                }
            }
            let me = self.clone();
            tokio::spawn(async move {
                me.repair(&job, lease).await;
                me.running.lock().expect("running set").remove(&name);
            });
        }
    }

    #[tracing::instrument(skip_all, fields(repo = %job.job.repo, node = %job.job.node))]
    async fn repair(&self, job: &RepairJob, lease: i64) {
        let (repo, node) = (&job.job.repo, &job.job.node);
        // Read first: a job whose node is down stays unclaimed and uncounted.
        let mut plan = match self.store.repair_plan(repo, node).await {
            Ok(p) => p,
            Err(refvote_cluster::Error::UnknownRepo(_)) => {
                if let Ok(true) = self.store.drop_orphan_job(job).await {
                    tracing::info!("dropped the repair job of a repository no longer registered");
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot plan the repair");
                return;
            }
        };
        if plan.view.lock.is_some() || !plan.view.live_nodes.contains_key(node) {
            return;
        }
        let claim = match self
            .store
            .claim_repair(job, &mut plan, &self.config.id, lease)
            .await
        {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cannot claim the repair job");
                return;
            }
        };
        let started = std::time::Instant::now();
        match self.attempts(plan, &claim, lease).await {
            Ok(()) => {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "repair finished"
                )
            }
            Err(e) => {
                let text = e.to_string();
                self.until_done("record the failed repair", lease, || {
                    self.store.fail_repair(&claim, &text)
                })
                .await;
            }
        }
        self.until_done("release the repair's claim", lease, || {
            self.store.release_claim(&claim)
        })
        .await;
    }

    /// Retries `op`, an etcd write that records or releases what this repair holds
    /// (safe to repeat), with back-off until it lands, or until the router no longer
    /// holds `lease`: the claim and the lock are bound to it and went with it. Giving up
    /// after one failure (etcd without a leader for a moment) left the claim, and the
    /// lock, held for as long as the router lived: no router took the job again and
    /// every write was refused as "locked by repair".
    async fn until_done<F, Fut>(&self, what: &str, lease: i64, mut op: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), refvote_cluster::Error>>,
    {
        let mut wait = Duration::from_millis(100);
        for attempt in 0..CLEANUP_TRIES {
            match op().await {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(attempts = attempt + 1, "did {what} after retrying");
                    }
                    return true;
                }
                Err(e) if attempt == 0 => {
                    tracing::warn!(error = %e, "cannot {what} yet; retrying until etcd answers")
                }
                Err(e) => tracing::debug!(error = %e, attempt, "cannot {what} yet"),
            }
            if self.lease.borrow().is_some_and(|now| now != lease) {
                tracing::info!("the router's lease changed; what the repair held went with it");
                return false;
            }
            self.store.pause(wait).await;
            wait = (wait * 2).min(Duration::from_millis(500));
        }
        tracing::warn!("gave up trying to {what}; it lapses with the router's lease");
        false
    }

    /// Unlocked tries, then one under the repository's lock.
    async fn attempts(
        &self,
        mut plan: RepairPlan,
        claim: &Claim,
        lease: i64,
    ) -> Result<(), RepairError> {
        for i in 0..self.config.unlocked_tries {
            if i > 0 {
                plan = self.store.repair_plan(&claim.repo, &claim.node).await?;
            }
            if self.nothing_to_do(&plan, claim).await? {
                return Ok(());
            }
            let checksum = match self.copy(&plan, claim, self.config.copy_timeout).await {
                Err(e @ RepairError::Node(NodeError::Overtaken { .. })) => {
                    tracing::info!(try_ = i + 1, error = %e, "the copy was overtaken by writes; again");
                    continue;
                }
                other => other?,
            };
            match self
                .store
                .finish_repair(&plan, claim, &checksum, None)
                .await?
            {
                Finish::Done => return Ok(()),
                Finish::Moved => {
                    tracing::info!(try_ = i + 1, "the repository moved during the copy; again")
                }
            }
        }
        let lock = self
            .store
            .lock_repo(&claim.repo, &self.config.id, "repair", lease)
            .await?;
        let result = self.locked_attempt(claim, &lock).await;
        self.until_done("release the repair's lock", lease, || {
            self.store.unlock(&lock)
        })
        .await;
        result
    }

    async fn locked_attempt(&self, claim: &Claim, lock: &RepoLock) -> Result<(), RepairError> {
        self.store
            .drain(&claim.repo, self.config.drain_wait)
            .await?;
        let plan = self.store.repair_plan(&claim.repo, &claim.node).await?;
        if self.nothing_to_do(&plan, claim).await? {
            return Ok(());
        }
        let checksum = self
            .copy(&plan, claim, self.config.locked_copy_timeout)
            .await?;
        match self
            .store
            .finish_repair(&plan, claim, &checksum, Some(lock))
            .await?
        {
            Finish::Done => Ok(()),
            Finish::Moved => Err(RepairError::MovedUnderLock),
        }
    }

    /// The job is stale (the replica is up to date, or gone): drop it.
    async fn nothing_to_do(&self, plan: &RepairPlan, claim: &Claim) -> Result<bool, RepairError> {
        let stale = match &plan.target {
            None => true,
            Some((replica, _)) => replica.is_up_to_date(&plan.view.record),
        };
        if stale || plan.job.is_none() {
            self.store.drop_job(plan, claim).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The target's checksum when it already holds the plan's generation
    /// ([`holds_generation`]): nothing to copy, and none needed from a source (there
    /// may be none).
    async fn holds_generation(
        &self,
        plan: &RepairPlan,
        claim: &Claim,
    ) -> Result<Option<String>, RepairError> {
        let Some((target, _)) = &plan.target else {
            return Ok(None);
        };
        if target.generation != plan.generation() || target.checksum.is_empty() {
            return Ok(None);
        }
        let live = checksum(
            &self.pool,
            &plan.view,
            &claim.node,
            &claim.repo.relative_path,
        )
        .await?;
        if !holds_generation(target, plan.generation(), &live) {
            return Ok(None);
        }
        tracing::info!(
            generation = plan.generation(),
            "the replica holds the repository's generation already; recording it without a copy"
        );
        Ok(Some(live))
    }

    /// Has the target copy the repository from an up-to-date source; returns the
    /// target's checksum after the copy.
    async fn copy(
        &self,
        plan: &RepairPlan,
        claim: &Claim,
        timeout: Duration,
    ) -> Result<String, RepairError> {
        if let Some(live) = self.holds_generation(plan, claim).await? {
            return Ok(live);
        }
        let sources = plan.sources(&claim.node);
        if sources.is_empty() {
            return Err(RepairError::NoSource);
        }
        // Spread repairs over the sources.
        let source = &sources[(claim.revision as usize) % sources.len()];
        replicate(
            &self.pool,
            &plan.view,
            source,
            &claim.node,
            &claim.repo.relative_path,
            timeout,
        )
        .await?;
        checksum(
            &self.pool,
            &plan.view,
            &claim.node,
            &claim.repo.relative_path,
        )
        .await
        .map_err(RepairError::from)
    }
}
