//! DiffService: FindChangedPaths, the paths a push changes (Rails' push rules and file
//! checks read it during GitLab's checks, on the push's quarantine). One
//! `git diff-tree --stdin` for all comparisons, after every revision was resolved.
//! The other DiffService methods answer UNIMPLEMENTED here.

use std::sync::Arc;

use refvote_proto::gitaly::diff_service_server::DiffService;
use refvote_proto::gitaly::{
    ChangedPaths, FindChangedPathsRequest, FindChangedPathsResponse, changed_paths,
    find_changed_paths_request,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::catfile::CatFile;
use super::commit::stream_from;
use super::error::NodeError;
use crate::state::NodeState;

/// Paths per FindChangedPaths message.
const PATHS_PER_MESSAGE: usize = 100;

pub struct DiffSvc {
    node: Arc<NodeState>,
}

impl DiffSvc {
    pub fn new(node: Arc<NodeState>) -> DiffSvc {
        DiffSvc { node }
    }
}

/// git's status letter as the response's status.
fn status(letter: u8) -> Option<changed_paths::Status> {
    use changed_paths::Status as S;
    Some(match letter {
        b'A' => S::Added,
        b'M' => S::Modified,
        b'D' => S::Deleted,
        b'T' => S::TypeChange,
        b'C' => S::Copied,
        b'R' => S::Renamed,
        _ => return None,
    })
}

/// `--diff-filter` from the request's filters (empty: Gitaly's default, AMDTCR).
fn diff_filter(filters: &[i32]) -> Result<String, NodeError> {
    use find_changed_paths_request::DiffStatus as D;
    if filters.is_empty() {
        return Ok("AMDTCR".into());
    }
    filters
        .iter()
        .map(|f| match D::try_from(*f) {
            Ok(D::Added) => Ok('A'),
            Ok(D::Modified) => Ok('M'),
            Ok(D::Deleted) => Ok('D'),
            Ok(D::TypeChange) => Ok('T'),
            Ok(D::Copied) => Ok('C'),
            Ok(D::Renamed) => Ok('R'),
            _ => Err(NodeError::invalid(format!("unknown diff filter {f}"))),
        })
        .collect()
}

/// Parses `git diff-tree -z -r` output (raw format, one or more sources per entry;
/// commit ids before each commit's entries) into changed paths. `commit_ids`: set each
/// path's commit id from the id line that precedes it.
pub fn parse(out: &[u8], commit_ids: bool) -> Result<Vec<ChangedPaths>, String> {
    let mut paths = Vec::new();
    let mut fields = out.split(|b| *b == 0).peekable();
    let mut commit = String::new();
    while let Some(field) = fields.next() {
        if field.is_empty() {
            continue;
        }
        if field[0] != b':' {
            // A commit id line (`<oid>`, or `<oid> (from <parent>)` with -m), when
            // commits are compared.
            let line = String::from_utf8_lossy(field);
            commit = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            continue;
        }
        let sources = field.iter().take_while(|b| **b == b':').count();
        let text = String::from_utf8_lossy(&field[sources..]).into_owned();
        let parts: Vec<&str> = text.split(' ').collect();
        if parts.len() != 2 * sources + 3 {
            return Err(format!("unexpected git diff-tree line {text:?}"));
        }
        let letters: Vec<u8> = parts[parts.len() - 1]
            .bytes()
            .filter(|b| b.is_ascii_uppercase())
            .collect();
        if letters.len() != sources {
            return Err(format!("unexpected git diff-tree status in {text:?}"));
        }
        let mode = |s: &str| i32::from_str_radix(s, 8).map_err(|e| format!("mode {s:?}: {e}"));
        let new_mode = mode(parts[sources])?;
        let new_blob = parts[2 * sources + 1].to_owned();
        let moved = sources == 1 && matches!(letters[0], b'R' | b'C');
        let old_path = if moved {
            fields.next().ok_or("a rename without its source")?.to_vec()
        } else {
            Vec::new()
        };
        let path = fields.next().ok_or("an entry without its path")?.to_vec();
        for i in 0..sources {
            paths.push(ChangedPaths {
                path: path.clone(),
                status: status(letters[i]).ok_or("unknown status")? as i32,
                old_mode: mode(parts[i])?,
                new_mode,
                old_blob_id: parts[sources + 1 + i].to_owned(),
                new_blob_id: new_blob.clone(),
                old_path: old_path.clone(),
                score: 0,
                commit_id: if commit_ids {
                    commit.clone()
                } else {
                    String::new()
                },
            });
        }
    }
    Ok(paths)
}

#[tonic::async_trait]
impl DiffService for DiffSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_changed_paths(
        &self,
        request: Request<FindChangedPathsRequest>,
    ) -> Result<Response<BoxStream<FindChangedPathsResponse>>, Status> {
        use find_changed_paths_request::request::{CommitRequest, Type};
        use find_changed_paths_request::{MergeCommitDiffMode as Mode, Request as One};
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let mut requests = req.requests.clone();
        if !req.commits.is_empty() {
            if !requests.is_empty() {
                return Err(NodeError::invalid("cannot specify both commits and requests").into());
            }
            requests = req
                .commits
                .iter()
                .map(|c| One {
                    r#type: Some(Type::CommitRequest(CommitRequest {
                        commit_revision: c.clone(),
                        parent_commit_revisions: Vec::new(),
                    })),
                })
                .collect();
        }
        if requests.is_empty() {
            return Err(NodeError::invalid("no comparison requested: set requests").into());
        }
        let filter = diff_filter(&req.diff_filters)?;
        // Every revision resolved first, to its object of the right type.
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let mut resolve = async |rev: &str, kind: &str, what: &str| -> Result<String, Status> {
            let rev = crate::refs::names::revision(what, rev.as_bytes())?;
            match cat.header(&format!("{rev}^{{{kind}}}")).await? {
                Some(h) => Ok(h.oid),
                None => Err(Status::not_found(format!(
                    "resolving {what}: revision can not be found: {rev:?}"
                ))),
            }
        };
        let mut stdin = String::new();
        let mut all_commits = true;
        for r in &requests {
            match &r.r#type {
                Some(Type::CommitRequest(c)) => {
                    stdin.push_str(&resolve(&c.commit_revision, "commit", "commit").await?);
                    for p in &c.parent_commit_revisions {
                        stdin.push(' ');
                        stdin.push_str(&resolve(p, "commit", "commit parent").await?);
                    }
                }
                Some(Type::TreeRequest(t)) => {
                    all_commits = false;
                    stdin.push_str(&resolve(&t.left_tree_revision, "tree", "left tree").await?);
                    stdin.push(' ');
                    stdin.push_str(&resolve(&t.right_tree_revision, "tree", "right tree").await?);
                }
                None => return Err(NodeError::invalid("a request names no comparison").into()),
            }
            stdin.push('\n');
        }
        let mut cmd = self
            .node
            .git
            .command(["diff-tree", "-z", "--stdin", "-r", "--root"])
            .arg(format!("--diff-filter={filter}"))
            .git_dir(&repo.path)
            .envs(repo.object_env());
        cmd = cmd.arg(if req.find_renames {
            "--find-renames=30%"
        } else {
            "--no-renames"
        });
        cmd = match Mode::try_from(req.merge_commit_diff_mode) {
            Ok(Mode::AllParents) => cmd.arg("-c"),
            _ => cmd.arg("-m"),
        };
        let (out, exit) = cmd
            .stdin(Box::pin(tokio_stream::once(Ok(stdin.into_bytes()))))
            .spawn()
            .map_err(NodeError::from)?
            .output(usize::MAX)
            .await
            .map_err(NodeError::from)?;
        if !exit.success() {
            return Err(Status::failed_precondition(format!(
                "git diff-tree failed: {}",
                exit.stderr.trim()
            )));
        }
        let paths = parse(&out, all_commits).map_err(Status::internal)?;
        Ok(Response::new(stream_from(move |tx| async move {
            for chunk in paths.chunks(PATHS_PER_MESSAGE) {
                let msg = FindChangedPathsResponse {
                    paths: chunk.to_vec(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
            Ok(())
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const Z: &str = "0000000000000000000000000000000000000000";

    #[test]
    fn diff_tree_output_becomes_changed_paths() {
        let out = format!(
            "c0ffee\0:000000 100644 {Z} {A} A\0new.txt\0:100644 100755 {A} {B} M\0run.sh\0:100644 100644 {A} {B} R087\0old name\0new name\0::100644 100644 100644 {A} {B} {A} MM\0merged.c\0"
        );
        let paths = parse(out.as_bytes(), true).unwrap();
        assert_eq!(paths.len(), 5);
        assert_eq!(paths[0].path, b"new.txt");
        assert_eq!(paths[0].status, changed_paths::Status::Added as i32);
        assert_eq!((paths[0].old_mode, paths[0].new_mode), (0, 0o100644));
        assert_eq!(paths[0].new_blob_id, A);
        assert_eq!(paths[0].commit_id, "c0ffee");
        assert_eq!(paths[1].new_mode, 0o100755);
        assert_eq!(paths[2].status, changed_paths::Status::Renamed as i32);
        assert_eq!(
            (paths[2].old_path.as_slice(), paths[2].path.as_slice()),
            (&b"old name"[..], &b"new name"[..])
        );
        // A combined entry: one path per parent, each with that parent's old blob.
        assert_eq!(
            (paths[3].old_blob_id.as_str(), paths[4].old_blob_id.as_str()),
            (A, B)
        );
        assert_eq!(paths[3].new_blob_id, A);
        assert!(
            parse(out.as_bytes(), false).unwrap()[0]
                .commit_id
                .is_empty()
        );
        assert!(parse(b":100644 100644 x M\0p\0", false).is_err());
    }

    #[test]
    fn diff_filters_map_to_gits_letters() {
        use find_changed_paths_request::DiffStatus as D;
        assert_eq!(diff_filter(&[]).unwrap(), "AMDTCR");
        assert_eq!(
            diff_filter(&[D::Added as i32, D::Deleted as i32]).unwrap(),
            "AD"
        );
        assert!(diff_filter(&[0]).is_err());
    }
}
