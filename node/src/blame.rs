//! CommitService.RawBlame: `git blame --porcelain` of one file, streamed as git writes
//! it, with Gitaly's structured errors (`gitaly.RawBlameError`): a path the revision
//! does not have is NOT_FOUND with `path_not_found`, a range past the file's end
//! INVALID_ARGUMENT with `out_of_range` (the file's real line count), an
//! `ignore_revisions_blob` that names no blob NOT_FOUND/INVALID_ARGUMENT with
//! `resolve_ignore_revs`, and a malformed ignore-revs file NOT_FOUND with
//! `invalid_ignore_revs_format`. Bad input (option-like revision, a path climbing out
//! of the tree, a malformed range) is refused before git runs.

use std::sync::Arc;

use refvote_proto::gitaly::{
    PathNotFoundError, RawBlameError, RawBlameRequest, RawBlameResponse, raw_blame_error,
};
use tokio::io::AsyncWriteExt;
use tonic::codegen::BoxStream;
use tonic::{Code, Response, Status};

use crate::catfile::CatFile;
use crate::detail::status_with_detail;
use crate::error::NodeError;
use crate::refs::names;
use crate::respond::stream_from;
use crate::state::NodeState;
use crate::storage::{Storages, TempDir};

const DETAIL: &str = "gitaly.RawBlameError";

/// `start,end`, both decimal (Gitaly's `\A\d+,\d+\z`).
fn valid_range(range: &[u8]) -> bool {
    let Some(comma) = range.iter().position(|b| *b == b',') else {
        return false;
    };
    let (a, b) = (&range[..comma], &range[comma + 1..]);
    !a.is_empty() && !b.is_empty() && a.iter().chain(b).all(u8::is_ascii_digit)
}

/// Go's `filepath.IsLocal`: relative, not empty, no `..` climbing out.
fn is_local(path: &[u8]) -> bool {
    if path.is_empty() || path.starts_with(b"/") || path.contains(&0) {
        return false;
    }
    let mut depth: i64 = 0;
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

fn blame_error(code: Code, message: impl Into<String>, e: raw_blame_error::Error) -> Status {
    status_with_detail(code, message, DETAIL, &RawBlameError { error: Some(e) })
}

/// What git's stderr says went wrong, as Gitaly answers it.
fn classify(stderr: &str, path: &[u8], revision: &str) -> Status {
    let first = stderr.trim_start();
    if first.starts_with("fatal: no such path ") {
        return blame_error(
            Code::NotFound,
            format!(
                "path not found in revision: {:?} at {revision:?}",
                String::from_utf8_lossy(path)
            ),
            raw_blame_error::Error::PathNotFound(PathNotFoundError {
                path: path.to_vec(),
            }),
        );
    }
    if let Some(name) = first.strip_prefix("fatal: invalid object name: ") {
        return blame_error(
            Code::NotFound,
            "invalid object name",
            raw_blame_error::Error::InvalidIgnoreRevsFormat(
                raw_blame_error::InvalidIgnoreRevsFormatError {
                    content: name.trim_end_matches('\n').as_bytes().to_vec(),
                },
            ),
        );
    }
    if let Some(lines) = first
        .strip_prefix("fatal: file ")
        .and_then(|r| r.split_once(" has only "))
        .and_then(|(_, n)| n.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
    {
        return blame_error(
            Code::InvalidArgument,
            format!("range is outside of the file length (it has {lines} lines)"),
            raw_blame_error::Error::OutOfRange(raw_blame_error::OutOfRangeError {
                actual_lines: lines,
            }),
        );
    }
    Status::internal(format!("blaming file: {}", stderr.trim()))
}

pub(crate) async fn raw_blame(
    node: &Arc<NodeState>,
    req: RawBlameRequest,
) -> Result<Response<BoxStream<RawBlameResponse>>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let revision = names::revision("revision", &req.revision).map(str::to_owned)?;
    if req.path.is_empty() {
        return Err(NodeError::invalid("empty Path").into());
    }
    if !is_local(&req.path) {
        return Err(NodeError::invalid(format!(
            "path escapes repository root: {:?}",
            String::from_utf8_lossy(&req.path)
        ))
        .into());
    }
    if !req.range.is_empty() && !valid_range(&req.range) {
        return Err(NodeError::invalid("invalid Range").into());
    }
    let path =
        String::from_utf8(req.path.clone()).map_err(|_| NodeError::invalid("path is not UTF-8"))?;
    let mut cmd = node.git.command(["blame", "-p"]).repo(&repo);
    if !req.range.is_empty() {
        cmd = cmd
            .arg("-L")
            .arg(String::from_utf8_lossy(&req.range).into_owned());
    }
    let ignore_revs = if req.ignore_revisions_blob.is_empty() {
        None
    } else {
        let file = ignore_revs_file(node, &repo, &req.ignore_revisions_blob).await?;
        cmd = cmd.arg("--ignore-revs-file").arg(file.0.join("revs"));
        Some(file)
    };
    let mut run = cmd
        // git blame knows no --end-of-options; the revision cannot start with '-'.
        .arg(&revision)
        .arg("--")
        .arg(&path)
        .spawn()
        .map_err(NodeError::from)?;
    let raw_path = req.path;
    Ok(Response::new(stream_from(move |tx| async move {
        // The ignore-revs file lives until git is done with it.
        let _ignore_revs = ignore_revs;
        while let Some(chunk) = run.chunk().await {
            let data = chunk.map_err(NodeError::from)?;
            if tx.send(Ok(RawBlameResponse { data })).await.is_err() {
                return Ok(());
            }
        }
        let exit = run.wait().await.map_err(NodeError::from)?;
        if !exit.success() {
            return Err(classify(&exit.stderr, &raw_path, &revision));
        }
        Ok(())
    })))
}

/// Writes the blob `revision` names into a private file for `--ignore-revs-file`.
async fn ignore_revs_file(
    node: &NodeState,
    repo: &crate::storage::RepoPath,
    revision: &[u8],
) -> Result<TempDir, Status> {
    let rev = names::path_scoped_revision("ignore_revisions_blob", revision).map(str::to_owned)?;
    let unresolved = || {
        blame_error(
            Code::NotFound,
            "cannot resolve ignore-revs blob",
            raw_blame_error::Error::ResolveIgnoreRevs(raw_blame_error::ResolveIgnoreRevsError {
                ignore_revisions_blob: revision.to_vec(),
            }),
        )
    };
    let mut cat = CatFile::start(&node.git, repo)?;
    let Some(header) = cat.header(&rev).await? else {
        return Err(unresolved());
    };
    if header.kind != "blob" {
        return Err(blame_error(
            Code::InvalidArgument,
            "ignore revision is not a blob",
            raw_blame_error::Error::ResolveIgnoreRevs(raw_blame_error::ResolveIgnoreRevsError {
                ignore_revisions_blob: revision.to_vec(),
            }),
        ));
    }
    let dir = Storages::tmp_dir(&repo.root).join(format!("blame-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| NodeError::io(format!("creating {}", dir.display()), e))?;
    let dir = TempDir(dir);
    let target = dir.0.join("revs");
    let mut file = tokio::fs::File::create(&target)
        .await
        .map_err(|e| NodeError::io(format!("creating {}", target.display()), e))?;
    loop {
        let data = cat.read(64 * 1024).await?;
        if data.is_empty() {
            break;
        }
        file.write_all(&data)
            .await
            .map_err(|e| NodeError::io(format!("writing {}", target.display()), e))?;
    }
    file.flush()
        .await
        .map_err(|e| NodeError::io(format!("writing {}", target.display()), e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_paths_are_checked() {
        assert!(valid_range(b"1,10"));
        for bad in [&b"1"[..], b",2", b"1,", b"a,b", b"1,2,3", b"-1,2"] {
            assert!(!valid_range(bad), "{bad:?}");
        }
        assert!(is_local(b"a/b.txt"));
        assert!(is_local(b"a/../b"));
        for bad in [&b""[..], b"/etc/passwd", b"../x", b"a/../../x"] {
            assert!(!is_local(bad), "{bad:?}");
        }
    }

    #[test]
    fn git_errors_become_gitalys_structured_errors() {
        let s = classify("fatal: no such path 'x' in HEAD\n", b"x", "HEAD");
        assert_eq!(s.code(), Code::NotFound);
        let d: RawBlameError = crate::detail::detail_of(&s, DETAIL).unwrap();
        assert!(matches!(
            d.error,
            Some(raw_blame_error::Error::PathNotFound(_))
        ));
        let s = classify("fatal: file a.txt has only 3 lines\n", b"a.txt", "HEAD");
        assert_eq!(s.code(), Code::InvalidArgument);
        let d: RawBlameError = crate::detail::detail_of(&s, DETAIL).unwrap();
        assert_eq!(
            d.error,
            Some(raw_blame_error::Error::OutOfRange(
                raw_blame_error::OutOfRangeError { actual_lines: 3 }
            ))
        );
        let s = classify("fatal: file a.txt has only 1 line\n", b"a.txt", "HEAD");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(classify("boom", b"x", "HEAD").code(), Code::Internal);
    }
}
