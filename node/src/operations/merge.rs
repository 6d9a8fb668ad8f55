//! Merge requests' writes: the merge commit for a merge-request ref (`UserMergeToRef`),
//! the two-phase merge into a branch (`UserMergeBranch`), fast-forwards
//! (`UserFFBranch`) and plain branch moves (`UserUpdateBranch`).
//!
//! A merge is `git merge-tree --write-tree` of the two commits (unrelated histories
//! allowed, conflicting file names only, as Gitaly asks for it) and `git commit-tree`
//! with the request's user as author and committer at the request's time, so every
//! replica writes the same commit. The branch moves through the node's one ref-write
//! path inside the caller's transaction, checked by GitLab's hooks first where the call
//! names a GitLab user; `UserMergeToRef` writes a merge-request ref, which GitLab's
//! hooks never see (Gitaly updates it without hooks).
//!
//! `UserMergeBranch` is Gitaly's two-phase stream: the first answer carries the merge
//! commit's id, and only the client's second message with `apply` set moves the branch.
//! A client that says no, or ends its stream instead, moves nothing.

use std::sync::Arc;

use refvote_proto::gitaly::{
    GitCommit, MergeConflictError, OperationBranchUpdate, ReferenceUpdateError,
    UserFfBranchRequest, UserFfBranchResponse, UserMergeBranchError, UserMergeBranchRequest,
    UserMergeBranchResponse, UserMergeToRefRequest, UserMergeToRefResponse,
    UserUpdateBranchRequest, UserUpdateBranchResponse, user_merge_branch_error,
};
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::objects::{MergeTree, Signature};
use super::{
    OperationSvc, UpdateError, in_transaction, is_conflict, non_empty, ref_status, refresh_status,
    signed_user, user, zero_oid,
};
use crate::catfile::{self, CatFile};
use crate::detail::status_with_detail;
use crate::error::NodeError;
use crate::gitlab::operation::{Op, update_branch_refused};
use crate::refs::names::{self, is_zero};

impl OperationSvc {
    /// The commit `rev` names here, or the error `missing` makes of its name.
    async fn commit_of(
        &self,
        cat: &mut CatFile,
        rev: &str,
        missing: impl FnOnce(&str) -> Status,
    ) -> Result<GitCommit, Status> {
        cat.commit(rev).await?.ok_or_else(|| missing(rev))
    }

    pub(super) async fn merge_to_ref(
        &self,
        request: Request<UserMergeToRefRequest>,
    ) -> Result<Response<UserMergeToRefResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let who = signed_user(req.user.as_ref())?;
        if req.source_sha.is_empty() {
            return Err(NodeError::invalid("empty source SHA").into());
        }
        let first_parent = if req.first_parent_ref.is_empty() {
            &req.branch
        } else {
            &req.first_parent_ref
        };
        if first_parent.is_empty() {
            return Err(NodeError::invalid("empty first parent ref and branch name").into());
        }
        if !req.target_ref.starts_with(b"refs/merge-requests") {
            return Err(NodeError::invalid("invalid target ref").into());
        }
        let target = non_empty(&req.target_ref, "target_ref")?;
        Self::check_ref_format(&target)?;
        let invalid_source = |_: &str| NodeError::invalid("Invalid merge source").into();
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let first_parent = names::revision("first_parent_ref", first_parent)?;
        let ours = self
            .commit_of(&mut cat, first_parent, invalid_source)
            .await?;
        let source = names::revision("source_sha", req.source_sha.as_bytes())?;
        let theirs = self.commit_of(&mut cat, source, invalid_source).await?;
        let old = self
            .expected_or_current(&mut cat, &repo, &req.expected_old_oid, &target)
            .await?
            .unwrap_or_else(|| zero_oid(&ours.id));
        let sig = Signature::by(who, req.timestamp.as_ref(), Some(&ours))?;
        in_transaction(&self.node, &metadata, |ctx| async move {
            let tree = match self
                .objects().merge_tree(&repo, &ctx, &ours.id, &theirs.id, None)
                .await?
            {
                MergeTree::Clean(tree) => tree,
                MergeTree::Conflict(_) => {
                    return Err(Status::new(
                        Code::FailedPrecondition,
                        format!(
                            "Failed to create merge commit for source_sha {} and target_sha {} at {target}",
                            theirs.id, ours.id
                        ),
                    ));
                }
            };
            let commit = self
                .objects().commit_tree(&repo, &ctx, &tree, &[&ours.id, &theirs.id], &sig, &req.message)
                .await?;
            // A merge-request ref: Gitaly writes it without GitLab's hooks.
            self.set_ref(&repo, &ctx, &target, &old, &commit)
                .await
                .map_err(|f| refresh_status(f, &target))?;
            Ok(Response::new(UserMergeToRefResponse { commit_id: commit }))
        })
        .await
    }

    pub(super) async fn merge_branch(
        &self,
        request: Request<Streaming<UserMergeBranchRequest>>,
    ) -> Result<Response<BoxStream<UserMergeBranchResponse>>, Status> {
        let (metadata, _, mut stream) = request.into_parts();
        let first = crate::stream::first_message(&mut stream).await?;
        let repo = self.node.storages.existing(first.repository.as_ref())?;
        signed_user(first.user.as_ref())?;
        if first.branch.is_empty() {
            return Err(NodeError::invalid("empty branch name").into());
        }
        if first.commit_id.is_empty() {
            return Err(NodeError::invalid("empty commit ID").into());
        }
        if first.message.is_empty() {
            return Err(NodeError::invalid("empty message").into());
        }
        let branch = non_empty(&first.branch, "branch")?;
        let refname = format!("refs/heads/{branch}");
        Self::check_ref_format(&refname)?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let ours = self
            .expected_or_current(&mut cat, &repo, &first.expected_old_oid, &refname)
            .await?
            .ok_or_else(|| {
                Status::new(Code::NotFound, format!("reference not found: {refname}"))
            })?;
        let ours_commit = self
            .commit_of(&mut cat, &ours, |r| {
                Status::internal(format!("branch resolution: {r} is not a commit"))
            })
            .await?;
        let commit_id = names::revision("commit_id", first.commit_id.as_bytes())?;
        let theirs = self
            .commit_of(&mut cat, commit_id, |r| {
                Status::internal(format!("merge: {r} is not a commit here"))
            })
            .await?;
        let sig = Signature::by(
            signed_user(first.user.as_ref())?,
            first.timestamp.as_ref(),
            Some(&ours_commit),
        )?;
        let mut hooks = self.node.gitlab.operation(
            &metadata,
            first.repository.as_ref(),
            first.user.as_ref(),
        )?;
        let (tx, rx) = mpsc::channel::<Result<UserMergeBranchResponse, Status>>(2);
        let node = Arc::clone(&self.node);
        tokio::spawn(async move {
            let sent = tx.clone();
            let svc = OperationSvc::new(Arc::clone(&node));
            let result = in_transaction(&node, &metadata, |ctx| async move {
                hooks.join(&ctx, &repo.path);
                let tree = match svc
                    .objects()
                    .merge_tree(&repo, &ctx, &ours, &theirs.id, None)
                    .await?
                {
                    MergeTree::Clean(tree) => tree,
                    MergeTree::Conflict(files) => {
                        return Err(status_with_detail(
                            Code::FailedPrecondition,
                            format!(
                                "merging commits: merge: there are conflicting files: {}",
                                files
                                    .iter()
                                    .map(|f| String::from_utf8_lossy(f))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                            "gitaly.UserMergeBranchError",
                            &UserMergeBranchError {
                                error: Some(user_merge_branch_error::Error::MergeConflict(
                                    MergeConflictError {
                                        conflicting_files: files,
                                        conflicting_commit_ids: vec![
                                            ours.clone(),
                                            theirs.id.clone(),
                                        ],
                                    },
                                )),
                            },
                        ));
                    }
                };
                // A squash merge keeps its squashed commit's one parent line: the
                // result sits on the branch alone.
                let parents: Vec<&str> = if first.squash {
                    vec![&ours]
                } else {
                    vec![&ours, &theirs.id]
                };
                let commit = svc
                    .objects()
                    .commit_tree(&repo, &ctx, &tree, &parents, &sig, &first.message)
                    .await?;
                if sent
                    .send(Ok(UserMergeBranchResponse {
                        commit_id: commit.clone(),
                        branch_update: None,
                    }))
                    .await
                    .is_err()
                {
                    return Err(Status::cancelled(
                        "the client went away before applying the merge",
                    ));
                }
                let apply = match stream.message().await {
                    Ok(Some(second)) => second.apply,
                    Ok(None) => false,
                    Err(status) => return Err(status),
                };
                if !apply {
                    return Err(Status::new(
                        Code::FailedPrecondition,
                        "merge aborted by client",
                    ));
                }
                svc.update_checked(
                    &repo,
                    &ctx,
                    &hooks,
                    Op::MergeBranch,
                    &refname,
                    &ours,
                    &commit,
                )
                .await
                .map_err(|e| {
                    e.status_with(|f| {
                        if !is_conflict(&f.kind) {
                            return ref_status(f, &refname);
                        }
                        status_with_detail(
                            Code::FailedPrecondition,
                            format!(
                                "Could not update {refname}. Please refresh and try again: {}",
                                f.stderr()
                            ),
                            "gitaly.UserMergeBranchError",
                            &UserMergeBranchError {
                                error: Some(user_merge_branch_error::Error::ReferenceUpdate(
                                    ReferenceUpdateError {
                                        reference_name: refname.clone().into_bytes(),
                                        old_oid: ours.clone(),
                                        new_oid: commit.clone(),
                                    },
                                )),
                            },
                        )
                    })
                })?;
                Ok(UserMergeBranchResponse {
                    commit_id: String::new(),
                    branch_update: Some(OperationBranchUpdate {
                        commit_id: commit,
                        repo_created: false,
                        branch_created: false,
                    }),
                })
            })
            .await;
            let _ = tx.send(result).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    pub(super) async fn ff_branch(
        &self,
        request: Request<UserFfBranchRequest>,
    ) -> Result<Response<UserFfBranchResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        user(req.user.as_ref())?;
        let branch = non_empty(&req.branch, "branch name")?;
        if req.commit_id.is_empty() {
            return Err(NodeError::invalid("empty commit id").into());
        }
        let refname = format!("refs/heads/{branch}");
        Self::check_ref_format(&refname)?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let current = self
            .expected_or_current(&mut cat, &repo, &req.expected_old_oid, &refname)
            .await?
            .ok_or_else(|| NodeError::invalid(format!("reference not found: {refname}")))?;
        if !catfile::is_object_id(&req.commit_id) {
            return Err(NodeError::invalid(format!(
                "cannot parse commit ID: {:?} is not a full object id",
                req.commit_id
            ))
            .into());
        }
        let target = req.commit_id.to_ascii_lowercase();
        if cat.commit(&target).await?.is_none() {
            return Err(NodeError::invalid(format!("commit {target} not found")).into());
        }
        let exit = self
            .node
            .git
            .command(["merge-base", "--is-ancestor", &current, &target])
            .git_dir(&repo.path)
            .status()
            .await?;
        if !exit.success() {
            return Err(Status::new(Code::FailedPrecondition, "not fast forward"));
        }
        let mut hooks =
            self.node
                .gitlab
                .operation(&metadata, req.repository.as_ref(), req.user.as_ref())?;
        in_transaction(&self.node, &metadata, |ctx| async move {
            hooks.join(&ctx, &repo.path);
            match self
                .update_checked(
                    &repo,
                    &ctx,
                    &hooks,
                    Op::FFBranch,
                    &refname,
                    &current,
                    &target,
                )
                .await
            {
                Ok(()) => {}
                // Gitaly answers a lost race with an empty response, as its Ruby
                // ancestor did.
                Err(UpdateError::Failed(f)) if is_conflict(&f.kind) => {
                    return Ok(Response::new(UserFfBranchResponse::default()));
                }
                Err(e) => return Err(e.status(&refname)),
            }
            Ok(Response::new(UserFfBranchResponse {
                branch_update: Some(OperationBranchUpdate {
                    commit_id: target,
                    repo_created: false,
                    branch_created: false,
                }),
                pre_receive_error: String::new(),
            }))
        })
        .await
    }

    pub(super) async fn update_branch(
        &self,
        request: Request<UserUpdateBranchRequest>,
    ) -> Result<Response<UserUpdateBranchResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let branch = non_empty(&req.branch_name, "branch name")?;
        user(req.user.as_ref())?;
        let parse = |raw: &[u8], what: &str| -> Result<String, Status> {
            if raw.is_empty() {
                return Err(NodeError::invalid(format!("empty {what}")).into());
            }
            let text = String::from_utf8_lossy(raw).to_ascii_lowercase();
            if !catfile::is_object_id(&text) {
                return Err(NodeError::invalid(format!(
                    "could not parse {what}: {text:?} is not a full object id"
                ))
                .into());
            }
            Ok(text)
        };
        let new = parse(&req.newrev, "newrev")?;
        let old = parse(&req.oldrev, "oldrev")?;
        let refname = format!("refs/heads/{branch}");
        Self::check_ref_format(&refname)?;
        if !is_zero(&new) {
            let mut cat = CatFile::start(&self.node.git, &repo)?;
            if cat.header(&new).await?.is_none() {
                return Err(
                    NodeError::invalid(format!("newrev {new} is not an object here")).into(),
                );
            }
        }
        let mut hooks =
            self.node
                .gitlab
                .operation(&metadata, req.repository.as_ref(), req.user.as_ref())?;
        in_transaction(&self.node, &metadata, |ctx| async move {
            hooks.join(&ctx, &repo.path);
            match self
                .update_checked(&repo, &ctx, &hooks, Op::UpdateBranch, &refname, &old, &new)
                .await
            {
                Ok(()) => Ok(Response::new(UserUpdateBranchResponse::default())),
                // Gitaly answers a custom hook's refusal in the response, not as an
                // error.
                Err(UpdateError::Refused { refusal, .. }) => {
                    Ok(Response::new(UserUpdateBranchResponse {
                        pre_receive_error: update_branch_refused(&branch, &refusal)?,
                    }))
                }
                Err(e) => Err(e.status_with(|f| refresh_status(f, &refname))),
            }
        })
        .await
    }
}
