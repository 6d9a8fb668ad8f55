//! The background verifier every router runs (issue 17): it takes a share of the
//! repositories (shards claimed in etcd under its lease, so a dead router's share goes
//! to the others) and, at most `[verifier] rate` checksums a second, has each
//! up-to-date replica's node compute its checksum (Gitaly's `CalculateChecksum`) while
//! no transaction of the repository is open, and compares it with the checksum
//! recorded at the replica's last write. A replica that differs is marked outdated
//! with the fence `votingctl verify` uses ([`Store::mark_outdated_if_unchanged`]:
//! nothing moved, nothing open, no lock) and its repair job is queued; the routers'
//! repair worker copies it again.
//!
//! A comparison counts only if the repository was quiet throughout: no open
//! transaction and no admin lock before the checksums, and the same records and still
//! nothing open after them; otherwise it is retried a few times and then skipped until
//! the next pass. So a write in flight never gets a replica outdated.
//!
//! Progress (the pass, repositories looked at, the last full pass, mismatches found)
//! goes to `verifier/status/<router>` in etcd (the ops web and `votingctl status` read
//! it) and to the router's metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use refvote_cluster::decide::verify::{Judged, Sums, judge, rebalance, shard_of};
use refvote_cluster::records::now_unix_ms;
use refvote_cluster::verifier::VerifierStatus;
use refvote_cluster::{RepoId, Store};
use refvote_telemetry::metrics::{Counter, Gauge};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::pool::Pool;

/// The `[verifier]` section of the router's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerifierSettings {
    /// Run the background verifier. Default: true.
    #[serde(default = "defaults::enabled")]
    pub enabled: bool,
    /// A pass over this router's share of the repositories starts at most this often
    /// (a pass that takes longer is followed at once by the next). Default: 86400.
    #[serde(default = "defaults::interval_secs")]
    pub interval_secs: u64,
    /// Replica checksums computed per second, at most (each reads every ref of the
    /// replica on its node). Default: 5.
    #[serde(default = "defaults::rate")]
    pub rate: f64,
    /// Seconds after the router starts before its first pass. Default: 60.
    #[serde(default = "defaults::start_delay_secs")]
    pub start_delay_secs: u64,
}

mod defaults {
    pub fn enabled() -> bool {
        true
    }
    pub fn interval_secs() -> u64 {
        86_400
    }
    pub fn rate() -> f64 {
        5.0
    }
    pub fn start_delay_secs() -> u64 {
        60
    }
}

impl Default for VerifierSettings {
    fn default() -> VerifierSettings {
        VerifierSettings {
            enabled: defaults::enabled(),
            interval_secs: defaults::interval_secs(),
            rate: defaults::rate(),
            start_delay_secs: defaults::start_delay_secs(),
        }
    }
}

impl VerifierSettings {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.interval_secs == 0 {
            return Err(("verifier.interval_secs", "must be at least 1".into()));
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 10_000.0) {
            return Err((
                "verifier.rate",
                "must be a number of checksums per second above 0 and at most 10000".into(),
            ));
        }
        Ok(())
    }
}

pub static CHECKED: LazyLock<Counter> = LazyLock::new(Counter::default);
pub static MISMATCHES: LazyLock<Counter> = LazyLock::new(Counter::default);
pub static BUSY: LazyLock<Counter> = LazyLock::new(Counter::default);
pub static LAST_FULL_PASS: LazyLock<Gauge> = LazyLock::new(Gauge::default);
pub static PASS_DONE: LazyLock<Gauge> = LazyLock::new(Gauge::default);
pub static PASS_TOTAL: LazyLock<Gauge> = LazyLock::new(Gauge::default);

/// Repositories listed per etcd read.
const PAGE: usize = 1000;
/// Tries of one repository while writes keep it busy.
const QUIET_TRIES: u32 = 5;
/// Mismatches kept in the status record.
const RECENT: usize = 10;
/// How often the status record and the shard claims are refreshed during a pass.
const REFRESH: Duration = Duration::from_secs(2);

/// Runs until the task is dropped.
pub async fn run(
    store: Store,
    pool: Arc<Pool>,
    lease: watch::Receiver<Option<i64>>,
    id: String,
    settings: VerifierSettings,
) {
    if !settings.enabled {
        return;
    }
    let mut v = Verifier {
        store,
        pool,
        lease,
        status: VerifierStatus {
            router: id,
            ..VerifierStatus::default()
        },
        gap: Duration::from_secs_f64(1.0 / settings.rate),
        next_checksum: Instant::now(),
        refreshed: Instant::now(),
    };
    tokio::time::sleep(Duration::from_secs(settings.start_delay_secs)).await;
    let interval = Duration::from_secs(settings.interval_secs);
    loop {
        let started = Instant::now();
        v.pass().await;
        // The next pass one interval after this one began; claims and the status
        // stay fresh meanwhile.
        while started.elapsed() < interval {
            v.refresh().await;
            tokio::time::sleep(REFRESH.min(interval.saturating_sub(started.elapsed()))).await;
        }
    }
}

struct Verifier {
    store: Store,
    pool: Arc<Pool>,
    lease: watch::Receiver<Option<i64>>,
    status: VerifierStatus,
    /// Between two checksums, at least.
    gap: Duration,
    next_checksum: Instant,
    refreshed: Instant,
}

impl Verifier {
    /// Takes or gives back shards as the routers alive ask, and writes the status.
    async fn refresh(&mut self) {
        self.refreshed = Instant::now();
        let Some(lease) = *self.lease.borrow() else {
            return;
        };
        let me = self.status.router.clone();
        match self.store.verifier_claims().await {
            Ok((routers, mut held)) => {
                let plan = rebalance(&me, &routers, &held);
                for s in plan.release {
                    if self.store.release_shard(s, &me).await.is_ok() {
                        held.remove(&s);
                    }
                }
                for s in plan.claim {
                    if let Ok(true) = self.store.claim_shard(s, &me, lease).await {
                        held.insert(s, me.clone());
                    }
                }
                self.status.shards = held
                    .into_iter()
                    .filter(|(_, h)| *h == me)
                    .map(|(s, _)| s)
                    .collect();
            }
            Err(e) => tracing::debug!(error = %e, "verifier: cannot read the shard claims"),
        }
        PASS_DONE.set(self.status.pass_done as i64);
        PASS_TOTAL.set(self.status.pass_total as i64);
        if let Err(e) = self.store.put_verifier_status(&self.status, lease).await {
            tracing::debug!(error = %e, "verifier: cannot write its status");
        }
    }

    async fn pass(&mut self) {
        let began = Instant::now();
        self.refresh().await;
        self.status.pass += 1;
        self.status.pass_started_unix_ms = now_unix_ms();
        self.status.pass_done = 0;
        self.status.pass_total = 0;
        // The share, listed first (keys only, a page at a time), so progress has a total.
        let mut share = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = match self.store.repo_segments_page(after.as_deref(), PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "verifier: cannot list repositories; pass cut short");
                    return;
                }
            };
            let full = page.len() == PAGE;
            after = page.last().cloned();
            share.extend(
                page.into_iter()
                    .filter(|s| self.status.shards.contains(&shard_of(s))),
            );
            if !full {
                break;
            }
        }
        self.status.pass_total = share.len() as u64;
        for segment in share {
            if self.refreshed.elapsed() >= REFRESH {
                self.refresh().await;
            }
            // A shard given away meanwhile is the other router's now.
            if !self.status.shards.contains(&shard_of(&segment)) {
                self.status.pass_done += 1;
                continue;
            }
            if let Ok(repo) = RepoId::from_key_segment(&segment) {
                self.verify(&repo).await;
            }
            self.status.pass_done += 1;
        }
        self.status.last_full_pass_unix_ms = now_unix_ms();
        self.status.last_full_pass_ms = began.elapsed().as_millis() as u64;
        LAST_FULL_PASS.set((self.status.last_full_pass_unix_ms / 1000) as i64);
        self.refresh().await;
    }

    async fn pace(&mut self) {
        let now = Instant::now();
        if self.next_checksum > now {
            tokio::time::sleep(self.next_checksum - now).await;
        }
        self.next_checksum = Instant::now() + self.gap;
    }

    #[tracing::instrument(skip_all, fields(repo = %repo))]
    async fn verify(&mut self, repo: &RepoId) {
        for attempt in 0..QUIET_TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            match self.compare(repo).await {
                Ok(Some(())) => return,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "verifier: cannot read the repository");
                    return;
                }
            }
        }
        self.status.busy_skipped += 1;
        BUSY.inc();
    }

    /// One quiet comparison. `None`: the repository was not quiet throughout.
    async fn compare(&mut self, repo: &RepoId) -> refvote_cluster::Result<Option<()>> {
        let (view, open) = match self.store.quiet_view(repo).await {
            Ok(v) => v,
            // Removed since the listing.
            Err(refvote_cluster::Error::UnknownRepo(_)) => return Ok(Some(())),
            Err(e) => return Err(e),
        };
        if open > 0 || view.lock.is_some() {
            return Ok(None);
        }
        let relative = view.record.repo.relative_path.clone();
        let mut sums = BTreeMap::new();
        for node in view.up_to_date_live() {
            self.pace().await;
            let recorded = view.replicas[&node].0.checksum.clone();
            match crate::nodes::checksum(&self.pool, &view, &node, &relative).await {
                Ok(live) => {
                    sums.insert(node, Sums { recorded, live });
                }
                Err(e) => tracing::debug!(node = %node, error = %e, "verifier: no checksum"),
            }
        }
        let (after, open) = self.store.quiet_view(repo).await?;
        let same = after.record_entry.mod_revision == view.record_entry.mod_revision
            && after.lock.is_none()
            && view.replicas.iter().all(|(n, (_, e))| {
                after
                    .replicas
                    .get(n)
                    .is_some_and(|(_, a)| a.mod_revision == e.mod_revision)
            });
        if open > 0 || !same {
            return Ok(None);
        }
        self.status.replicas_checked += sums.len() as u64;
        CHECKED.add(sums.len() as u64);
        for (node, verdict) in judge(view.record.assigned.len(), &sums) {
            match verdict {
                Judged::Changed(why) => {
                    let reason = format!("{why} at generation {}", view.record.generation);
                    if !self
                        .store
                        .mark_outdated_if_unchanged(&view, &node, &reason)
                        .await?
                    {
                        // A write began meanwhile: compared again, later.
                        return Ok(None);
                    }
                    tracing::warn!(node = %node, reason = %reason, "verifier: replica changed behind the cluster's back; outdated, repair queued");
                    self.status.mismatches += 1;
                    MISMATCHES.inc();
                    self.status
                        .recent_mismatches
                        .insert(0, format!("{repo} {node} {}: {reason}", now_unix_ms()));
                    self.status.recent_mismatches.truncate(RECENT);
                }
                Judged::RecordSuspect => tracing::warn!(
                    node = %node,
                    "verifier: every replica differs identically from its recorded checksum; \
                     the records look wrong; nothing outdated (run `votingctl verify`)"
                ),
                Judged::Match | Judged::Unknown => {}
            }
        }
        Ok(Some(()))
    }
}
