//! ConflictsService.ListConflictFiles: the files a merge of two commits conflicts in,
//! with their content as `git merge-tree` leaves it (conflict markers), as Gitaly
//! answers: `git merge-tree -z --write-tree --allow-unrelated-histories` run in a
//! quarantine (the merge's objects never reach the repository), its conflicted
//! entries grouped by path in git's order (one header each: our, their and ancestor
//! path, our mode), each file's content after its header with the commit ids in the
//! markers replaced by the paths. Messages are filled up to 128 KiB.
//!
//! Errors as Gitaly words them: unresolvable sides are FAILED_PRECONDITION ("could not
//! lookup 'our' OID"), a conflict missing one side without `allow_tree_conflicts`
//! FAILED_PRECONDITION "conflict side missing", content that is not UTF-8
//! FAILED_PRECONDITION "unsupported encoding". One file's content is held at a time
//! (its encoding is checked before any of it is sent).

use std::sync::Arc;

use refvote_proto::gitaly::conflicts_service_server::ConflictsService;
use refvote_proto::gitaly::{
    ConflictFile, ConflictFileHeader, ListConflictFilesRequest, ListConflictFilesResponse,
    conflict_file,
};
use tonic::codegen::BoxStream;
use tonic::{Response, Status};

use crate::catfile::{self, CatFile};
use crate::error::NodeError;
use crate::quarantine::Quarantine;
use crate::refs::names;
use crate::respond::stream_from;
use crate::state::NodeState;

pub struct ConflictsSvc {
    node: Arc<NodeState>,
}

impl ConflictsSvc {
    pub fn new(node: Arc<NodeState>) -> ConflictsSvc {
        ConflictsSvc { node }
    }
}

#[tonic::async_trait]
impl ConflictsService for ConflictsSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_conflict_files(
        &self,
        request: tonic::Request<ListConflictFilesRequest>,
    ) -> Result<Response<BoxStream<ListConflictFilesResponse>>, Status> {
        list_conflict_files(&self.node, request.into_inner()).await
    }
}

/// Bytes per message (Gitaly's `streamio.WriteBufferSize`).
const MESSAGE_SIZE: usize = 128 * 1024;
/// Largest conflicted file answered.
const MAX_CONTENT: usize = 64 * 1024 * 1024;

/// One conflicted path's sides.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub ancestor_path: String,
    pub our_path: String,
    pub their_path: String,
    pub our_mode: i32,
}

/// Parses `git merge-tree -z --write-tree` output of a conflicted merge: the tree id,
/// then `<mode> <oid> <stage>\t<path>` entries, an empty field, then messages.
pub fn parse_merge_tree(out: &[u8]) -> Result<(String, Vec<Conflict>), NodeError> {
    let bad = |what: &str| {
        NodeError::io(
            "reading git merge-tree",
            std::io::Error::other(format!("couldn't parse merge tree output: {what}")),
        )
    };
    let mut fields = out.split(|b| *b == 0);
    let tree = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    if !catfile::is_object_id(&tree) {
        return Err(bad("no tree id"));
    }
    let mut conflicts: Vec<Conflict> = Vec::new();
    for field in fields {
        if field.is_empty() {
            break;
        }
        let tab = field
            .iter()
            .position(|b| *b == b'\t')
            .ok_or_else(|| bad("entry"))?;
        let info = String::from_utf8_lossy(&field[..tab]).into_owned();
        let path = String::from_utf8_lossy(&field[tab + 1..]).into_owned();
        let parts: Vec<&str> = info.split_whitespace().collect();
        let [mode, _oid, stage] = parts.as_slice() else {
            return Err(bad("entry"));
        };
        let mode = i32::from_str_radix(mode, 8).map_err(|_| bad("mode"))?;
        let i = match conflicts
            .iter()
            .position(|c| [&c.ancestor_path, &c.our_path, &c.their_path].contains(&&path))
        {
            Some(i) => i,
            None => {
                conflicts.push(Conflict::default());
                conflicts.len() - 1
            }
        };
        let c = &mut conflicts[i];
        match *stage {
            "1" => c.ancestor_path = path,
            "2" => {
                c.our_path = path;
                c.our_mode = mode;
            }
            "3" => c.their_path = path,
            _ => return Err(bad("stage")),
        }
    }
    Ok((tree, conflicts))
}

pub(crate) async fn list_conflict_files(
    node: &Arc<NodeState>,
    req: ListConflictFilesRequest,
) -> Result<Response<BoxStream<ListConflictFilesResponse>>, Status> {
    let repo = node.storages.existing(req.repository.as_ref())?;
    if req.our_commit_oid.is_empty() {
        return Err(NodeError::invalid("empty OurCommitOid").into());
    }
    if req.their_commit_oid.is_empty() {
        return Err(NodeError::invalid("empty TheirCommitOid").into());
    }
    let ours_rev =
        names::revision("OurCommitOid", req.our_commit_oid.as_bytes()).map(str::to_owned)?;
    let theirs_rev =
        names::revision("TheirCommitOid", req.their_commit_oid.as_bytes()).map(str::to_owned)?;
    let mut cat = CatFile::start(&node.git, &repo)?;
    let ours = cat.commit(&ours_rev).await?.ok_or_else(|| {
        NodeError::FailedPrecondition("could not lookup 'our' OID: reference not found".into())
    })?;
    let theirs = cat.commit(&theirs_rev).await?.ok_or_else(|| {
        NodeError::FailedPrecondition("could not lookup 'their' OID: reference not found".into())
    })?;
    drop(cat);
    let quarantine = Quarantine::new(&repo, "conflicts")?;
    let run = quarantine
        .apply(
            node.git
                .command([
                    "merge-tree",
                    "-z",
                    "--write-tree",
                    "--allow-unrelated-histories",
                ])
                .arg(&ours.id)
                .arg(&theirs.id)
                .git_dir(&repo.path),
        )
        .spawn()
        .map_err(NodeError::from)?;
    let (out, exit) = run.output(MAX_CONTENT).await.map_err(NodeError::from)?;
    match exit.code() {
        Some(0) => return Ok(Response::new(Box::pin(tokio_stream::empty()))),
        Some(1) => {}
        _ => {
            return Err(Status::internal(format!(
                "couldn't find conflict: merge-tree: {}",
                exit.stderr.trim()
            )));
        }
    }
    let (tree, conflicts) = parse_merge_tree(&out)?;
    if !req.allow_tree_conflicts
        && conflicts
            .iter()
            .any(|c| c.our_path.is_empty() || c.their_path.is_empty())
    {
        return Err(NodeError::FailedPrecondition("conflict side missing".into()).into());
    }
    let node = node.clone();
    let commit_oid = req.our_commit_oid.clone();
    let skip_content = req.skip_content;
    Ok(Response::new(stream_from(move |tx| async move {
        let mut files: Vec<ConflictFile> = Vec::new();
        let mut size = 0usize;
        for c in conflicts {
            files.push(ConflictFile {
                conflict_file_payload: Some(conflict_file::ConflictFilePayload::Header(
                    ConflictFileHeader {
                        commit_oid: commit_oid.clone(),
                        their_path: c.their_path.clone().into_bytes(),
                        our_path: c.our_path.clone().into_bytes(),
                        our_mode: c.our_mode,
                        ancestor_path: c.ancestor_path.clone().into_bytes(),
                    },
                )),
            });
            if skip_content {
                continue;
            }
            let path = if c.our_path.is_empty() {
                &c.their_path
            } else {
                &c.our_path
            };
            let content = merged_content(&node, &repo, &quarantine, &tree, path).await?;
            if std::str::from_utf8(&content).is_err() {
                return Err(NodeError::FailedPrecondition("unsupported encoding".into()).into());
            }
            let content = replace(
                &replace(&content, ours.id.as_bytes(), c.our_path.as_bytes()),
                theirs.id.as_bytes(),
                c.their_path.as_bytes(),
            );
            for piece in content.chunks(MESSAGE_SIZE) {
                files.push(ConflictFile {
                    conflict_file_payload: Some(conflict_file::ConflictFilePayload::Content(
                        piece.to_vec(),
                    )),
                });
                size += piece.len();
                if size < MESSAGE_SIZE {
                    continue;
                }
                let batch = std::mem::take(&mut files);
                size = 0;
                if tx
                    .send(Ok(ListConflictFilesResponse { files: batch }))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
        }
        if !files.is_empty() {
            let _ = tx.send(Ok(ListConflictFilesResponse { files })).await;
        }
        Ok(())
    })))
}

/// The merged file as merge-tree wrote it (in the quarantine).
async fn merged_content(
    node: &NodeState,
    repo: &crate::storage::RepoPath,
    quarantine: &Quarantine,
    tree: &str,
    path: &str,
) -> Result<Vec<u8>, Status> {
    let (out, exit) = quarantine
        .apply(
            node.git
                .command(["cat-file", "blob"])
                .arg(format!("{tree}:{path}"))
                .git_dir(&repo.path),
        )
        .spawn()
        .map_err(NodeError::from)?
        .output(MAX_CONTENT)
        .await
        .map_err(NodeError::from)?;
    if !exit.success() {
        return Err(NodeError::FailedPrecondition(format!(
            "getting file revision: {}",
            exit.stderr.trim()
        ))
        .into());
    }
    Ok(out)
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.is_empty() {
        return hay.to_vec();
    }
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_tree_output_groups_stages_by_path() {
        let tree = "a".repeat(40);
        let o = "1".repeat(40);
        let out = format!(
            "{tree}\x00100644 {o} 1\tf.txt\x00100644 {o} 2\tf.txt\x00100755 {o} 3\tf.txt\x00100644 {o} 2\tonly-ours\x00\x001\x00f.txt\x00Auto-merging\x00Auto-merging f.txt\n\x00"
        );
        let (t, c) = parse_merge_tree(out.as_bytes()).unwrap();
        assert_eq!(t, tree);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ancestor_path, "f.txt");
        assert_eq!(c[0].our_mode, 0o100644);
        assert_eq!(c[0].their_path, "f.txt");
        assert!(c[1].their_path.is_empty());
        assert!(parse_merge_tree(b"nonsense").is_err());
    }

    #[test]
    fn commit_ids_in_markers_become_paths() {
        assert_eq!(
            replace(b"<<<<<<< abc\nx\n>>>>>>> abc\n", b"abc", b"f"),
            b"<<<<<<< f\nx\n>>>>>>> f\n"
        );
    }
}
