//! The producer: for each chosen repository, refresh the local mirror from the source,
//! compare its refs with what the bucket's latest manifest says the last sequence
//! carried, and if they differ upload the next sequence — a full bundle the first
//! time, else one of what is new since the last tips — sealed, then its manifest,
//! created only if absent. The bucket is the whole state: a producer with an empty
//! cache re-clones and carries on from the latest manifest.
//!
//! A run cut short leaves at most a data object without a manifest, which no consumer
//! reads; the next run writes that sequence again and removes the leftover.

use std::time::Instant;

use crate::bundle;
use crate::catalog;
use crate::context::{self, Context};
use crate::error::SyncError;
use crate::fault;
use crate::manifest::{self, Manifest};
use crate::mirror::Mirror;
use crate::naming::{Header, Kind, MAX_KEY_LEN};
use crate::plan::{self, Round};
use crate::refs::RefSet;
use crate::report::{Outcome, RepoReport, Role, Summary, human_bytes};
use crate::store::StoreError;
use crate::transfer;

pub struct Options {
    /// Base URL of the source; the relative path is appended.
    pub source: String,
    /// The repositories to carry (already resolved).
    pub repositories: Vec<String>,
    /// Repositories that get a full bundle whatever the last sequence was.
    pub full: Vec<String>,
}

pub async fn run(ctx: &Context, options: &Options) -> Summary {
    let started = Instant::now();
    let mut summary = Summary {
        role: Role::Produce,
        dry_run: ctx.dry_run,
        started_at: context::now(),
        seconds: 0.0,
        bytes: 0,
        repositories: Vec::new(),
        error: None,
        exit_code: 0,
    };
    // One listing first: an unreachable bucket is one clear error, not one per
    // repository.
    if let Err(e) = ctx.bucket.list_dirs(ctx.layout.prefix()).await {
        let e = SyncError::from(e);
        summary.error = Some(e.to_string());
        summary.settle(Some(e.class()));
        return summary;
    }
    ctx.progress.set_total(options.repositories.len());
    for repository in &options.repositories {
        let t = Instant::now();
        let force_full = options.full.iter().any(|f| f == repository);
        let mut report =
            match produce_repository(ctx, &options.source, repository, force_full).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(repo = %repository, "{e}");
                    RepoReport::failed(repository, &e)
                }
            };
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

async fn produce_repository(
    ctx: &Context,
    source: &str,
    repository: &str,
    force_full: bool,
) -> Result<RepoReport, SyncError> {
    ctx.progress.at(repository, "fetching");
    let url = catalog::join_url(source, repository);
    let mirror =
        Mirror::open_or_clone(&ctx.git, &url, &ctx.mirror_path("source", repository)).await?;
    mirror.fetch_from(&url, &ctx.patterns, true).await?;
    let current = mirror.refs(&ctx.patterns).await?;

    ctx.progress.at(repository, "reading the bucket");
    let listed = ctx.list_repository(repository, None).await?;
    let latest = listed.listing.manifests.iter().next_back().copied();
    let previous = match latest {
        Some(s) => Some(ctx.manifest(repository, s).await?),
        None => None,
    };
    let previous_refs = previous.as_ref().map(|m| &m.refs);
    let present = match previous_refs {
        Some(p) => mirror.present(&p.tips()).await?,
        None => Vec::new(),
    };
    let round = plan::round(previous_refs, &current, &present, force_full);
    let sequence = latest.map_or(1, |l| l + 1);
    let (kind, exclude) = match round {
        Round::Unchanged => {
            let mut r = RepoReport::new(repository, Outcome::Unchanged);
            r.sequence = latest;
            return Ok(r);
        }
        Round::Empty => return Ok(RepoReport::new(repository, Outcome::Empty)),
        Round::Full { reason } => {
            tracing::info!(repo = %repository, sequence, "full bundle: {reason}");
            (Kind::Full, Vec::new())
        }
        Round::Incremental { exclude } => (Kind::Incremental, exclude),
    };

    let object_format = mirror.object_format().await?;
    let tips = current.tips();
    let prerequisites = match kind {
        Kind::Full => Vec::new(),
        Kind::Incremental => mirror.walk(&tips, &exclude).await?.prerequisites,
    };
    let header = Header {
        repository: repository.to_owned(),
        sequence,
        base: previous_refs.map_or_else(|| RefSet::default().checksum(), RefSet::checksum),
        tip: current.checksum(),
        format: bundle::format_for(&object_format),
        kind,
        key_id: ctx.keys.sealing().id.clone(),
        upload: context::random_id(),
    };
    let data_key = ctx.layout.data(&header);
    let manifest_key = ctx.layout.manifest(repository, sequence);
    if data_key.len() > MAX_KEY_LEN {
        return Err(SyncError::Target(format!(
            "the object name for {repository} would be {} bytes, over S3's {MAX_KEY_LEN}: shorten store.prefix or the key id",
            data_key.len()
        )));
    }
    if ctx.dry_run {
        let mut r = RepoReport::new(repository, Outcome::WouldSync);
        r.sequence = Some(sequence);
        r.kind = Some(kind);
        r.plan = Some(format!(
            "upload sequence {sequence} ({kind}, {} refs, {} prerequisites)",
            current.refs.len(),
            prerequisites.len()
        ));
        return Ok(r);
    }

    ctx.progress.at(repository, "uploading");
    let bundle_header = bundle::header(header.format, &prerequisites, &current);
    let pack = mirror.pack(&tips, &exclude)?;
    let master = ctx.keys.sealing();
    let sizes = transfer::upload_bundle(
        &ctx.bucket,
        &data_key,
        master,
        ctx.keys.cipher,
        bundle_header,
        pack,
        ctx.progress.bytes(),
    )
    .await?;
    fault::point(fault::BEFORE_MANIFEST);

    let manifest = Manifest {
        version: manifest::VERSION,
        header: header.clone(),
        data_key: data_key.clone(),
        data_size: sizes.sealed,
        bundle_size: sizes.plain,
        refs: current,
        object_format,
        prerequisites: prerequisites.len(),
        created_at: context::now(),
    };
    let sealed = manifest.seal(master, ctx.keys.cipher, &manifest_key);
    match ctx.bucket.create(&manifest_key, sealed).await {
        Ok(()) => {}
        Err(StoreError::Exists { .. }) => {
            // Ours after all (a retried PUT whose first try had landed), or another
            // producer's.
            let theirs = ctx.manifest(repository, sequence).await?;
            if theirs.header.upload != header.upload {
                ctx.bucket.delete(&data_key).await?;
                return Err(SyncError::Conflict { sequence });
            }
        }
        Err(e) => {
            let _ = ctx.bucket.delete(&data_key).await;
            return Err(e.into());
        }
    }
    // Leftovers of runs cut short while writing this sequence: no manifest names them.
    for (key, h) in &listed.data {
        if h.sequence == sequence && *key != data_key {
            tracing::info!(repo = %repository, %key, "removing a data object no manifest names");
            ctx.bucket.delete(key).await?;
        }
    }
    tracing::info!(
        repo = %repository,
        sequence,
        %kind,
        size = %human_bytes(sizes.sealed),
        "uploaded"
    );
    let mut r = RepoReport::new(repository, Outcome::Uploaded);
    r.sequence = Some(sequence);
    r.kind = Some(kind);
    r.bytes = sizes.sealed;
    Ok(r)
}
