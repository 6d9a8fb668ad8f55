//! Rewriting a merge request's commits: `UserSquash` (the range's changes as one
//! commit on its start), `UserRebaseToRef` (a rebase written to a merge-request ref)
//! and the two-phase `UserRebaseConfirmable` (the rebased tip proposed first; the
//! branch moves only once the client's next message applies it).
//!
//! A squash is Gitaly's: the merge tree of start and end (`git merge-tree`) committed
//! with start as its one parent, by the request's author, committed by its user. It
//! moves no ref (Gitaly's squash does not either), so its transaction commits no key:
//! the replicas' RPC statuses confirm it. A rebase follows Gitaly's merge-tree rebase,
//! which is git's `rebase` without its options: a fast-forward where one side contains
//! the other; else each commit of `git rev-list --cherry-pick --right-only --no-merges
//! --topo-order --reverse upstream...branch` picked onto the last (a merge tree against
//! its first parent), a pick that became empty dropped, each keeping its author and
//! message, committed by the request's user at the request's time. The same bytes come
//! out on every replica.

use std::sync::Arc;

use refvote_proto::gitaly::{
    GitCommit, MergeConflictError, ResolveRevisionError, UserRebaseConfirmableError,
    UserRebaseConfirmableRequest, UserRebaseConfirmableResponse, UserRebaseToRefRequest,
    UserRebaseToRefResponse, UserSquashError, UserSquashRequest, UserSquashResponse,
    user_rebase_confirmable_error, user_rebase_confirmable_request,
    user_rebase_confirmable_response, user_squash_error,
};
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::objects::{Ident, MergeTree, Signature};
use super::{OperationSvc, in_transaction, is_conflict, non_empty, ref_status, zero_oid};
use crate::catfile::CatFile;
use crate::detail::status_with_detail;
use crate::error::NodeError;
use crate::gitlab::operation::Op;
use crate::refs::names;
use crate::storage::RepoPath;
use crate::tx::WriteContext;

/// Bound on a rebase's list of commits to pick (40-byte ids, one a line).
const TODO_LIST: usize = 64 * 1024 * 1024;
/// The empty tree, whose root commit a rebase keeps though it changes nothing.
const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// How a rebase ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Rebased {
    /// The rebased tip.
    Tip(String),
    /// `commit` did not apply: the paths that conflict.
    Conflict { commit: String, files: Vec<Vec<u8>> },
}

/// Whether a pick whose merge left the tree as it was (`unchanged`) is kept: only a
/// commit that was empty to start with (its tree that of its first parent, or the empty
/// tree for a root) stays; one that became empty is dropped, as `git rebase` drops it.
fn keep_pick(unchanged: bool, tree: &str, parent_tree: Option<&str>) -> bool {
    !unchanged || tree == parent_tree.unwrap_or(EMPTY_TREE)
}

/// The commits of `git rev-list` output, in order.
fn todo_list(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The message of a raw commit object: everything after its headers.
fn message_of(raw: &[u8]) -> &[u8] {
    raw.windows(2)
        .position(|w| w == b"\n\n")
        .map_or(&[][..], |i| &raw[i + 2..])
}

impl OperationSvc {
    /// `branch` rebased onto `upstream` (both commit ids), new commits written inside
    /// `ctx` with `committer`.
    pub(super) async fn rebase(
        &self,
        repo: &RepoPath,
        ctx: &WriteContext,
        cat: &mut CatFile,
        upstream: &str,
        branch: &str,
        committer: &Signature,
    ) -> Result<Rebased, Status> {
        let base = self
            .git_text(repo, &["merge-base", upstream, branch])
            .await
            .map_err(|e| Status::internal(format!("get merge-base: {}", e.message())))?;
        if base == upstream {
            return Ok(Rebased::Tip(branch.to_owned()));
        }
        if base == branch {
            return Ok(Rebased::Tip(upstream.to_owned()));
        }
        let range = format!("{upstream}...{branch}");
        let (out, exit) = self
            .node
            .git
            .command([
                "rev-list",
                "--cherry-pick",
                "--right-only",
                "--no-merges",
                "--topo-order",
                "--reverse",
                &range,
            ])
            .git_dir(&repo.path)
            .output(TODO_LIST)
            .await?;
        exit.check().map_err(NodeError::from)?;
        let onto = commit(cat, upstream).await?.0;
        let (mut ours, mut ours_tree) = (onto.id, onto.tree_id);
        for pick in todo_list(&out) {
            let (theirs, raw) = commit(cat, &pick).await?;
            let parent = theirs.parent_ids.first().cloned();
            let tree = match self
                .objects()
                .merge_tree(repo, ctx, &ours, &theirs.id, parent.as_deref())
                .await?
            {
                MergeTree::Clean(tree) => tree,
                MergeTree::Conflict(files) => {
                    return Ok(Rebased::Conflict {
                        commit: theirs.id,
                        files,
                    });
                }
            };
            let parent_tree = match &parent {
                Some(p) => Some(commit(cat, p).await?.0.tree_id),
                None => None,
            };
            if !keep_pick(tree == ours_tree, &theirs.tree_id, parent_tree.as_deref()) {
                continue;
            }
            let who = Signature {
                author: Ident::of_commit_author(theirs.author.as_ref()),
                ..committer.clone()
            };
            ours = self
                .objects()
                .commit_tree(repo, ctx, &tree, &[&ours], &who, message_of(&raw))
                .await?;
            ours_tree = tree;
        }
        Ok(Rebased::Tip(ours))
    }

    pub(super) async fn squash(
        &self,
        request: Request<UserSquashRequest>,
    ) -> Result<Response<UserSquashResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let invalid = |what: &str| -> Status { NodeError::invalid(what.to_owned()).into() };
        let Some(who) = req.user.as_ref() else {
            return Err(invalid("empty User"));
        };
        if who.name.is_empty() {
            return Err(invalid("empty user name"));
        }
        if who.email.is_empty() {
            return Err(invalid("empty user email"));
        }
        if req.start_sha.is_empty() {
            return Err(invalid("empty StartSha"));
        }
        if req.end_sha.is_empty() {
            return Err(invalid("empty EndSha"));
        }
        if req.commit_message.is_empty() {
            return Err(invalid("empty CommitMessage"));
        }
        let Some(author) = req.author.as_ref() else {
            return Err(invalid("empty Author"));
        };
        if author.name.is_empty() {
            return Err(invalid("empty author name"));
        }
        if author.email.is_empty() {
            return Err(invalid("empty author email"));
        }
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let start = squash_end(&mut cat, &req.start_sha, "start").await?;
        let end = squash_end(&mut cat, &req.end_sha, "end").await?;
        let sig = Signature::by(who, req.timestamp.as_ref(), Some(&end))?.authored_by(author)?;
        // Gitaly ends the message with a newline, as `git commit-tree -m` once did.
        let mut message = req.commit_message.clone();
        if !message.ends_with(b"\n") {
            message.push(b'\n');
        }
        in_transaction(&self.node, &metadata, |ctx| async move {
            let tree = match self
                .objects()
                .merge_tree(&repo, &ctx, &start.id, &end.id, None)
                .await?
            {
                MergeTree::Clean(tree) => tree,
                MergeTree::Conflict(files) => {
                    // A merge conflict, under the name Gitaly kept from its rebase days.
                    return Err(status_with_detail(
                        Code::FailedPrecondition,
                        "squashing commits: merge: there are conflicting files",
                        "gitaly.UserSquashError",
                        &UserSquashError {
                            error: Some(user_squash_error::Error::RebaseConflict(
                                MergeConflictError {
                                    conflicting_files: files,
                                    conflicting_commit_ids: vec![start.id.clone(), end.id.clone()],
                                },
                            )),
                        },
                    ));
                }
            };
            let squash_sha = self
                .objects()
                .commit_tree(&repo, &ctx, &tree, &[&start.id], &sig, &message)
                .await?;
            Ok(Response::new(UserSquashResponse { squash_sha }))
        })
        .await
    }

    pub(super) async fn rebase_to_ref(
        &self,
        request: Request<UserRebaseToRefRequest>,
    ) -> Result<Response<UserRebaseToRefResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let invalid = |what: &str| -> Status { NodeError::invalid(what.to_owned()).into() };
        if req.first_parent_ref.is_empty() {
            return Err(invalid("empty FirstParentRef"));
        }
        let who = req.user.as_ref().ok_or_else(|| invalid("empty User"))?;
        if req.source_sha.is_empty() {
            return Err(invalid("empty SourceSha"));
        }
        if req.target_ref.is_empty() {
            return Err(invalid("empty TargetRef"));
        }
        if !req.target_ref.starts_with(b"refs/merge-requests") {
            return Err(invalid("invalid TargetRef"));
        }
        let target = non_empty(&req.target_ref, "TargetRef")?;
        Self::check_ref_format(&target)?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let onto = match names::revision("first_parent_ref", &req.first_parent_ref) {
            Ok(rev) => cat.commit(rev).await?,
            Err(_) => None,
        }
        .ok_or_else(|| invalid("invalid FirstParentRef"))?;
        let source = match names::revision("source_sha", req.source_sha.as_bytes()) {
            Ok(rev) => cat.commit(rev).await?,
            Err(_) => None,
        }
        .ok_or_else(|| invalid("invalid SourceSha"))?;
        let old = self
            .expected_or_current(&mut cat, &repo, &req.expected_old_oid, &target)
            .await?
            .unwrap_or_else(|| zero_oid(&onto.id));
        let sig = Signature::by(who, req.timestamp.as_ref(), Some(&onto))?;
        in_transaction(&self.node, &metadata, |ctx| async move {
            let tip = match self
                .rebase(&repo, &ctx, &mut cat, &onto.id, &source.id, &sig)
                .await?
            {
                Rebased::Tip(tip) => tip,
                Rebased::Conflict { .. } => {
                    return Err(Status::new(
                        Code::FailedPrecondition,
                        format!(
                            "failed to rebase {} on {} while preparing {target} due to conflict",
                            source.id, onto.id
                        ),
                    ));
                }
            };
            // A merge-request ref: Gitaly writes it without GitLab's hooks.
            self.set_ref(&repo, &ctx, &target, &old, &tip)
                .await
                .map_err(|f| {
                    if !is_conflict(&f.kind) {
                        return ref_status(f, &target);
                    }
                    Status::new(
                        Code::FailedPrecondition,
                        format!("could not update {target}. Please refresh and try again"),
                    )
                })?;
            Ok(Response::new(UserRebaseToRefResponse { commit_id: tip }))
        })
        .await
    }

    pub(super) async fn rebase_confirmable(
        &self,
        request: Request<Streaming<UserRebaseConfirmableRequest>>,
    ) -> Result<Response<BoxStream<UserRebaseConfirmableResponse>>, Status> {
        use user_rebase_confirmable_request::UserRebaseConfirmableRequestPayload as Payload;
        use user_rebase_confirmable_response::UserRebaseConfirmableResponsePayload as Answer;
        let (metadata, _, mut stream) = request.into_parts();
        let first = crate::stream::first_message(&mut stream).await?;
        let Some(Payload::Header(header)) = first.user_rebase_confirmable_request_payload else {
            return Err(NodeError::invalid("empty UserRebaseConfirmableRequest.Header").into());
        };
        let repo = self.node.storages.existing(header.repository.as_ref())?;
        let invalid = |what: &str| -> Status { NodeError::invalid(what.to_owned()).into() };
        let who = header.user.as_ref().ok_or_else(|| invalid("empty User"))?;
        if header.branch.is_empty() {
            return Err(invalid("empty Branch"));
        }
        if header.branch_sha.is_empty() {
            return Err(invalid("empty BranchSha"));
        }
        let Some(remote) = header.remote_repository.as_ref() else {
            return Err(invalid("empty RemoteRepository"));
        };
        if header.remote_branch.is_empty() {
            return Err(invalid("empty RemoteBranch"));
        }
        let remote_branch = names::revision("remote_branch", &header.remote_branch)
            .map_err(|_| invalid("invalid branch name"))?
            .to_owned();
        // The router routes one virtual storage, under the target's relative path: a
        // remote with that path is the target itself. Another repository (a fork's)
        // would have to be fetched from first, which this node does not do.
        if remote.relative_path != header.repository.as_ref().map_or("", |r| &r.relative_path) {
            return Err(invalid(
                "remote_repository other than the target repository is not supported by this node; fetch the remote branch first",
            ));
        }
        let branch = non_empty(&header.branch, "branch")?;
        let refname = format!("refs/heads/{branch}");
        Self::check_ref_format(&refname)?;
        let oldrev = header.branch_sha.to_ascii_lowercase();
        if !crate::catfile::is_object_id(&oldrev) {
            return Err(Status::new(
                Code::NotFound,
                format!("invalid object ID: {:?}", header.branch_sha),
            ));
        }
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let onto = cat
            .commit(&remote_branch)
            .await?
            .ok_or_else(|| Status::internal("resolve start ref: reference not found"))?;
        if cat.commit(&oldrev).await?.is_none() {
            return Err(Status::internal(format!(
                "rebasing commits: resolving branch commit: {oldrev} is not a commit here"
            )));
        }
        let sig = Signature::by(who, header.timestamp.as_ref(), Some(&onto))?;
        let mut hooks = self.node.gitlab.operation(
            &metadata,
            header.repository.as_ref(),
            header.user.as_ref(),
        )?;
        let (tx, rx) = mpsc::channel::<Result<UserRebaseConfirmableResponse, Status>>(2);
        let node = Arc::clone(&self.node);
        tokio::spawn(async move {
            let sent = tx.clone();
            let svc = OperationSvc::new(Arc::clone(&node));
            let result = in_transaction(&node, &metadata, |ctx| async move {
                hooks.join(&ctx, &repo.path);
                let newrev = match svc
                    .rebase(&repo, &ctx, &mut cat, &onto.id, &oldrev, &sig)
                    .await?
                {
                    Rebased::Tip(tip) => tip,
                    Rebased::Conflict { commit, files } => {
                        return Err(status_with_detail(
                            Code::FailedPrecondition,
                            format!(
                                "rebasing commits: rebase: commit {commit:?}: there are conflicting files"
                            ),
                            "gitaly.UserRebaseConfirmableError",
                            &UserRebaseConfirmableError {
                                error: Some(user_rebase_confirmable_error::Error::RebaseConflict(
                                    MergeConflictError {
                                        conflicting_files: files,
                                        conflicting_commit_ids: vec![
                                            onto.id.clone(),
                                            oldrev.clone(),
                                        ],
                                    },
                                )),
                            },
                        ));
                    }
                };
                let proposal = UserRebaseConfirmableResponse {
                    user_rebase_confirmable_response_payload: Some(Answer::RebaseSha(
                        newrev.clone(),
                    )),
                };
                if sent.send(Ok(proposal)).await.is_err() {
                    return Err(Status::cancelled(
                        "the client went away before applying the rebase",
                    ));
                }
                let apply = match stream.message().await? {
                    Some(second) => matches!(
                        second.user_rebase_confirmable_request_payload,
                        Some(Payload::Apply(true))
                    ),
                    None => return Err(Status::internal("recv: EOF")),
                };
                if !apply {
                    return Err(Status::new(
                        Code::FailedPrecondition,
                        "rebase aborted by client",
                    ));
                }
                svc.update_checked(
                    &repo,
                    &ctx,
                    &hooks,
                    Op::RebaseConfirmable,
                    &refname,
                    &oldrev,
                    &newrev,
                )
                .await
                .map_err(|e| {
                    e.status_with(|f| {
                        Status::internal(format!(
                            "updating ref with hooks: Could not update {refname}. Please refresh and try again: {}",
                            f.stderr()
                        ))
                    })
                })?;
                Ok(UserRebaseConfirmableResponse {
                    user_rebase_confirmable_response_payload: Some(Answer::RebaseApplied(true)),
                })
            })
            .await;
            let _ = tx.send(result).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The commit an end of a squash's range names (`what`: start or end), or Gitaly's
/// structured error naming the revision.
async fn squash_end(cat: &mut CatFile, rev: &str, what: &str) -> Result<GitCommit, Status> {
    let found = match names::revision(what, rev.as_bytes()) {
        Ok(name) => cat.commit(name).await?,
        Err(_) => None,
    };
    found.ok_or_else(|| {
        status_with_detail(
            Code::InvalidArgument,
            format!("resolving {what} revision: reference not found"),
            "gitaly.UserSquashError",
            &UserSquashError {
                error: Some(user_squash_error::Error::ResolveRevision(
                    ResolveRevisionError {
                        revision: rev.as_bytes().to_vec(),
                    },
                )),
            },
        )
    })
}

/// The commit `oid` parsed, with its raw object.
async fn commit(cat: &mut CatFile, oid: &str) -> Result<(GitCommit, Vec<u8>), Status> {
    match cat.object(oid).await? {
        Some((h, raw)) if h.kind == "commit" => {
            Ok((crate::catfile::parse_commit(&h.oid, &raw), raw))
        }
        _ => Err(Status::internal(format!(
            "reading commit {oid}: not a commit here"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pick_that_became_empty_is_dropped_and_one_empty_from_the_start_kept() {
        // Changed the tree: kept.
        assert!(keep_pick(false, "t1", Some("t0")));
        // Left the tree unchanged though it changed its parent's: already upstream.
        assert!(!keep_pick(true, "t1", Some("t0")));
        // Empty from the start: kept, as git rebase keeps it.
        assert!(keep_pick(true, "t0", Some("t0")));
        // A root commit: kept only if its tree is empty.
        assert!(keep_pick(true, EMPTY_TREE, None));
        assert!(!keep_pick(true, "t1", None));
    }

    #[test]
    fn the_todo_list_is_read_in_order() {
        assert_eq!(todo_list(b"a\nb\n\nc\n"), vec!["a", "b", "c"]);
        assert!(todo_list(b"").is_empty());
    }

    #[test]
    fn a_message_is_everything_after_the_headers() {
        let raw = b"tree t\nauthor A <a> 1 +0000\n\nSubject\n\nBody\n\nmore\n";
        assert_eq!(message_of(raw), b"Subject\n\nBody\n\nmore\n");
        assert_eq!(message_of(b"tree t\n"), b"");
    }
}
