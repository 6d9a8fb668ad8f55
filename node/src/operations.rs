//! OperationService: branch and tag creation and deletion, and commits built from file
//! actions, on behalf of a GitLab user; merges (`merge`), squashes and rebases
//! (`rebase`), cherry-picks and reverts (`pick`), their commits built in `objects`.
//!
//! Every ref change is one `git update-ref` with an explicit old value (the node's one
//! ref-write path, `refs::update`, with its one reading of git's failures), run inside the
//! caller's refvote transaction exactly like a push (DESIGN.md §2): the hook votes it,
//! and a replica whose ref drifted votes differently. Objects are built without a
//! worktree (`git hash-object`, a private index, `git write-tree`, `git commit-tree`,
//! `git mktag`), and must come out byte-identical on every replica, so nothing depends
//! on the node's clock or config:
//!
//! - dates are the request's `timestamp`, which the router fills in with its own clock
//!   when the client left it unset (Gitaly uses the current time), once for every
//!   replica. A request that still has none (a node called directly) gets the **fixed
//!   rule**: the committer date of the parent commit (UserCommitFiles) or of the tagged
//!   commit (UserCreateTag), or the Unix epoch when there is none (`signature`);
//! - the time zone is the user's `timezone` as the router leaves it: the offset of the
//!   user's zone at that time (`+0530`). A node keeps no zone database (it could differ
//!   between hosts), so it takes only offsets and UTC, and refuses a zone name;
//! - commits are never signed (`sign` is ignored: a signature would differ per host).
//!
//! A call by a GitLab user inside a transaction GitLab's checks gate has its ref update
//! checked first, as a push of that one change ([`crate::gitlab::operation`]); a
//! refusal is Gitaly's structured error for the RPC, the same on every replica.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use refvote_proto::gitaly::operation_service_server::OperationService;
use refvote_proto::gitaly::{
    Branch, CommitAuthor, IndexError, OperationBranchUpdate, ReferenceExistsError,
    ReferenceUpdateError, Tag, User, UserCherryPickRequest, UserCherryPickResponse,
    UserCommitFilesActionHeader, UserCommitFilesError, UserCommitFilesRequest,
    UserCommitFilesRequestHeader, UserCommitFilesResponse, UserCreateBranchRequest,
    UserCreateBranchResponse, UserCreateTagError, UserCreateTagRequest, UserCreateTagResponse,
    UserDeleteBranchError, UserDeleteBranchRequest, UserDeleteBranchResponse, UserDeleteTagRequest,
    UserDeleteTagResponse, UserFfBranchRequest, UserFfBranchResponse, UserMergeBranchRequest,
    UserMergeBranchResponse, UserMergeToRefRequest, UserMergeToRefResponse,
    UserRebaseConfirmableRequest, UserRebaseConfirmableResponse, UserRebaseToRefRequest,
    UserRebaseToRefResponse, UserRevertRequest, UserRevertResponse, UserSquashRequest,
    UserSquashResponse, UserUpdateBranchRequest, UserUpdateBranchResponse, index_error,
    user_commit_files_action, user_commit_files_action_header, user_commit_files_error,
    user_commit_files_request, user_create_tag_error, user_delete_branch_error,
};
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::catfile::{self, CatFile};
use super::detail::status_with_detail;
use super::error::NodeError;
use super::git::Run;
use super::refs::names::{self, is_zero};
use super::refs::update::{self, FailureKind, RefUpdate, UpdateFailure};
use super::signature::{commit_time, fixed_offset, ident};
use super::storage::{RepoPath, Storages};
use super::tx::{WriteContext, WriteIn};
use crate::gitlab::operation::{Op, OperationHooks, delete_tag_refused, refusal_status};
use crate::state::NodeState;
use objects::{Objects, Signature, committer_seconds, lossy, oid_of};
use refvote_gitlab::Refusal;

mod merge;
mod objects;
mod pick;
mod rebase;

/// Bound on small git answers read whole (an object id, a ref name).
const SMALL: usize = 4096;
/// Bound on a parent's full file listing (UserCommitFiles).
const MAX_LISTING: usize = 256 * 1024 * 1024;
const MODE_FILE: &str = "100644";
const MODE_EXEC: &str = "100755";

pub struct OperationSvc {
    node: Arc<NodeState>,
}

impl OperationSvc {
    pub fn new(node: Arc<NodeState>) -> OperationSvc {
        OperationSvc { node }
    }
}

/// Runs `work` as this node's part of the write: the transaction (if any) is joined
/// first and recorded done with the outcome, whatever it is.
async fn in_transaction<T, F>(
    node: &NodeState,
    metadata: &tonic::metadata::MetadataMap,
    work: impl FnOnce(WriteContext) -> F,
) -> Result<T, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    let ctx = WriteContext::from_metadata(&node.tx, metadata).await?;
    let result = work(ctx.clone()).await;
    ctx.settle(result).await
}

#[tonic::async_trait]
impl OperationService for OperationSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_create_branch(
        &self,
        request: Request<UserCreateBranchRequest>,
    ) -> Result<Response<UserCreateBranchResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let name = non_empty(&req.branch_name, "branch_name")?;
        user(req.user.as_ref())?;
        let start = names::revision("start_point", &req.start_point)?;
        let refname = format!("refs/heads/{name}");
        Self::check_ref_format(&refname)?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let Some(commit) = cat.commit(start).await? else {
            return Err(Status::new(
                Code::FailedPrecondition,
                format!("revspec '{start}' not found"),
            ));
        };
        let zero = zero_oid(&commit.id);
        let mut hooks =
            self.node
                .gitlab
                .operation(&metadata, req.repository.as_ref(), req.user.as_ref())?;
        in_transaction(&self.node, &metadata, |ctx| async move {
            hooks.join(&ctx, &repo.path);
            self.update_checked(
                &repo,
                &ctx,
                &hooks,
                Op::CreateBranch,
                &refname,
                &zero,
                &commit.id,
            )
            .await
            .map_err(|e| e.status(&refname))?;
            Ok(Response::new(UserCreateBranchResponse {
                branch: Some(Branch {
                    name: name.into_bytes(),
                    target_commit: Some(commit),
                }),
            }))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_delete_branch(
        &self,
        request: Request<UserDeleteBranchRequest>,
    ) -> Result<Response<UserDeleteBranchResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let name = non_empty(&req.branch_name, "branch_name")?;
        user(req.user.as_ref())?;
        let (refname, old) = self
            .deletion(&repo, "branch", "refs/heads/", &name, &req.expected_old_oid)
            .await?;
        let mut hooks =
            self.node
                .gitlab
                .operation(&metadata, req.repository.as_ref(), req.user.as_ref())?;
        in_transaction(&self.node, &metadata, |ctx| async move {
            hooks.join(&ctx, &repo.path);
            let zero = zero_oid(&old);
            self.update_checked(&repo, &ctx, &hooks, Op::DeleteBranch, &refname, &old, &zero)
                .await
                .map_err(|e| {
                    e.status_with(|f| {
                        if !is_conflict(&f.kind) {
                            return ref_status(f, &refname);
                        }
                        status_with_detail(
                            Code::FailedPrecondition,
                            format!("deleting {refname}: {}", f.stderr()),
                            "gitaly.UserDeleteBranchError",
                            &UserDeleteBranchError {
                                error: Some(user_delete_branch_error::Error::ReferenceUpdate(
                                    ReferenceUpdateError {
                                        reference_name: refname.clone().into_bytes(),
                                        old_oid: old.clone(),
                                        new_oid: zero.clone(),
                                    },
                                )),
                            },
                        )
                    })
                })?;
            Ok(Response::new(UserDeleteBranchResponse {}))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_create_tag(
        &self,
        request: Request<UserCreateTagRequest>,
    ) -> Result<Response<UserCreateTagResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let name = non_empty(&req.tag_name, "tag_name")?;
        let user = user(req.user.as_ref())?;
        let target = names::revision("target_revision", &req.target_revision)?;
        if req.message.contains(&0) {
            return Err(NodeError::invalid("tag message contains a NUL byte").into());
        }
        let refname = format!("refs/tags/{name}");
        Self::check_ref_format(&refname)?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let Some(object) = cat.header(target).await? else {
            return Err(Status::new(
                Code::FailedPrecondition,
                format!("revspec '{target}' not found"),
            ));
        };
        if let Some(existing) = cat.header(&refname).await? {
            return Err(status_with_detail(
                Code::AlreadyExists,
                format!("tag {name:?} already exists"),
                "gitaly.UserCreateTagError",
                &UserCreateTagError {
                    error: Some(user_create_tag_error::Error::ReferenceExists(
                        ReferenceExistsError {
                            reference_name: refname.clone().into_bytes(),
                            oid: existing.oid,
                        },
                    )),
                },
            ));
        }
        let target_commit = cat.commit(&object.oid).await?;
        let zero = zero_oid(&object.oid);
        let (seconds, zone) = commit_time(
            req.timestamp.as_ref(),
            committer_seconds(target_commit.as_ref()),
            user,
        )?;
        let mut hooks =
            self.node
                .gitlab
                .operation(&metadata, req.repository.as_ref(), req.user.as_ref())?;
        in_transaction(&self.node, &metadata, |ctx| async move {
            hooks.join(&ctx, &repo.path);
            let (id, tagger) = if req.message.is_empty() {
                (object.oid.clone(), None)
            } else {
                let mut raw = format!(
                    "object {}\ntype {}\ntag {name}\ntagger ",
                    object.oid, object.kind
                )
                .into_bytes();
                raw.extend(ident(user, seconds, &zone));
                raw.extend(b"\n\n");
                raw.extend(&req.message);
                let id = self
                    .git_oid(&repo, &ctx, &["mktag"], raw)
                    .await
                    .map_err(Status::from)?;
                let tagger = CommitAuthor {
                    name: user.name.clone(),
                    email: user.email.clone(),
                    date: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                    timezone: zone.into_bytes(),
                };
                (id, Some(tagger))
            };
            self.update_checked(&repo, &ctx, &hooks, Op::CreateTag, &refname, &zero, &id)
                .await
                .map_err(|e| e.status(&refname))?;
            Ok(Response::new(UserCreateTagResponse {
                tag: Some(Tag {
                    name: name.into_bytes(),
                    id,
                    target_commit,
                    message_size: req.message.len() as i64,
                    message: req.message,
                    tagger,
                    signature_type: 0,
                }),
            }))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_delete_tag(
        &self,
        request: Request<UserDeleteTagRequest>,
    ) -> Result<Response<UserDeleteTagResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let name = non_empty(&req.tag_name, "tag_name")?;
        user(req.user.as_ref())?;
        let (refname, old) = self
            .deletion(&repo, "tag", "refs/tags/", &name, &req.expected_old_oid)
            .await?;
        let mut hooks =
            self.node
                .gitlab
                .operation(&metadata, req.repository.as_ref(), req.user.as_ref())?;
        in_transaction(&self.node, &metadata, |ctx| async move {
            hooks.join(&ctx, &repo.path);
            let zero = zero_oid(&old);
            match self
                .update_checked(&repo, &ctx, &hooks, Op::DeleteTag, &refname, &old, &zero)
                .await
            {
                Ok(()) => {}
                // Gitaly answers a custom hook's refusal in the response.
                Err(UpdateError::Refused { refusal, .. }) => {
                    return Ok(Response::new(UserDeleteTagResponse {
                        pre_receive_error: delete_tag_refused(&refusal)?,
                    }));
                }
                Err(e) => return Err(e.status(&refname)),
            }
            Ok(Response::new(UserDeleteTagResponse::default()))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_commit_files(
        &self,
        request: Request<Streaming<UserCommitFilesRequest>>,
    ) -> Result<Response<UserCommitFilesResponse>, Status> {
        let (metadata, _, mut stream) = request.into_parts();
        let first = crate::stream::first_message(&mut stream).await?;
        let Some(user_commit_files_request::UserCommitFilesRequestPayload::Header(header)) =
            first.user_commit_files_request_payload
        else {
            return Err(NodeError::invalid("the first message must be the header").into());
        };
        let plan = self.plan_commit(&header).await?;
        let mut hooks = self.node.gitlab.operation(
            &metadata,
            header.repository.as_ref(),
            header.user.as_ref(),
        )?;
        in_transaction(&self.node, &metadata, |ctx| async move {
            hooks.join(&ctx, &plan.repo.path);
            self.commit_files(plan, &ctx, &hooks, stream)
                .await
                .map(Response::new)
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_merge_to_ref(
        &self,
        request: Request<UserMergeToRefRequest>,
    ) -> Result<Response<UserMergeToRefResponse>, Status> {
        self.merge_to_ref(request).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_merge_branch(
        &self,
        request: Request<Streaming<UserMergeBranchRequest>>,
    ) -> Result<Response<BoxStream<UserMergeBranchResponse>>, Status> {
        self.merge_branch(request).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_ff_branch(
        &self,
        request: Request<UserFfBranchRequest>,
    ) -> Result<Response<UserFfBranchResponse>, Status> {
        self.ff_branch(request).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_update_branch(
        &self,
        request: Request<UserUpdateBranchRequest>,
    ) -> Result<Response<UserUpdateBranchResponse>, Status> {
        self.update_branch(request).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_cherry_pick(
        &self,
        request: Request<UserCherryPickRequest>,
    ) -> Result<Response<UserCherryPickResponse>, Status> {
        self.cherry_pick(request).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_revert(
        &self,
        request: Request<UserRevertRequest>,
    ) -> Result<Response<UserRevertResponse>, Status> {
        self.revert(request).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_squash(
        &self,
        request: Request<UserSquashRequest>,
    ) -> Result<Response<UserSquashResponse>, Status> {
        self.squash(request).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_rebase_to_ref(
        &self,
        request: Request<UserRebaseToRefRequest>,
    ) -> Result<Response<UserRebaseToRefResponse>, Status> {
        self.rebase_to_ref(request).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn user_rebase_confirmable(
        &self,
        request: Request<Streaming<UserRebaseConfirmableRequest>>,
    ) -> Result<Response<BoxStream<UserRebaseConfirmableResponse>>, Status> {
        self.rebase_confirmable(request).await
    }
}

/// What UserCommitFiles decided from its header, before any action is read.
struct CommitPlan {
    repo: RepoPath,
    header: UserCommitFilesRequestHeader,
    branch_ref: String,
    parent: Option<refvote_proto::gitaly::GitCommit>,
    /// The branch's value now, or `None` if it does not exist.
    current: Option<String>,
    /// The explicit old value the ref update passes.
    old: Option<String>,
    repo_created: bool,
}

impl OperationSvc {
    /// What UserDeleteBranch and UserDeleteTag check before their transaction: the
    /// ref (`prefix` + `name`, valid for git) must exist; the delete names an explicit
    /// old value, the client's expected_old_oid or else the current one.
    async fn deletion(
        &self,
        repo: &RepoPath,
        what: &str,
        prefix: &str,
        name: &str,
        expected_old_oid: &str,
    ) -> Result<(String, String), Status> {
        let expected = expected_oid(expected_old_oid)?;
        let refname = format!("{prefix}{name}");
        Self::check_ref_format(&refname)?;
        let Some(current) = names::current_value(&self.node.git, &repo.path, &refname).await?
        else {
            return Err(Status::new(
                Code::FailedPrecondition,
                format!("{what} not found: {name:?}"),
            ));
        };
        // An all-zeros expected_old_oid checks nothing (`git update-ref -d REF 0000…`
        // reads it so); the delete still names an explicit old value, the current one.
        let old = expected.filter(|e| !is_zero(e)).unwrap_or(current);
        Ok((refname, old))
    }

    async fn plan_commit(&self, h: &UserCommitFilesRequestHeader) -> Result<CommitPlan, Status> {
        let repo = self.node.storages.existing(h.repository.as_ref())?;
        let user = user(h.user.as_ref())?;
        if user.name.is_empty() || user.email.is_empty() {
            return Err(NodeError::invalid("user name and email must be set").into());
        }
        // A zone the node cannot apply is refused before the transaction is joined.
        fixed_offset(&user.timezone)?;
        let branch = non_empty(&h.branch_name, "branch_name")?;
        if h.commit_message.is_empty() {
            return Err(NodeError::invalid("empty commit_message").into());
        }
        if let Some(start) = &h.start_repository
            && (start.storage_name != h.repository.as_ref().map_or("", |r| &r.storage_name)
                || start.relative_path != h.repository.as_ref().map_or("", |r| &r.relative_path))
        {
            return Err(NodeError::invalid(
                "start_repository other than the target repository is not supported by this node; fetch the start commit first",
            )
            .into());
        }
        let branch_ref = format!("refs/heads/{branch}");
        Self::check_ref_format(&branch_ref)?;
        let expected = expected_oid(&h.expected_old_oid)?;
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let current = cat.header(&branch_ref).await?.map(|x| x.oid);
        let parent = if !h.start_sha.is_empty() {
            if !catfile::is_object_id(&h.start_sha) {
                return Err(NodeError::invalid(format!(
                    "start_sha {:?} is not a full object id",
                    h.start_sha
                ))
                .into());
            }
            Some(cat.commit(&h.start_sha).await?.ok_or_else(|| {
                NodeError::invalid(format!("start_sha {} is not a commit here", h.start_sha))
            })?)
        } else if !h.start_branch_name.is_empty() {
            let start = non_empty(&h.start_branch_name, "start_branch_name")?;
            Some(
                cat.commit(&format!("refs/heads/{start}"))
                    .await?
                    .ok_or_else(|| {
                        NodeError::invalid(format!("start branch {start:?} not found"))
                    })?,
            )
        } else {
            match &current {
                Some(c) => cat.commit(c).await?,
                None => None,
            }
        };
        if let Some(e) = &expected {
            let now = current.clone().unwrap_or_else(|| zero_oid(e));
            if *e != now {
                return Err(Status::new(
                    Code::FailedPrecondition,
                    format!(
                        "Could not update {branch_ref}: it is at {now}, not at expected_old_oid {e}. Please refresh and try again."
                    ),
                ));
            }
        }
        let repo_created = self
            .git_text(&repo, &["for-each-ref", "--count=1", "refs/heads/"])
            .await?
            .is_empty();
        let old = expected.or_else(|| current.clone());
        Ok(CommitPlan {
            repo,
            header: h.clone(),
            branch_ref,
            parent,
            current,
            old,
            repo_created,
        })
    }

    async fn commit_files(
        &self,
        plan: CommitPlan,
        ctx: &WriteContext,
        hooks: &crate::gitlab::operation::OperationHooks,
        mut stream: Streaming<UserCommitFilesRequest>,
    ) -> Result<UserCommitFilesResponse, Status> {
        let repo = &plan.repo;
        let mut files = match &plan.parent {
            Some(p) => self.files(repo, &p.id).await?,
            None => BTreeMap::new(),
        };
        let mut pending: Option<(UserCommitFilesActionHeader, Option<Content>)> = None;
        loop {
            let msg = stream.message().await?;
            let action = match msg.and_then(|m| m.user_commit_files_request_payload) {
                None => None,
                Some(user_commit_files_request::UserCommitFilesRequestPayload::Action(a)) => {
                    a.user_commit_files_action_payload
                }
                Some(user_commit_files_request::UserCommitFilesRequestPayload::Header(_)) => {
                    return Err(NodeError::invalid("only the first message may be a header").into());
                }
            };
            match action {
                Some(user_commit_files_action::UserCommitFilesActionPayload::Content(data)) => {
                    let Some((h, content)) = pending.as_mut() else {
                        return Err(NodeError::invalid("content before any action header").into());
                    };
                    if content.is_none() {
                        *content = Some(Content::start(self, repo, ctx, h.base64_content)?);
                    }
                    content.as_mut().expect("just set").push(&data).await?;
                }
                other => {
                    if let Some((h, content)) = pending.take() {
                        let oid = match content {
                            Some(c) => Some(c.finish().await?),
                            None => None,
                        };
                        self.apply(repo, ctx, &mut files, h, oid).await?;
                    }
                    match other {
                        Some(user_commit_files_action::UserCommitFilesActionPayload::Header(h)) => {
                            pending = Some((h, None));
                        }
                        _ => break,
                    }
                }
            }
        }
        let tree = self.write_tree(repo, &files).await?;
        let h = &plan.header;
        let mut who = Signature::by(
            user(h.user.as_ref())?,
            h.timestamp.as_ref(),
            plan.parent.as_ref(),
        )?;
        if !h.commit_author_name.is_empty() {
            who.author.name = lossy(&h.commit_author_name)?;
        }
        if !h.commit_author_email.is_empty() {
            who.author.email = lossy(&h.commit_author_email)?;
        }
        let parents: Vec<&str> = plan.parent.iter().map(|p| p.id.as_str()).collect();
        let commit = self
            .objects()
            .commit_tree(repo, ctx, &tree, &parents, &who, &h.commit_message)
            .await?;
        // Without force, the branch may only move forward.
        if let (Some(current), false) = (&plan.current, h.force)
            && plan.parent.as_ref().map(|p| &p.id) != Some(current)
        {
            let exit = self
                .node
                .git
                .command(["merge-base", "--is-ancestor", current, &commit])
                .git_dir(&repo.path)
                .status()
                .await?;
            if !exit.success() {
                return Err(Status::new(
                    Code::FailedPrecondition,
                    format!(
                        "Could not update {}: the new commit does not descend from its tip {current}; set force or start from the branch",
                        plan.branch_ref
                    ),
                ));
            }
        }
        let old = plan.old.clone().unwrap_or_else(|| zero_oid(&commit));
        self.update_checked(
            repo,
            ctx,
            hooks,
            Op::CommitFiles,
            &plan.branch_ref,
            &old,
            &commit,
        )
        .await
        .map_err(|e| e.status(&plan.branch_ref))?;
        Ok(UserCommitFilesResponse {
            branch_update: Some(OperationBranchUpdate {
                commit_id: commit,
                repo_created: plan.repo_created,
                branch_created: plan.current.is_none(),
            }),
            ..Default::default()
        })
    }

    /// Applies one action to the file map. `content` is the blob written for it.
    async fn apply(
        &self,
        repo: &RepoPath,
        ctx: &WriteContext,
        files: &mut Files,
        h: UserCommitFilesActionHeader,
        content: Option<String>,
    ) -> Result<(), Status> {
        use user_commit_files_action_header::ActionType as A;
        let action = A::try_from(h.action)
            .map_err(|_| NodeError::invalid(format!("unknown action {}", h.action)))?;
        let path = index_path(&h.file_path)?;
        let mode = if h.execute_filemode {
            MODE_EXEC
        } else {
            MODE_FILE
        };
        let blob = |content: Option<String>| async move {
            match content {
                Some(oid) => Ok::<_, Status>(oid),
                // No content messages: an empty file.
                None => Content::start(self, repo, ctx, false)?.finish().await,
            }
        };
        match action {
            A::Create => {
                must_be_free(files, &path)?;
                let oid = blob(content).await?;
                files.insert(path, (mode.to_owned(), oid));
            }
            A::CreateDir => {
                must_be_free(files, &path)?;
                let oid = blob(None).await?;
                let mut keep = path.clone();
                keep.extend(b"/.gitkeep");
                files.insert(keep, (MODE_FILE.to_owned(), oid));
            }
            A::Update => {
                let (old_mode, _) = must_exist(files, &path)?;
                let oid = blob(content).await?;
                files.insert(path, (old_mode, oid));
            }
            A::Move => {
                let from = index_path(&h.previous_path)?;
                let (old_mode, old_oid) = must_exist(files, &from)?;
                files.remove(&from);
                must_be_free(files, &path)?;
                let oid = if h.infer_content {
                    old_oid
                } else {
                    blob(content).await?
                };
                files.insert(path, (old_mode, oid));
            }
            A::Delete => {
                must_exist(files, &path)?;
                files.remove(&path);
            }
            A::Chmod => {
                let (_, oid) = must_exist(files, &path)?;
                files.insert(path, (mode.to_owned(), oid));
            }
        }
        Ok(())
    }

    /// Every file of commit `commit`: path → (mode, object id).
    async fn files(&self, repo: &RepoPath, commit: &str) -> Result<Files, Status> {
        let (out, exit) = self
            .node
            .git
            .command(["ls-tree", "-r", "-z", "--full-tree", commit])
            .git_dir(&repo.path)
            .output(MAX_LISTING)
            .await?;
        exit.check().map_err(NodeError::from)?;
        let mut files = BTreeMap::new();
        for record in out.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let Some(tab) = record.iter().position(|b| *b == b'\t') else {
                continue;
            };
            let meta = String::from_utf8_lossy(&record[..tab]).into_owned();
            let fields: Vec<&str> = meta.split(' ').collect();
            if let [mode, _, oid] = fields.as_slice() {
                files.insert(
                    record[tab + 1..].to_vec(),
                    ((*mode).to_owned(), (*oid).to_owned()),
                );
            }
        }
        Ok(files)
    }

    /// Writes the tree of `files` through a private index in the storage's private area.
    async fn write_tree(&self, repo: &RepoPath, files: &Files) -> Result<String, Status> {
        let index =
            TempFile(Storages::tmp_dir(&repo.root).join(format!("index-{}", uuid::Uuid::new_v4())));
        let index_path = index.0.display().to_string();
        let mut input = Vec::new();
        for (path, (mode, oid)) in files {
            let kind = if mode == "160000" { "commit" } else { "blob" };
            input.extend(format!("{mode} {kind} {oid}\t").as_bytes());
            input.extend(path);
            input.push(0);
        }
        self.node
            .git
            .command(["update-index", "-z", "--index-info"])
            .git_dir(&repo.path)
            .env("GIT_INDEX_FILE", index_path.clone())
            .stdin(Box::pin(tokio_stream::once(Ok(input))))
            .status()
            .await
            .and_then(|e| e.check())?;
        let run = self
            .node
            .git
            .command(["write-tree"])
            .git_dir(&repo.path)
            .env("GIT_INDEX_FILE", index_path)
            .spawn()
            .map_err(NodeError::from)?;
        oid_of(run).await
    }

    /// git's rules for a ref name (those of `git check-ref-format`, checked by
    /// [`names::valid_ref_name`] without running git).
    fn check_ref_format(refname: &str) -> Result<(), Status> {
        if !names::valid_ref_name(refname) {
            return Err(NodeError::invalid(format!(
                "invalid ref name {refname:?}: see git check-ref-format(1)"
            ))
            .into());
        }
        Ok(())
    }

    async fn git_text(&self, repo: &RepoPath, args: &[&str]) -> Result<String, Status> {
        let (out, exit) = self
            .node
            .git
            .command(args.iter().copied())
            .git_dir(&repo.path)
            .output(SMALL)
            .await?;
        exit.check().map_err(NodeError::from)?;
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    }

    /// A write that prints one object id (mktag, hash-object), with `input` on stdin.
    async fn git_oid(
        &self,
        repo: &RepoPath,
        ctx: &WriteContext,
        args: &[&str],
        input: Vec<u8>,
    ) -> Result<String, NodeError> {
        let run = self
            .node
            .git
            .command(args.iter().copied())
            .git_dir(&repo.path)
            .write_in(ctx)
            .stdin(Box::pin(tokio_stream::once(Ok(input))))
            .spawn()?;
        oid_of(run)
            .await
            .map_err(|s| NodeError::invalid(s.message().to_owned()))
    }

    /// Moves `refname` from `old` to `new` (all zeros: must not exist, or delete) through
    /// [`update::apply`], the one path every ref write of the node takes.
    async fn set_ref(
        &self,
        repo: &RepoPath,
        ctx: &WriteContext,
        refname: &str,
        old: &str,
        new: &str,
    ) -> Result<(), UpdateFailure> {
        let u = RefUpdate {
            name: refname.to_owned(),
            old: old.to_owned(),
            new: new.to_owned(),
        };
        update::apply(&self.node.git, &repo.path, ctx, &[u]).await
    }
    /// The objects this service writes, built with its node's git.
    fn objects(&self) -> Objects<'_> {
        Objects {
            git: &self.node.git,
        }
    }

    /// The end of every operation that moves a ref on a user's behalf: GitLab's checks
    /// of the change (a refusal shaped as `op` answers it), the update through
    /// [`OperationSvc::set_ref`], and the record of it for post-receive.
    #[allow(clippy::too_many_arguments)]
    async fn update_checked(
        &self,
        repo: &RepoPath,
        ctx: &WriteContext,
        hooks: &OperationHooks,
        op: Op,
        refname: &str,
        old: &str,
        new: &str,
    ) -> Result<(), UpdateError> {
        hooks
            .check(refname, old, new)
            .await
            .map_err(|refusal| UpdateError::Refused { op, refusal })?;
        self.set_ref(repo, ctx, refname, old, new)
            .await
            .map_err(UpdateError::Failed)?;
        hooks.committed(refname, old, new);
        Ok(())
    }

    /// The old value a ref update of `refname` passes: the request's
    /// `expected_old_oid` (`raw`, checked to name an object here), else where the ref
    /// points now; `None` when it names nothing and the ref does not exist.
    async fn expected_or_current(
        &self,
        cat: &mut CatFile,
        repo: &RepoPath,
        raw: &str,
        refname: &str,
    ) -> Result<Option<String>, Status> {
        if let Some(old) = expected_commitish(cat, raw).await? {
            return Ok(Some(old));
        }
        Ok(names::current_value(&self.node.git, &repo.path, refname).await?)
    }
}

/// How moving one ref for a user failed: GitLab refused it, or the update did.
enum UpdateError {
    Refused { op: Op, refusal: Refusal },
    Failed(UpdateFailure),
}

impl UpdateError {
    /// The answer: a refusal as it is, a failed update as `failed` words it.
    fn status_with(self, failed: impl FnOnce(UpdateFailure) -> Status) -> Status {
        match self {
            UpdateError::Refused { op, refusal } => refusal_status(op, &refusal),
            UpdateError::Failed(f) => failed(f),
        }
    }

    /// The answer, a failed update as [`ref_status`] words it.
    fn status(self, refname: &str) -> Status {
        self.status_with(|f| ref_status(f, refname))
    }
}

/// Gitaly's answer when a ref it writes without hooks lost a race (UserMergeToRef,
/// UserRebaseToRef, UserUpdateBranch): no git text after it.
fn refresh_status(f: UpdateFailure, refname: &str) -> Status {
    if is_conflict(&f.kind) {
        return Status::new(
            Code::FailedPrecondition,
            format!("Could not update {refname}. Please refresh and try again."),
        );
    }
    ref_status(f, refname)
}

/// The object a request's `expected_old_oid` names (`None` when it is empty): a full
/// object id that exists here, or all zeros.
async fn expected_commitish(cat: &mut CatFile, raw: &str) -> Result<Option<String>, Status> {
    if raw.is_empty() {
        return Ok(None);
    }
    if !catfile::is_object_id(raw) {
        return Err(NodeError::invalid(format!(
            "invalid expected old object ID: {raw:?} is not a full object id"
        ))
        .into());
    }
    let oid = raw.to_ascii_lowercase();
    if is_zero(&oid) {
        return Ok(Some(oid));
    }
    match cat.header(&oid).await? {
        Some(h) => Ok(Some(h.oid)),
        None => Err(NodeError::invalid(format!(
            "cannot resolve expected old object ID: {oid} is not an object here"
        ))
        .into()),
    }
}

/// A user with the name and email a commit needs.
fn signed_user(u: Option<&User>) -> Result<&User, Status> {
    let u = user(u)?;
    if u.email.is_empty() {
        return Err(NodeError::invalid("empty user email").into());
    }
    if u.name.is_empty() {
        return Err(NodeError::invalid("empty user name").into());
    }
    Ok(u)
}

/// The ref lost a race: it moved, is locked, or something is in the way of its path.
fn is_conflict(kind: &FailureKind) -> bool {
    matches!(
        kind,
        FailureKind::Locked(_) | FailureKind::Mismatch(_) | FailureKind::Unlockable(_)
    )
}

/// How these RPCs answer a ref update that failed; git's own words follow.
fn ref_status(f: UpdateFailure, refname: &str) -> Status {
    match &f.kind {
        // What Gitaly returns when its transaction vote fails.
        FailureKind::Refused(_) => Status::new(
            Code::Aborted,
            format!(
                "updating {refname} was refused by the replicas' vote: {}",
                f.stderr()
            ),
        ),
        kind if is_conflict(kind) => Status::new(
            Code::FailedPrecondition,
            format!(
                "Could not update {refname}. Please refresh and try again: {}",
                f.stderr()
            ),
        ),
        _ => NodeError::from(f.git).into(),
    }
}

type Files = BTreeMap<Vec<u8>, (String, String)>;

/// A blob being written by `git hash-object -w --stdin` as its content arrives.
struct Content {
    input: mpsc::Sender<Result<Vec<u8>, Status>>,
    run: Run,
    base64: bool,
    carry: Vec<u8>,
}

impl Content {
    fn start(
        svc: &OperationSvc,
        repo: &RepoPath,
        ctx: &WriteContext,
        base64: bool,
    ) -> Result<Content, Status> {
        let (input, rx) = mpsc::channel(4);
        let run = svc
            .node
            .git
            .command(["hash-object", "-w", "--stdin"])
            .git_dir(&repo.path)
            .write_in(ctx)
            .stdin(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .spawn()
            .map_err(NodeError::from)?;
        Ok(Content {
            input,
            run,
            base64,
            carry: Vec::new(),
        })
    }

    async fn push(&mut self, data: &[u8]) -> Result<(), Status> {
        let bytes = if self.base64 {
            // Decode whole 4-character groups; keep the rest for the next chunk.
            self.carry
                .extend(data.iter().filter(|b| !b.is_ascii_whitespace()));
            let whole = self.carry.len() / 4 * 4;
            let group: Vec<u8> = self.carry.drain(..whole).collect();
            base64::engine::general_purpose::STANDARD
                .decode(group)
                .map_err(|e| NodeError::invalid(format!("content is not valid base64: {e}")))?
        } else {
            data.to_vec()
        };
        if !bytes.is_empty() && self.input.send(Ok(bytes)).await.is_err() {
            return Err(Status::internal("git hash-object stopped reading"));
        }
        Ok(())
    }

    async fn finish(self) -> Result<String, Status> {
        if !self.carry.is_empty() {
            return Err(NodeError::invalid("content is not valid base64: truncated").into());
        }
        drop(self.input);
        oid_of(self.run).await
    }
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn index_error(path: &[u8], kind: index_error::ErrorType, code: Code, what: &str) -> Status {
    status_with_detail(
        code,
        format!("{what}: {:?}", String::from_utf8_lossy(path)),
        "gitaly.UserCommitFilesError",
        &UserCommitFilesError {
            error: Some(user_commit_files_error::Error::IndexUpdate(IndexError {
                path: path.to_vec(),
                error_type: kind as i32,
            })),
        },
    )
}

/// Gitaly's path rules for file actions.
fn index_path(path: &[u8]) -> Result<Vec<u8>, Status> {
    use index_error::ErrorType as E;
    if path.is_empty() {
        return Err(index_error(
            path,
            E::EmptyPath,
            Code::InvalidArgument,
            "empty path",
        ));
    }
    let parts: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
    if parts.iter().any(|p| *p == b"..") {
        return Err(index_error(
            path,
            E::DirectoryTraversal,
            Code::InvalidArgument,
            "path traverses out of the repository",
        ));
    }
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == b"." || p.eq_ignore_ascii_case(b".git"))
        || path.contains(&0)
        || path.contains(&b'\n')
    {
        return Err(index_error(
            path,
            E::InvalidPath,
            Code::InvalidArgument,
            "invalid path",
        ));
    }
    Ok(path.to_vec())
}

/// `path` must name neither a file, nor a directory, nor lie below a file.
fn must_be_free(files: &Files, path: &[u8]) -> Result<(), Status> {
    use index_error::ErrorType as E;
    if files.contains_key(path) {
        return Err(index_error(
            path,
            E::FileExists,
            Code::AlreadyExists,
            "file already exists",
        ));
    }
    let mut dir = path.to_vec();
    dir.push(b'/');
    if files
        .range(dir.clone()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(&dir))
    {
        return Err(index_error(
            path,
            E::DirectoryExists,
            Code::AlreadyExists,
            "a directory already exists there",
        ));
    }
    for (i, b) in path.iter().enumerate() {
        if *b == b'/' && files.contains_key(&path[..i]) {
            return Err(index_error(
                &path[..i],
                E::FileExists,
                Code::AlreadyExists,
                "a file is in the way of the path",
            ));
        }
    }
    Ok(())
}

fn must_exist(files: &Files, path: &[u8]) -> Result<(String, String), Status> {
    files.get(path).cloned().ok_or_else(|| {
        index_error(
            path,
            index_error::ErrorType::FileNotFound,
            Code::NotFound,
            "file not found",
        )
    })
}

fn user(user: Option<&User>) -> Result<&User, Status> {
    user.ok_or_else(|| {
        NodeError::invalid("empty user: set the GitLab user the change is made for").into()
    })
}

fn non_empty(name: &[u8], what: &str) -> Result<String, Status> {
    if name.is_empty() {
        return Err(NodeError::invalid(format!("empty {what}")).into());
    }
    Ok(String::from_utf8(name.to_vec())
        .map_err(|_| NodeError::invalid(format!("{what} is not UTF-8")))?)
}

fn expected_oid(s: &str) -> Result<Option<String>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    if !catfile::is_object_id(s) {
        return Err(
            NodeError::invalid(format!("expected_old_oid {s:?} is not a full object id")).into(),
        );
    }
    Ok(Some(s.to_ascii_lowercase()))
}

fn zero_oid(like: &str) -> String {
    "0".repeat(like.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::GitError;

    fn failure(kind: FailureKind, stderr: &str) -> UpdateFailure {
        UpdateFailure {
            kind,
            git: GitError::Failed {
                command: "update-ref".into(),
                status: "exit status: 128".into(),
                stderr: stderr.into(),
            },
        }
    }

    #[test]
    fn ref_failures_answer_as_gitaly() {
        let s = ref_status(
            failure(
                FailureKind::Refused("refvote: update rejected".into()),
                "refvote: update rejected\nfatal: ref updates aborted by hook",
            ),
            "refs/heads/a",
        );
        assert_eq!(s.code(), Code::Aborted);
        assert_eq!(
            s.message(),
            "updating refs/heads/a was refused by the replicas' vote: refvote: update rejected\nfatal: ref updates aborted by hook"
        );
        for kind in [
            FailureKind::Locked("refs/heads/a".into()),
            FailureKind::Mismatch("refs/heads/a".into()),
            FailureKind::Unlockable("refs/heads/a".into()),
        ] {
            let s = ref_status(failure(kind, "fatal: cannot lock ref"), "refs/heads/a");
            assert_eq!(s.code(), Code::FailedPrecondition);
            assert_eq!(
                s.message(),
                "Could not update refs/heads/a. Please refresh and try again: fatal: cannot lock ref"
            );
        }
        for kind in [
            FailureKind::MissingObject("refs/heads/a".into()),
            FailureKind::Other,
        ] {
            let s = ref_status(failure(kind, "fatal: odd"), "refs/heads/a");
            assert_eq!(s.code(), Code::Internal, "{s:?}");
            assert!(s.message().contains("fatal: odd"), "{s:?}");
        }
    }
}
