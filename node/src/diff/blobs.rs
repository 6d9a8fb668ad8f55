//! DiffBlobs: patches between pairs of blobs, given as blob revisions (`blob_pairs`)
//! or as raw diff entries (`raw_info`, what FindChangedPaths returns).
//!
//! Gitaly diffs blob pairs with one `git diff` each and raw entries with `git
//! diff-pairs` (git 2.50); this node's git has no diff-pairs, so raw entries get one
//! `git diff` per entry too, and the one line of that output that names paths
//! (`Binary files ... differ`) is written with the entry's paths, as diff-pairs would.
//! An absent side (a zero object id) is diffed against the empty blob, written into a
//! private object directory (Gitaly's quarantine) so the repository is not changed.

use std::sync::Arc;

use refvote_proto::gitaly::{
    ChangedPaths, DiffBlobsRequest, DiffBlobsResponse, changed_paths, diff_blobs_request,
    diff_blobs_response,
};
use tonic::Status;
use tonic::codegen::BoxStream;

use super::parse::{Diff, Limits, quote_path};
use super::run::{DiffRun, MSG_SIZE, send_all};
use crate::catfile::{self, CatFile};
use crate::error::NodeError;
use crate::quarantine::Quarantine;
use crate::refs::names;
use crate::respond::stream_from;
use crate::state::NodeState;
use crate::storage::RepoPath;

const EMPTY_BLOB_SHA1: &str = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391";
const EMPTY_BLOB_SHA256: &str = "473a0f4c3be8a93681a267e3b1e9a7dcda1185436fe141f7749120a303721813";

/// One diff to make: the revisions git diffs, and what the answer reports.
#[derive(Debug, Clone)]
struct Pair {
    left_rev: String,
    right_rev: String,
    left_id: String,
    right_id: String,
    /// Paths of a raw entry, for the binary line (None for blob pairs).
    paths: Option<(Vec<u8>, Vec<u8>)>,
}

pub(super) async fn diff_blobs(
    node: &Arc<NodeState>,
    req: DiffBlobsRequest,
) -> Result<tonic::Response<BoxStream<DiffBlobsResponse>>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.blob_pairs.is_empty() && req.raw_info.is_empty() {
        return Err(NodeError::invalid("request contains no file pairs to diff").into());
    }
    if !req.blob_pairs.is_empty() && !req.raw_info.is_empty() {
        return Err(NodeError::invalid("blob pairs and raw info both used in request").into());
    }
    validate_raw_info(&req.raw_info)?;
    let whitespace = diff_blobs_request::WhitespaceChanges::try_from(req.whitespace_changes)
        .map_err(|_| NodeError::invalid("unknown whitespace_changes"))?;
    if whitespace != diff_blobs_request::WhitespaceChanges::Unspecified
        && !req.blob_pairs.is_empty()
    {
        return Err(NodeError::invalid(
            "whitespace changes cannot be ignored when blob pairs are provided",
        )
        .into());
    }
    let mut options = Vec::new();
    match whitespace {
        diff_blobs_request::WhitespaceChanges::IgnoreAll => options.push("--ignore-all-space"),
        diff_blobs_request::WhitespaceChanges::Ignore => options.push("--ignore-space-change"),
        diff_blobs_request::WhitespaceChanges::Unspecified => {}
    }
    if req.diff_mode == diff_blobs_request::DiffMode::Word as i32 {
        options.push("--word-diff=porcelain");
    }
    let sha256 = is_sha256(&repo);
    let empty = if sha256 {
        EMPTY_BLOB_SHA256
    } else {
        EMPTY_BLOB_SHA1
    };
    let zero = "0".repeat(empty.len());
    let (pairs, raw_mode) = if req.blob_pairs.is_empty() {
        (raw_pairs(&req.raw_info, &zero), true)
    } else {
        (blob_pairs(node, &repo, &req, &zero).await?, false)
    };
    let quarantine = if pairs
        .iter()
        .any(|p| p.left_id == zero || p.right_id == zero)
    {
        Some(Arc::new(empty_blob_quarantine(node, &repo).await?))
    } else {
        None
    };
    let limit = req.patch_bytes_limit;
    let node = node.clone();
    Ok(tonic::Response::new(stream_from(move |tx| async move {
        for pair in pairs {
            let diff = diff_pair(
                &node,
                &repo,
                quarantine.as_deref(),
                &pair,
                empty,
                &zero,
                &options,
                limit,
                raw_mode,
            )
            .await?;
            if !send_all(&tx, messages(diff)).await {
                return Ok(());
            }
        }
        Ok(())
    })))
}

fn validate_raw_info(raw: &[ChangedPaths]) -> Result<(), NodeError> {
    for e in raw {
        if e.old_blob_id.is_empty() || e.new_blob_id.is_empty() {
            return Err(NodeError::invalid("raw info entry missing blob IDs"));
        }
        if e.path.is_empty() {
            return Err(NodeError::invalid("raw info entry missing path"));
        }
        let status =
            changed_paths::Status::try_from(e.status).unwrap_or(changed_paths::Status::Modified);
        if matches!(
            status,
            changed_paths::Status::Renamed | changed_paths::Status::Copied
        ) && e.old_path.is_empty()
        {
            return Err(NodeError::invalid(
                "rename/copy raw info entry missing old path",
            ));
        }
        for id in [&e.old_blob_id, &e.new_blob_id] {
            if !catfile::is_object_id(id) {
                return Err(NodeError::invalid(format!(
                    "raw info entry blob ID {id:?} is not a full object ID"
                )));
            }
        }
    }
    Ok(())
}

/// Raw entries as pairs; a type change is a deletion then an addition.
fn raw_pairs(raw: &[ChangedPaths], zero: &str) -> Vec<Pair> {
    let mut out = Vec::new();
    for e in raw {
        let old_path = if e.old_path.is_empty() {
            e.path.clone()
        } else {
            e.old_path.clone()
        };
        let pair = |left: &str, right: &str| Pair {
            left_rev: left.to_owned(),
            right_rev: right.to_owned(),
            left_id: left.to_owned(),
            right_id: right.to_owned(),
            paths: Some((old_path.clone(), e.path.clone())),
        };
        if e.status == changed_paths::Status::TypeChange as i32 {
            out.push(pair(&e.old_blob_id, zero));
            out.push(pair(zero, &e.new_blob_id));
        } else {
            out.push(pair(&e.old_blob_id, &e.new_blob_id));
        }
    }
    out
}

/// Blob pairs, each side resolved to a blob (or the zero id) before any diff runs.
async fn blob_pairs(
    node: &NodeState,
    repo: &RepoPath,
    req: &DiffBlobsRequest,
    zero: &str,
) -> Result<Vec<Pair>, Status> {
    let mut cat = CatFile::start(&node.git, repo)?;
    let mut out = Vec::new();
    for p in &req.blob_pairs {
        let left = resolve_blob(&mut cat, &p.left_blob, zero, "left").await?;
        let right = resolve_blob(&mut cat, &p.right_blob, zero, "right").await?;
        if left.1 == right.1 {
            return Err(NodeError::invalid(format!(
                "left and right blob revisions resolve to same OID (left_revision {:?}, right_revision {:?})",
                String::from_utf8_lossy(&p.left_blob),
                String::from_utf8_lossy(&p.right_blob)
            ))
            .into());
        }
        out.push(Pair {
            left_rev: left.0,
            right_rev: right.0,
            left_id: left.1,
            right_id: right.1,
            paths: None,
        });
    }
    Ok(out)
}

/// (revision as given, blob id) of one side.
async fn resolve_blob(
    cat: &mut CatFile,
    raw: &[u8],
    zero: &str,
    side: &str,
) -> Result<(String, String), Status> {
    let text = String::from_utf8_lossy(raw).into_owned();
    if text == zero {
        return Ok((text, zero.to_owned()));
    }
    let bad = |why: String| -> Status {
        NodeError::invalid(format!(
            "getting {side} blob info: {why} (revision {text:?})"
        ))
        .into()
    };
    if text.contains(':') {
        names::path_scoped_revision("path-scoped revision", raw)
            .map(str::to_owned)
            .map_err(|e| bad(format!("validating path-scoped revision: {e}")))?;
    } else if !catfile::is_object_id(&text) || text.len() != zero.len() {
        return Err(bad(format!(
            "validating blob ID: invalid object ID: {text:?}"
        )));
    }
    match cat.header(&text).await? {
        None => Err(bad("getting revision info: object not found".into())),
        Some(h) if h.kind != "blob" => Err(bad("revision is not blob".into())),
        Some(h) => Ok((text, h.oid)),
    }
}

/// Whether the repository uses SHA-256 object ids (`extensions.objectFormat`).
fn is_sha256(repo: &RepoPath) -> bool {
    let Ok(config) = std::fs::read_to_string(repo.path.join("config")) else {
        return false;
    };
    config.lines().any(|l| {
        let l = l.trim().to_ascii_lowercase();
        l.starts_with("objectformat") && l.ends_with("sha256")
    })
}

/// A quarantine holding the empty blob: git sees it, the repository gets nothing.
async fn empty_blob_quarantine(node: &NodeState, repo: &RepoPath) -> Result<Quarantine, NodeError> {
    let q = Quarantine::new(repo, "diff-blobs")?;
    let exit = q
        .apply(
            node.git
                .command(["hash-object", "-w", "--stdin"])
                .git_dir(&repo.path)
                .stdin(Box::pin(tokio_stream::empty())),
        )
        .spawn()?
        .wait()
        .await?;
    exit.check()?;
    Ok(q)
}

#[allow(clippy::too_many_arguments)]
async fn diff_pair(
    node: &NodeState,
    repo: &RepoPath,
    quarantine: Option<&Quarantine>,
    pair: &Pair,
    empty: &str,
    zero: &str,
    options: &[&str],
    patch_limit: i32,
    raw_mode: bool,
) -> Result<Diff, Status> {
    let left = if pair.left_id == zero {
        empty
    } else {
        pair.left_rev.as_str()
    };
    let right = if pair.right_id == zero {
        empty
    } else {
        pair.right_rev.as_str()
    };
    // git prints nothing for identical sides (e.g. an added empty file).
    let effective_left = if pair.left_id == zero {
        empty
    } else {
        &pair.left_id
    };
    let effective_right = if pair.right_id == zero {
        empty
    } else {
        &pair.right_id
    };
    if effective_left == effective_right {
        return Ok(Diff {
            from_id: pair.left_id.clone(),
            to_id: pair.right_id.clone(),
            ..Default::default()
        });
    }
    let mut cmd = node
        .git
        .command([
            "diff",
            "--patch-with-raw",
            "-z",
            "--no-abbrev",
            "--no-ext-diff",
            "--no-color",
        ])
        .git_dir(&repo.path);
    for o in options {
        cmd = cmd.arg(*o);
    }
    cmd = cmd.arg("--end-of-options").arg(left).arg(right);
    if let Some(q) = quarantine {
        cmd = q.apply(cmd);
    }
    let cmd = super::run::with_config(cmd, super::run::DIFF_CONFIG);
    // Blob pairs follow Gitaly's diff parser (limit capped, `>=`); raw entries its
    // patch parser (no cap, `>`).
    let limits = if patch_limit > 0 && !raw_mode {
        Limits {
            enforce_limits: true,
            patch_limits_only: true,
            max_patch_bytes: patch_limit,
            ..Default::default()
        }
    } else {
        Limits::default()
    };
    let mut diffs = DiffRun::new(
        cmd.spawn().map_err(NodeError::from)?,
        limits,
        "waiting for git-diff: ",
    );
    let Some(mut diff) = diffs.next().await? else {
        diffs.finish().await?;
        return Err(Status::internal(
            "generating diff: diff parser finished unexpectedly",
        ));
    };
    while diffs.next().await?.is_some() {}
    diffs
        .finish()
        .await
        .map_err(|e| Status::internal(format!("generating diff: {e}")))?;
    diff.from_id = if pair.left_id == zero {
        zero.to_owned()
    } else {
        diff.from_id
    };
    diff.to_id = if pair.right_id == zero {
        zero.to_owned()
    } else {
        diff.to_id
    };
    if raw_mode {
        diff.from_id = pair.left_id.clone();
        diff.to_id = pair.right_id.clone();
        if let Some((old, new)) = &pair.paths {
            rename_binary_line(
                &mut diff,
                old,
                new,
                pair.left_id == zero,
                pair.right_id == zero,
            );
        }
        if patch_limit > 0 && diff.patch_size > patch_limit {
            diff.too_large = true;
            diff.patch.clear();
        }
    }
    Ok(diff)
}

/// `Binary files a/<blob> and b/<blob> differ` as diff-pairs words it for the entry's
/// paths.
fn rename_binary_line(diff: &mut Diff, old: &[u8], new: &[u8], added: bool, deleted: bool) {
    if !diff.binary || !diff.patch.starts_with(b"Binary files ") {
        return;
    }
    let mut line = b"Binary files ".to_vec();
    if added {
        line.extend(b"/dev/null");
    } else {
        line.extend(quote_path(b"a/", old));
    }
    line.extend(b" and ");
    if deleted {
        line.extend(b"/dev/null");
    } else {
        line.extend(quote_path(b"b/", new));
    }
    line.extend(b" differ\n");
    diff.patch_size = line.len() as i32;
    diff.patch = line;
}

/// A diff as DiffBlobs messages: fields first, the patch in [`MSG_SIZE`] pieces, the
/// last marked `STATUS_END_OF_PATCH`.
fn messages(d: Diff) -> Vec<DiffBlobsResponse> {
    let first = DiffBlobsResponse {
        left_blob_id: d.from_id,
        right_blob_id: d.to_id,
        binary: d.binary,
        over_patch_bytes_limit: d.too_large,
        patch_size: d.patch_size,
        lines_added: d.lines_added,
        lines_removed: d.lines_removed,
        ..Default::default()
    };
    let pieces: Vec<&[u8]> = if d.patch.is_empty() {
        vec![&[]]
    } else {
        d.patch.chunks(MSG_SIZE).collect()
    };
    let last = pieces.len() - 1;
    let mut first = Some(first);
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut m = first.take().unwrap_or_default();
            m.patch = piece.to_vec();
            if i == last {
                m.status = diff_blobs_response::Status::EndOfPatch as i32;
            }
            m
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_entries_become_pairs_and_a_type_change_two() {
        let zero = "0".repeat(40);
        let a = "1".repeat(40);
        let b = "2".repeat(40);
        let entries = vec![
            ChangedPaths {
                path: b"new".to_vec(),
                old_path: b"old".to_vec(),
                status: changed_paths::Status::Renamed as i32,
                old_blob_id: a.clone(),
                new_blob_id: b.clone(),
                ..Default::default()
            },
            ChangedPaths {
                path: b"t".to_vec(),
                status: changed_paths::Status::TypeChange as i32,
                old_blob_id: a.clone(),
                new_blob_id: b.clone(),
                ..Default::default()
            },
        ];
        validate_raw_info(&entries).unwrap();
        let pairs = raw_pairs(&entries, &zero);
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[0].paths.as_ref().unwrap().0, b"old");
        assert_eq!(
            (pairs[1].left_id.as_str(), pairs[1].right_id.as_str()),
            (a.as_str(), zero.as_str())
        );
        assert_eq!(
            (pairs[2].left_id.as_str(), pairs[2].right_id.as_str()),
            (zero.as_str(), b.as_str())
        );
        let missing = vec![ChangedPaths {
            path: b"x".to_vec(),
            status: changed_paths::Status::Renamed as i32,
            old_blob_id: a,
            new_blob_id: b,
            ..Default::default()
        }];
        assert_eq!(
            validate_raw_info(&missing).unwrap_err().to_string(),
            "rename/copy raw info entry missing old path"
        );
    }

    #[test]
    fn binary_lines_name_the_entrys_paths() {
        let mut d = Diff {
            binary: true,
            patch: b"Binary files a/111 and b/222 differ\n".to_vec(),
            ..Default::default()
        };
        rename_binary_line(&mut d, b"img.png", b"img.png", true, false);
        assert_eq!(d.patch, b"Binary files /dev/null and b/img.png differ\n");
    }

    #[test]
    fn messages_end_with_the_end_of_patch_status() {
        let m = messages(Diff {
            patch: vec![b'x'; MSG_SIZE + 1],
            from_id: "a".into(),
            ..Default::default()
        });
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].left_blob_id, "a");
        assert_eq!(m[0].status, diff_blobs_response::Status::Incomplete as i32);
        assert_eq!(m[1].status, diff_blobs_response::Status::EndOfPatch as i32);
        assert_eq!(messages(Diff::default()).len(), 1);
    }
}
