//! DiffService: diffs between two revisions or between blobs, answered the way Gitaly's
//! `internal/gitaly/service/diff` answers them, from real `git diff`, `git
//! format-patch` and `git patch-id`.
//!
//! - CommitDiff: `git diff --patch --raw -z` read by [`parse::Parser`] with Gitaly's
//!   limits; each file's patch is sent in 5 KiB pieces (Gitaly's message size), the
//!   first carrying the file's fields. Ignoring whitespace can hide a file from git's
//!   output; as Gitaly does, such files come last, from `git diff-tree`, with their
//!   `--numstat` counts.
//! - CommitDelta: the raw section only, batched by size. DiffStats: `--numstat -z`, by
//!   1,000. RawDiff and RawPatch: git's own text, streamed as it comes.
//! - GetPatchID: `git diff | git patch-id --verbatim`, piped without holding the diff.
//! - DiffBlobs ([`blobs`]): blob pairs or raw entries, one `git diff` per pair.
//! - FindChangedPaths ([`changed`]): one `git diff-tree --stdin` for every commit or
//!   tree pair asked about.
//! - RepositoryService.GetRawChanges ([`raw_changes`]): `git diff --raw -z` with each
//!   blob's size from the engine.
//!
//! Revisions are checked before git runs (no option-like argument, no range, no NUL;
//! Gitaly's messages for empty ones). Unknown revisions are git's exit 128, answered
//! with Gitaly's code for each RPC (FAILED_PRECONDITION, INTERNAL for RawDiff, RawPatch
//! and GetPatchID).

mod blobs;
mod changed;
pub(crate) mod numstat;
pub(crate) mod parse;
pub(crate) mod raw_changes;
pub(crate) mod run;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use refvote_proto::gitaly::diff_service_server::DiffService;
use refvote_proto::gitaly::{
    CommitDelta, CommitDeltaRequest, CommitDeltaResponse, CommitDiffRequest, CommitDiffResponse,
    DiffBlobsRequest, DiffBlobsResponse, DiffStats, DiffStatsRequest, DiffStatsResponse,
    FindChangedPathsRequest, FindChangedPathsResponse, GetPatchIdRequest, GetPatchIdResponse,
    RawDiffRequest, RawDiffResponse, RawPatchRequest, RawPatchResponse, commit_diff_request,
};
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use crate::error::NodeError;
use crate::git::Git;
use crate::refs::names;
use crate::respond::stream_from;
use crate::state::NodeState;
use crate::storage::RepoPath;
use crate::stream::stdout_stream;
use parse::{Diff, Limits};
use run::{
    DIFF_CONFIG, DiffRun, MSG_SIZE, exit_as_precondition, parse_error, send_all, with_config,
};

/// DiffStats entries per message.
const STATS_PER_MESSAGE: usize = 1000;
/// Bound on small outputs read whole (a patch id).
const SMALL: usize = 64 * 1024;

pub struct DiffSvc {
    node: Arc<NodeState>,
}

impl DiffSvc {
    pub fn new(node: Arc<NodeState>) -> DiffSvc {
        DiffSvc { node }
    }
}

/// A commit id of a diff request: `field` names it in errors the way Gitaly does
/// ("empty LeftCommitId"). Option-like, ranged or NUL-carrying revisions are refused.
pub(crate) fn commit_id(raw: &str, field: &str) -> Result<String, NodeError> {
    if raw.is_empty() {
        return Err(NodeError::invalid(format!("empty {field}")));
    }
    revision(raw.as_bytes(), field)
}

/// A revision handed to git as one argument (path-scoped ones allowed: `rev:path`).
pub(crate) fn revision(raw: &[u8], field: &str) -> Result<String, NodeError> {
    let rev = names::path_scoped_revision(field, raw).map(str::to_owned)?;
    if rev.split(':').next().is_some_and(|r| r.contains("..")) {
        return Err(NodeError::invalid(format!(
            "{field} {rev:?} is a range; name one revision"
        )));
    }
    Ok(rev)
}

/// Pathspecs of a request: not empty, no NUL, no `..` component (git would refuse
/// them outside the repository anyway).
pub(crate) fn pathspecs(paths: &[Vec<u8>]) -> Result<Vec<String>, NodeError> {
    paths
        .iter()
        .map(|p| {
            let s =
                std::str::from_utf8(p).map_err(|_| NodeError::invalid("paths must be UTF-8"))?;
            if s.is_empty() || s.contains('\0') || s.split('/').any(|c| c == "..") {
                return Err(NodeError::invalid(format!(
                    "path {s:?}: relative path escapes root directory or is malformed"
                )));
            }
            Ok(s.to_owned())
        })
        .collect()
}

/// A file as CommitDiff messages: the first with every field, the patch in
/// [`MSG_SIZE`] pieces, `end_of_patch` on the last.
fn commit_diff_messages(d: Diff) -> Vec<CommitDiffResponse> {
    let mut first = CommitDiffResponse {
        from_path: d.from_path,
        to_path: d.to_path,
        from_id: d.from_id,
        to_id: d.to_id,
        old_mode: d.old_mode,
        new_mode: d.new_mode,
        binary: d.binary,
        overflow_marker: d.overflow_marker,
        collapsed: d.collapsed,
        too_large: d.too_large,
        lines_added: d.lines_added,
        lines_removed: d.lines_removed,
        ..Default::default()
    };
    if d.patch.len() <= MSG_SIZE {
        first.raw_patch_data = d.patch;
        first.end_of_patch = true;
        return vec![first];
    }
    let pieces: Vec<&[u8]> = d.patch.chunks(MSG_SIZE).collect();
    let last = pieces.len() - 1;
    let mut out = Vec::with_capacity(pieces.len());
    for (i, piece) in pieces.into_iter().enumerate() {
        let mut m = if i == 0 {
            std::mem::take(&mut first)
        } else {
            CommitDiffResponse::default()
        };
        m.raw_patch_data = piece.to_vec();
        m.end_of_patch = i == last;
        out.push(m);
    }
    out
}

/// The numstat entries of `left..right` for `paths` (all files when empty).
async fn numstats(
    git: &Git,
    repo: &RepoPath,
    left: &str,
    right: &str,
    paths: &[String],
) -> Result<Vec<numstat::NumStat>, NodeError> {
    let mut cmd = git
        .command(["diff", "--numstat", "-z", "--end-of-options"])
        .arg(left)
        .arg(right)
        .arg("--")
        .repo(repo);
    for p in paths {
        cmd = cmd.arg(p);
    }
    let mut run = cmd.spawn()?;
    let mut parser = numstat::NumStatParser::default();
    let mut out = Vec::new();
    while let Some(chunk) = run.chunk().await {
        parser.feed(&chunk?, &mut out).map_err(parse_error)?;
    }
    parser.finish().map_err(parse_error)?;
    exit_as_precondition(run, "").await?;
    Ok(out)
}

impl DiffSvc {
    /// The whitespace-only files `git diff -w` leaves out: `git diff-tree`'s raw
    /// entries (keyed by new path and both blob ids, as Gitaly keys them).
    async fn unfiltered_entries(
        &self,
        repo: &RepoPath,
        left: &str,
        right: &str,
        common: &[&str],
        paths: &[String],
    ) -> Result<Vec<Diff>, NodeError> {
        let mut cmd = self.node.git.command(["diff-tree", "-r", "-z"]).repo(repo);
        for f in common {
            cmd = cmd.arg(*f);
        }
        cmd = cmd.arg("--end-of-options").arg(left).arg(right).arg("--");
        for p in paths {
            cmd = cmd.arg(p);
        }
        let mut diffs = DiffRun::new(cmd.spawn()?, Limits::default(), "diff-tree: ");
        let mut out = Vec::new();
        while let Some(d) = diffs.next().await? {
            out.push(d);
        }
        diffs.finish().await?;
        Ok(out)
    }
}

fn manifest_key(path: &[u8], from: &str, to: &str) -> (Vec<u8>, String, String) {
    (path.to_vec(), from.to_owned(), to.to_owned())
}

#[tonic::async_trait]
impl DiffService for DiffSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn commit_diff(
        &self,
        request: Request<CommitDiffRequest>,
    ) -> Result<Response<BoxStream<CommitDiffResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let left = commit_id(&req.left_commit_id, "LeftCommitId")?;
        let right = commit_id(&req.right_commit_id, "RightCommitId")?;
        let paths = pathspecs(&req.paths)?;
        let whitespace = commit_diff_request::WhitespaceChanges::try_from(req.whitespace_changes)
            .map_err(|_| NodeError::invalid("unknown whitespace_changes"))?;
        let mut common = vec!["--find-renames=30%", "--no-abbrev", "--full-index"];
        if req.diff_mode == commit_diff_request::DiffMode::Worddiff as i32 {
            common.push("--word-diff=porcelain");
        }
        let mut cmd = self
            .node
            .git
            .command([
                "diff",
                "--patch",
                "--raw",
                "-z",
                "--no-ext-diff",
                "--no-color",
            ])
            .repo(&repo);
        for f in &common {
            cmd = cmd.arg(*f);
        }
        match whitespace {
            commit_diff_request::WhitespaceChanges::IgnoreAll => {
                cmd = cmd.arg("--ignore-all-space")
            }
            commit_diff_request::WhitespaceChanges::Ignore => {
                cmd = cmd.arg("--ignore-space-change")
            }
            commit_diff_request::WhitespaceChanges::Unspecified => {}
        }
        cmd = cmd.arg("--end-of-options").arg(&left).arg(&right).arg("--");
        for p in &paths {
            cmd = cmd.arg(p);
        }
        let cmd = with_config(cmd, DIFF_CONFIG);
        let mut limits = Limits {
            collapse_diffs: req.collapse_diffs,
            collect_all_paths: req.collect_all_paths,
            safe_max_files: req.safe_max_files,
            safe_max_lines: req.safe_max_lines,
            safe_max_bytes: req.safe_max_bytes,
            ..Default::default()
        };
        if req.enforce_limits {
            limits.enforce_limits = true;
            limits.max_files = req.max_files;
            limits.max_lines = req.max_lines;
            limits.max_bytes = req.max_bytes;
            limits.max_patch_bytes = req.max_patch_bytes;
            limits.max_patch_bytes_for_extension = req.max_patch_bytes_for_file_extension;
        }
        // Files `-w` may hide from git diff's own output (see the module comment).
        let manifest = if whitespace == commit_diff_request::WhitespaceChanges::Unspecified {
            Vec::new()
        } else {
            self.unfiltered_entries(&repo, &left, &right, &common, &paths)
                .await?
        };
        let run = cmd.spawn().map_err(NodeError::from)?;
        let git = self.node.git.clone();
        Ok(Response::new(stream_from(move |tx| async move {
            let mut seen = HashSet::new();
            let mut diffs = DiffRun::new(run, limits, "eachDiff: ");
            while let Some(d) = diffs.next().await? {
                if !manifest.is_empty() {
                    seen.insert(manifest_key(&d.to_path, &d.from_id, &d.to_id));
                }
                if !send_all(&tx, commit_diff_messages(d)).await {
                    return Ok(());
                }
            }
            diffs.finish().await?;
            let left_over: Vec<Diff> = manifest
                .into_iter()
                .filter(|d| !seen.contains(&manifest_key(&d.to_path, &d.from_id, &d.to_id)))
                .collect();
            if left_over.is_empty() {
                return Ok(());
            }
            let only: Vec<String> = left_over
                .iter()
                .map(|d| String::from_utf8_lossy(&d.to_path).into_owned())
                .collect();
            let stats: HashMap<Vec<u8>, (i32, i32)> = numstats(&git, &repo, &left, &right, &only)
                .await?
                .into_iter()
                .map(|s| (s.path, (s.additions, s.deletions)))
                .collect();
            for d in left_over {
                let (added, removed) = stats.get(&d.to_path).copied().unwrap_or_default();
                let m = CommitDiffResponse {
                    from_path: d.to_path.clone(),
                    to_path: d.to_path,
                    from_id: d.from_id,
                    to_id: d.to_id,
                    old_mode: d.old_mode,
                    new_mode: d.new_mode,
                    end_of_patch: true,
                    lines_added: added,
                    lines_removed: removed,
                    ..Default::default()
                };
                if tx.send(Ok(m)).await.is_err() {
                    return Ok(());
                }
            }
            Ok(())
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn commit_delta(
        &self,
        request: Request<CommitDeltaRequest>,
    ) -> Result<Response<BoxStream<CommitDeltaResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let left = commit_id(&req.left_commit_id, "LeftCommitId")?;
        let right = commit_id(&req.right_commit_id, "RightCommitId")?;
        let paths = pathspecs(&req.paths)?;
        let mut cmd = self
            .node
            .git
            .command([
                "diff",
                "--raw",
                "-z",
                "--no-abbrev",
                "--full-index",
                "--find-renames",
                "--end-of-options",
            ])
            .arg(&left)
            .arg(&right)
            .arg("--")
            .repo(&repo);
        for p in &paths {
            cmd = cmd.arg(p);
        }
        let run = cmd.spawn().map_err(NodeError::from)?;
        Ok(Response::new(stream_from(move |tx| async move {
            let mut diffs = DiffRun::new(run, Limits::default(), "");
            let mut batch = Vec::new();
            let mut size = 0;
            while let Some(d) = diffs.next().await? {
                size += d.from_id.len() + d.to_id.len() + 8 + d.from_path.len() + d.to_path.len();
                batch.push(CommitDelta {
                    from_path: d.from_path,
                    to_path: d.to_path,
                    from_id: d.from_id,
                    to_id: d.to_id,
                    old_mode: d.old_mode,
                    new_mode: d.new_mode,
                });
                if size > MSG_SIZE {
                    let deltas = std::mem::take(&mut batch);
                    size = 0;
                    if tx.send(Ok(CommitDeltaResponse { deltas })).await.is_err() {
                        return Ok(());
                    }
                }
            }
            diffs.finish().await?;
            if !batch.is_empty() {
                let _ = tx.send(Ok(CommitDeltaResponse { deltas: batch })).await;
            }
            Ok(())
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn diff_stats(
        &self,
        request: Request<DiffStatsRequest>,
    ) -> Result<Response<BoxStream<DiffStatsResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let left = commit_id(&req.left_commit_id, "LeftCommitId")?;
        let right = commit_id(&req.right_commit_id, "RightCommitId")?;
        let mut run = self
            .node
            .git
            .command(["diff", "--numstat", "-z", "--end-of-options"])
            .arg(&left)
            .arg(&right)
            .repo(&repo)
            .spawn()
            .map_err(NodeError::from)?;
        Ok(Response::new(stream_from(move |tx| async move {
            let mut parser = numstat::NumStatParser::default();
            let mut parsed = Vec::new();
            let mut batch = Vec::new();
            while let Some(chunk) = run.chunk().await {
                let chunk = chunk.map_err(NodeError::from)?;
                parser.feed(&chunk, &mut parsed).map_err(parse_error)?;
                for s in parsed.drain(..) {
                    batch.push(DiffStats {
                        path: s.path,
                        additions: s.additions,
                        deletions: s.deletions,
                        old_path: s.old_path,
                    });
                    if batch.len() == STATS_PER_MESSAGE {
                        let stats = std::mem::take(&mut batch);
                        if tx.send(Ok(DiffStatsResponse { stats })).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            parser.finish().map_err(parse_error)?;
            exit_as_precondition(run, "").await?;
            if !batch.is_empty() {
                let _ = tx.send(Ok(DiffStatsResponse { stats: batch })).await;
            }
            Ok(())
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn raw_diff(
        &self,
        request: Request<RawDiffRequest>,
    ) -> Result<Response<BoxStream<RawDiffResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let left = commit_id(&req.left_commit_id, "LeftCommitId")?;
        let right = commit_id(&req.right_commit_id, "RightCommitId")?;
        let run = self
            .node
            .git
            .command(["diff", "--full-index", "--no-ext-diff", "--end-of-options"])
            .arg(&left)
            .arg(&right)
            .repo(&repo)
            .spawn()
            .map_err(NodeError::from)?;
        Ok(Response::new(stdout_stream(run, None, |data| {
            RawDiffResponse { data }
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn raw_patch(
        &self,
        request: Request<RawPatchRequest>,
    ) -> Result<Response<BoxStream<RawPatchResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let left = commit_id(&req.left_commit_id, "LeftCommitId")?;
        let right = commit_id(&req.right_commit_id, "RightCommitId")?;
        let run = self
            .node
            .git
            .command([
                "format-patch",
                "--stdout",
                "--signature",
                "GitLab",
                "--no-ext-diff",
                "--end-of-options",
            ])
            .arg(format!("{left}..{right}"))
            .repo(&repo)
            .spawn()
            .map_err(NodeError::from)?;
        Ok(Response::new(stdout_stream(run, None, |data| {
            RawPatchResponse { data }
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_patch_id(
        &self,
        request: Request<GetPatchIdRequest>,
    ) -> Result<Response<GetPatchIdResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if req.old_revision.is_empty() {
            return Err(NodeError::invalid("empty OldRevision").into());
        }
        if req.new_revision.is_empty() {
            return Err(NodeError::invalid("empty NewRevision").into());
        }
        let old = revision(&req.old_revision, "OldRevision")?;
        let new = revision(&req.new_revision, "NewRevision")?;
        let mut diff = self
            .node
            .git
            .command(["diff", "--full-index", "--no-ext-diff", "--no-color"])
            .repo(&repo);
        if req.context_free {
            diff = diff.arg("-U0");
        }
        let mut diff = diff
            .arg("--end-of-options")
            .arg(&old)
            .arg(&new)
            .spawn()
            .map_err(NodeError::from)?;
        // The diff flows into patch-id as it comes; its exit status comes back after.
        let (feed, input) = mpsc::channel::<Result<Vec<u8>, Status>>(4);
        let diff_done = tokio::spawn(async move {
            while let Some(chunk) = diff.chunk().await {
                let chunk = chunk?;
                if feed.send(Ok(chunk)).await.is_err() {
                    break;
                }
            }
            drop(feed);
            diff.wait().await
        });
        let (out, exit) = self
            .node
            .git
            .command(["patch-id", "--verbatim"])
            .stdin(Box::pin(tokio_stream::wrappers::ReceiverStream::new(input)))
            .spawn()
            .map_err(NodeError::from)?
            .output(SMALL)
            .await
            .map_err(NodeError::from)?;
        if !exit.success() {
            return Err(Status::internal(format!(
                "waiting for patch-id: exit status {}: {}",
                exit.code().unwrap_or(-1),
                exit.stderr.trim()
            )));
        }
        let diff_exit = diff_done
            .await
            .map_err(|e| Status::internal(format!("git diff: {e}")))?
            .map_err(NodeError::from)?;
        if !diff_exit.success() {
            return Err(Status::internal(format!(
                "waiting for git-diff: exit status {}: {}",
                diff_exit.code().unwrap_or(-1),
                diff_exit.stderr.trim()
            )));
        }
        let text = String::from_utf8_lossy(&out);
        if text.is_empty() {
            return Err(NodeError::FailedPrecondition(
                "no difference between old and new revision".into(),
            )
            .into());
        }
        let Some((patch_id, _)) = text.split_once(' ') else {
            return Err(NodeError::FailedPrecondition("unexpected patch ID format".into()).into());
        };
        Ok(Response::new(GetPatchIdResponse {
            patch_id: patch_id.to_owned(),
        }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn diff_blobs(
        &self,
        request: Request<DiffBlobsRequest>,
    ) -> Result<Response<BoxStream<DiffBlobsResponse>>, Status> {
        blobs::diff_blobs(&self.node, request.into_inner()).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_changed_paths(
        &self,
        request: Request<FindChangedPathsRequest>,
    ) -> Result<Response<BoxStream<FindChangedPathsResponse>>, Status> {
        changed::find_changed_paths(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_ids_are_checked_like_gitaly() {
        let e = commit_id("", "LeftCommitId").unwrap_err();
        assert_eq!(e.to_string(), "empty LeftCommitId");
        assert!(commit_id("--output=/tmp/x", "LeftCommitId").is_err());
        assert!(commit_id("a..b", "LeftCommitId").is_err());
        assert!(commit_id("main", "LeftCommitId").is_ok());
        assert!(revision(b"HEAD:dir/file", "OldRevision").is_ok());
        assert!(pathspecs(&[b"../x".to_vec()]).is_err());
        assert!(pathspecs(&[b"a/b".to_vec()]).is_ok());
    }

    #[test]
    fn large_patches_are_split_into_gitalys_message_size() {
        let d = Diff {
            from_path: b"f".to_vec(),
            patch: vec![b'x'; MSG_SIZE * 2 + 1],
            lines_added: 3,
            ..Default::default()
        };
        let m = commit_diff_messages(d);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].from_path, b"f");
        assert_eq!(m[0].lines_added, 3);
        assert!(m[1].from_path.is_empty());
        assert!(!m[0].end_of_patch && !m[1].end_of_patch && m[2].end_of_patch);
        assert_eq!(m[2].raw_patch_data.len(), 1);
        let small = commit_diff_messages(Diff::default());
        assert_eq!(small.len(), 1);
        assert!(small[0].end_of_patch);
    }
}
