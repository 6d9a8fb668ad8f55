//! The consumer: for each repository in the bucket that the config selects, apply its
//! sequences in order from the last one the target recorded, each downloaded, opened
//! (nothing reaches git before its chunk authenticates), verified and applied by the
//! [`Target`], then recorded — in that order, so a crash anywhere applies nothing
//! twice: a target already at a sequence's tip is only recorded.
//!
//! A repository stops at its first problem (a gap, a diverged target, an object that
//! does not authenticate); the others go on.

use std::path::Path;
use std::time::Instant;

use crate::catalog;
use crate::context::{self, Context};
use crate::error::SyncError;
use crate::fault;
use crate::manifest::Manifest;
use crate::plan::{self, Applied, Position, Stop};
use crate::refs::RefSet;
use crate::report::{Outcome, RepoReport, Role, Summary};
use crate::transfer;

/// Where sequences are applied: a git remote, or a refvote cluster (in `votingctl`).
/// The target also keeps the record of what it holds.
#[allow(async_fn_in_trait)]
pub trait Target {
    /// For messages: what and where the target is.
    fn describe(&self) -> String;

    /// The last sequence recorded as applied to `repository`.
    async fn applied(&self, repository: &str) -> Result<Option<Applied>, SyncError>;

    /// `repository`'s fingerprint on the target now; `None` if it does not exist there.
    async fn current(&self, repository: &str) -> Result<Option<String>, SyncError>;

    /// The fingerprint a repository holding exactly `refs` has on this target.
    fn fingerprint(&self, refs: &RefSet) -> String;

    /// Makes `repository` hold the refs of `manifest`, from the authenticated bundle
    /// at `bundle`, in one atomic step.
    async fn apply(
        &self,
        repository: &str,
        manifest: &Manifest,
        bundle: &Path,
    ) -> Result<(), SyncError>;

    /// Points `repository`'s HEAD where the source's pointed at `manifest`'s tip, when
    /// the target can set HEAD and it points elsewhere; after the refs landed (also
    /// when they were there already: a sequence that only moved HEAD changes no ref).
    async fn follow_head(&self, repository: &str, manifest: &Manifest) -> Result<(), SyncError>;

    /// Records that `repository` holds `applied` (after the apply only).
    async fn record(&self, repository: &str, applied: &Applied) -> Result<(), SyncError>;
}

/// Runs the consumer over the bucket's repositories (`only`, if not empty, narrows it).
pub async fn run<T: Target>(ctx: &Context, target: &T, only: &[String]) -> Summary {
    let started = Instant::now();
    let mut summary = Summary {
        role: Role::Consume,
        dry_run: ctx.dry_run,
        started_at: context::now(),
        seconds: 0.0,
        bytes: 0,
        repositories: Vec::new(),
        error: None,
        exit_code: 0,
    };
    let dirs = match ctx.bucket.list_dirs(ctx.layout.prefix()).await {
        Ok(d) => d,
        Err(e) => {
            let e = SyncError::from(e);
            summary.error = Some(e.to_string());
            summary.settle(Some(e.class()));
            return summary;
        }
    };
    let mut repositories: Vec<String> = dirs
        .iter()
        .filter_map(|d| ctx.layout.parse_repo_dir(d))
        .filter(|r| catalog::selects(&ctx.config.repositories, r))
        .filter(|r| only.is_empty() || only.contains(r))
        .collect();
    repositories.sort();
    for missing in only.iter().filter(|o| !repositories.contains(o)) {
        let e = SyncError::Target(format!(
            "{missing} has nothing in {} under this prefix, or the config's repository list does not select it",
            ctx.bucket.describe()
        ));
        summary.repositories.push(RepoReport::failed(missing, &e));
    }
    ctx.progress.set_total(repositories.len());
    for repository in &repositories {
        let t = Instant::now();
        let mut report = consume_repository(ctx, target, repository).await;
        report.seconds = t.elapsed().as_secs_f64();
        summary.bytes += report.bytes;
        ctx.progress.repository_done();
        ctx.progress.report(&report);
        summary.repositories.push(report);
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.settle(None);
    summary
}

async fn consume_repository<T: Target>(ctx: &Context, target: &T, repository: &str) -> RepoReport {
    let mut report = RepoReport::new(repository, Outcome::UpToDate);
    match consume_inner(ctx, target, repository, &mut report).await {
        Ok(()) => report,
        Err(e) => {
            tracing::warn!(repo = %repository, "{e}");
            let mut failed = RepoReport::failed(repository, &e);
            failed.sequence = report.sequence;
            failed.applied = report.applied;
            failed.bytes = report.bytes;
            failed.lag = report.lag;
            failed
        }
    }
}

async fn consume_inner<T: Target>(
    ctx: &Context,
    target: &T,
    repository: &str,
    report: &mut RepoReport,
) -> Result<(), SyncError> {
    ctx.progress.at(repository, "listing");
    let mut applied = target.applied(repository).await?;
    if applied.is_none() {
        applied = adopt(ctx, target, repository).await?;
    }
    // List from the applied sequence on (it stays in the listing, so a bucket that
    // lost it shows as one the target is ahead of).
    let offset = applied.as_ref().map(|a| {
        ctx.layout
            .manifest(repository, a.sequence.saturating_sub(1))
    });
    let listed = ctx.list_repository(repository, offset.as_deref()).await?;
    let latest = listed
        .listing
        .manifests
        .iter()
        .next_back()
        .copied()
        .max(applied.as_ref().map(|a| a.sequence));
    let plan = plan::sequences(applied.as_ref().map(|a| a.sequence), &listed.listing);
    report.sequence = applied.as_ref().map(|a| a.sequence);
    let lag = |applied: &Option<Applied>| {
        latest.map(|l| l.saturating_sub(applied.as_ref().map_or(0, |a| a.sequence)))
    };
    report.lag = lag(&applied);
    let mut planned = Vec::new();
    for sequence in plan.apply {
        let manifest = ctx.manifest(repository, sequence).await?;
        let tip = target.fingerprint(&manifest.refs);
        if ctx.dry_run {
            planned.push(format!(
                "{sequence} ({}, {})",
                manifest.kind(),
                crate::report::human_bytes(manifest.data_size)
            ));
            continue;
        }
        ctx.progress.at(repository, "checking the target");
        let current = target.current(repository).await?;
        match plan::position(
            sequence,
            manifest.kind(),
            &tip,
            current.as_deref(),
            applied.as_ref(),
        ) {
            Position::Diverged(reason) => return Err(SyncError::Diverged { sequence, reason }),
            Position::AtTip => {
                tracing::info!(repo = %repository, sequence, "the target already holds this sequence; recording it");
            }
            Position::Ready => {
                apply_one(ctx, target, repository, &manifest, report).await?;
            }
        }
        target.follow_head(repository, &manifest).await?;
        let now_applied = Applied {
            sequence,
            fingerprint: tip,
        };
        target.record(repository, &now_applied).await?;
        report.applied.push(sequence);
        report.sequence = Some(sequence);
        report.kind = Some(manifest.kind());
        applied = Some(now_applied);
        report.lag = lag(&applied);
    }
    if ctx.dry_run && !planned.is_empty() {
        report.outcome = Outcome::WouldSync;
        report.plan = Some(format!("apply sequences {}", planned.join(", ")));
    } else if !report.applied.is_empty() {
        report.outcome = Outcome::Applied;
    }
    match plan.stop {
        None => Ok(()),
        Some(Stop::Gap { missing, latest }) => Err(SyncError::Gap { missing, latest }),
        Some(Stop::Ahead { applied, latest }) => Err(SyncError::Ahead { applied, latest }),
    }
}

/// Downloads, opens and applies one sequence.
async fn apply_one<T: Target>(
    ctx: &Context,
    target: &T,
    repository: &str,
    manifest: &Manifest,
    report: &mut RepoReport,
) -> Result<(), SyncError> {
    let master = ctx.keys.get(&manifest.header.key_id)?;
    let bundle = ctx.temp_bundle()?;
    ctx.progress.at(repository, "downloading");
    let result = async {
        let plain = transfer::download_bundle(
            &ctx.bucket,
            &manifest.data_key,
            manifest.data_size,
            master,
            &bundle,
            ctx.progress.bytes(),
        )
        .await?;
        report.bytes += manifest.data_size;
        if plain != manifest.bundle_size {
            return Err(SyncError::Diverged {
                sequence: manifest.header.sequence,
                reason: format!(
                    "the bundle is {plain} bytes, its manifest says {}",
                    manifest.bundle_size
                ),
            });
        }
        ctx.progress.at(repository, "applying");
        target.apply(repository, manifest, &bundle).await?;
        fault::point(fault::AFTER_APPLY);
        Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&bundle);
    result
}

/// With no record on the target side (a new consumer, or its state lost), finds the
/// sequence the target already holds, newest first, so nothing is applied again.
async fn adopt<T: Target>(
    ctx: &Context,
    target: &T,
    repository: &str,
) -> Result<Option<Applied>, SyncError> {
    let Some(current) = target.current(repository).await? else {
        return Ok(None);
    };
    if current == target.fingerprint(&RefSet::default()) {
        return Ok(None);
    }
    let listed = ctx.list_repository(repository, None).await?;
    for &sequence in listed.listing.manifests.iter().rev() {
        let manifest = ctx.manifest(repository, sequence).await?;
        if target.fingerprint(&manifest.refs) == current {
            let applied = Applied {
                sequence,
                fingerprint: current,
            };
            tracing::info!(repo = %repository, sequence, "the target holds this sequence already; adopting it");
            if !ctx.dry_run {
                target.record(repository, &applied).await?;
            }
            return Ok(Some(applied));
        }
    }
    Ok(None)
}
