//! RepositoryService.GetArchive: `git archive` of a commit (tar, zip, tar.gz through
//! `gzip -c -n`, tar.bz2 through `bzip2 -c`, as Gitaly compresses them), streamed as
//! git writes it: nothing holds the archive, and a client that reads slowly slows git
//! down. A git failure after the first bytes ends the stream with an error, never with
//! a short success.
//!
//! Checks before git runs, in Gitaly's order and words: the path and each exclude stay
//! inside the tree ("relative path escapes root directory"), the commit id is a
//! revision ("invalid commitId: ..."), the format is known ("invalid format"); then
//! the path and every exclude must exist in the commit and the tree must not be empty
//! (FAILED_PRECONDITION "path doesn't exist", "exclude[N] doesn't exist"). With
//! `elide_path` the archive holds the path's contents at its root.
//!
//! LFS: the pointer files go into the archive as they are. With `include_lfs_blobs`
//! Gitaly replaces them by the objects it fetches from GitLab, falling back to the
//! pointer whenever GitLab does not have one; this node has no GitLab client wired
//! yet, so it always answers the fallback (the pointers).

use std::sync::Arc;

use refvote_proto::gitaly::{GetArchiveRequest, GetArchiveResponse, get_archive_request};
use tonic::codegen::BoxStream;
use tonic::{Response, Status};

use crate::catfile::CatFile;
use crate::diff::run::with_config;
use crate::error::NodeError;
use crate::refs::names;
use crate::state::NodeState;
use crate::stream::stdout_stream;

/// The empty tree's id in each hash.
const EMPTY_TREE_SHA1: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
const EMPTY_TREE_SHA256: &str = "6ef19b41225c5369f1c104d45d8d85efa9b057b53b14b4b9b939dd74decc5321";

/// Go's `filepath.Clean` of a path relative to the repository root, refused if it
/// climbs out (Gitaly's `storage.ValidateRelativePath`). The root itself is ".".
pub(crate) fn clean_relative(raw: &[u8]) -> Result<String, NodeError> {
    let text = std::str::from_utf8(raw).map_err(|_| NodeError::invalid("path is not UTF-8"))?;
    if text.contains('\0') {
        return Err(NodeError::invalid("path contains NUL"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(NodeError::invalid(format!(
                        "relative path escapes root directory: {text:?}"
                    )));
                }
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Ok(".".to_owned());
    }
    Ok(parts.join("/"))
}

/// git archive's format and the compression config that goes with it.
fn format(f: i32) -> Option<(&'static str, Option<(&'static str, &'static str)>)> {
    match get_archive_request::Format::try_from(f).ok()? {
        get_archive_request::Format::Tar => Some(("tar", None)),
        get_archive_request::Format::Zip => Some(("zip", None)),
        get_archive_request::Format::TarGz => {
            Some(("tar.gz", Some(("tar.tar.gz.command", "gzip -c -n"))))
        }
        get_archive_request::Format::TarBz2 => {
            Some(("tar.bz2", Some(("tar.tar.bz2.command", "bzip2 -c"))))
        }
    }
}

pub(crate) async fn get_archive(
    node: &Arc<NodeState>,
    req: GetArchiveRequest,
) -> Result<Response<BoxStream<GetArchiveResponse>>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    let path = clean_relative(&req.path)?;
    let mut exclude = req
        .exclude
        .iter()
        .map(|e| clean_relative(e))
        .collect::<Result<Vec<_>, _>>()?;
    let commit = names::revision("commitId", req.commit_id.as_bytes())
        .map(str::to_owned)
        .map_err(|e| NodeError::invalid(format!("invalid commitId: {e}")))?;
    let Some((format, compression)) = format(req.format) else {
        return Err(NodeError::invalid("invalid format").into());
    };
    if req.prefix.contains('\0') || req.prefix.contains('\n') {
        return Err(NodeError::invalid("invalid prefix").into());
    }
    let mut cat = CatFile::start(&node.git, &repo)?;
    if path != "." {
        if !exists(&mut cat, &commit, &path).await? {
            return Err(NodeError::FailedPrecondition("path doesn't exist".into()).into());
        }
    } else {
        let root = cat
            .header(&format!("{commit}^{{tree}}"))
            .await?
            .ok_or_else(|| NodeError::NotFound(format!("commit {commit:?} not found")))?;
        if root.oid == EMPTY_TREE_SHA1 || root.oid == EMPTY_TREE_SHA256 {
            return Err(NodeError::FailedPrecondition("path doesn't exist".into()).into());
        }
    }
    for (i, e) in exclude.iter().enumerate() {
        if !exists(&mut cat, &commit, e).await? {
            return Err(
                NodeError::FailedPrecondition(format!("exclude[{i}] doesn't exist")).into(),
            );
        }
    }
    drop(cat);
    if req.elide_path {
        let base = format!("{path}/");
        for e in &mut exclude {
            let Some(rest) = e.strip_prefix(&base) else {
                return Err(NodeError::invalid(format!(
                    "invalid exclude: {e:?} is not a subdirectory of {path:?}"
                ))
                .into());
            };
            *e = rest.to_owned();
        }
    }
    let mut cmd = node
        .git
        .command(["archive"])
        .arg(format!("--format={format}"))
        .arg(format!("--prefix={}/", req.prefix))
        .repo(&repo);
    let mut pathspecs = Vec::new();
    if !req.elide_path {
        cmd = cmd.arg(&commit);
        pathspecs.push(path.clone());
    } else if path != "." {
        cmd = cmd.arg(format!("{commit}:{path}"));
    } else {
        cmd = cmd.arg(&commit);
    }
    pathspecs.extend(exclude.iter().map(|e| format!(":(exclude){e}")));
    cmd = cmd.arg("--");
    for p in pathspecs {
        cmd = cmd.arg(p);
    }
    if let Some(pair) = compression {
        cmd = with_config(cmd, &[pair]);
    }
    let run = cmd.spawn().map_err(NodeError::from)?;
    Ok(Response::new(stdout_stream(run, None, |data| {
        GetArchiveResponse { data }
    })))
}

/// Whether `commit:path` names anything.
async fn exists(cat: &mut CatFile, commit: &str, path: &str) -> Result<bool, NodeError> {
    Ok(cat.header(&format!("{commit}:{path}")).await?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_and_kept_inside_the_tree() {
        assert_eq!(clean_relative(b"").unwrap(), ".");
        assert_eq!(clean_relative(b"./a//b/").unwrap(), "a/b");
        assert_eq!(clean_relative(b"a/../b").unwrap(), "b");
        for bad in [&b".."[..], b"../x", b"a/../../x"] {
            let e = clean_relative(bad).unwrap_err();
            assert!(e.to_string().contains("escapes root directory"), "{e}");
        }
    }

    #[test]
    fn formats_map_to_git_and_gitalys_compressors() {
        assert_eq!(format(1).unwrap().0, "tar");
        assert_eq!(format(0).unwrap().0, "zip");
        assert_eq!(format(2).unwrap().1.unwrap().1, "gzip -c -n");
        assert_eq!(format(3).unwrap().1.unwrap().1, "bzip2 -c");
        assert!(format(9).is_none());
    }
}
