//! Changes of one commit applied to a branch from GitLab's UI: `UserCherryPick` (the
//! commit's changes against its first parent, so a merge is picked with mainline 1, as
//! `git cherry-pick -m 1`) and `UserRevert` (the reverse changes, against the same
//! parent). Both are Gitaly's merge-tree forms: `git merge-tree --merge-base` of the
//! start commit and the picked one (its parent for a revert), committed on the start
//! with the request's message; a cherry-pick keeps the commit's author, a revert is
//! authored by the user. The branch (created from the start branch if missing) must
//! still descend from where it was, and moves through GitLab's checks in the vote.
//! `dry_run` computes the commit and moves nothing.

use refvote_proto::gitaly::{
    ChangesAlreadyAppliedError, GitCommit, MergeConflictError, NotAncestorError,
    OperationBranchUpdate, Repository, User, UserCherryPickError, UserCherryPickRequest,
    UserCherryPickResponse, UserRevertError, UserRevertRequest, UserRevertResponse,
    user_cherry_pick_error, user_revert_error,
};
use tonic::{Code, Request, Response, Status};

use super::objects::{Ident, MergeTree, Signature};
use super::{OperationSvc, in_transaction, non_empty, zero_oid};
use crate::catfile::CatFile;
use crate::detail::status_with_detail;
use crate::error::NodeError;
use crate::gitlab::operation::Op;

/// The empty tree: what a root commit's revert merges towards.
const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// Which of the two, for its words and its error's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    CherryPick,
    Revert,
}

/// The fields both requests share.
struct PickRequest<'a> {
    repository: Option<&'a Repository>,
    user: Option<&'a User>,
    commit: Option<&'a GitCommit>,
    branch_name: &'a [u8],
    message: &'a [u8],
    start_branch_name: &'a [u8],
    start_repository: Option<&'a Repository>,
    dry_run: bool,
    timestamp: Option<&'a prost_types::Timestamp>,
    expected_old_oid: &'a str,
}

impl Pick {
    fn name(self) -> &'static str {
        match self {
            Pick::CherryPick => "cherry-pick",
            Pick::Revert => "revert",
        }
    }

    fn error(self, code: Code, message: String, error: PickError) -> Status {
        match self {
            Pick::CherryPick => {
                use user_cherry_pick_error::Error as E;
                let e = match error {
                    PickError::Conflict(m) => E::CherryPickConflict(m),
                    PickError::Empty => E::ChangesAlreadyApplied(ChangesAlreadyAppliedError {}),
                    PickError::Diverged(n) => E::TargetBranchDiverged(n),
                };
                status_with_detail(
                    code,
                    message,
                    "gitaly.UserCherryPickError",
                    &UserCherryPickError { error: Some(e) },
                )
            }
            Pick::Revert => {
                use user_revert_error::Error as E;
                let e = match error {
                    PickError::Conflict(m) => E::MergeConflict(m),
                    PickError::Empty => E::ChangesAlreadyApplied(ChangesAlreadyAppliedError {}),
                    PickError::Diverged(n) => E::NotAncestor(n),
                };
                status_with_detail(
                    code,
                    message,
                    "gitaly.UserRevertError",
                    &UserRevertError { error: Some(e) },
                )
            }
        }
    }
}

enum PickError {
    Conflict(MergeConflictError),
    Empty,
    Diverged(NotAncestorError),
}

impl OperationSvc {
    pub(super) async fn cherry_pick(
        &self,
        request: Request<UserCherryPickRequest>,
    ) -> Result<Response<UserCherryPickResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let r = PickRequest {
            repository: req.repository.as_ref(),
            user: req.user.as_ref(),
            commit: req.commit.as_ref(),
            branch_name: &req.branch_name,
            message: &req.message,
            start_branch_name: &req.start_branch_name,
            start_repository: req.start_repository.as_ref(),
            dry_run: req.dry_run,
            timestamp: req.timestamp.as_ref(),
            expected_old_oid: &req.expected_old_oid,
        };
        let author = (!req.commit_author_name.is_empty() && !req.commit_author_email.is_empty())
            .then(|| {
                (
                    req.commit_author_name.trim_ascii(),
                    req.commit_author_email.trim_ascii(),
                )
            });
        let update = self.pick(&metadata, Pick::CherryPick, &r, author).await?;
        Ok(Response::new(UserCherryPickResponse {
            branch_update: Some(update),
        }))
    }

    pub(super) async fn revert(
        &self,
        request: Request<UserRevertRequest>,
    ) -> Result<Response<UserRevertResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let r = PickRequest {
            repository: req.repository.as_ref(),
            user: req.user.as_ref(),
            commit: req.commit.as_ref(),
            branch_name: &req.branch_name,
            message: &req.message,
            start_branch_name: &req.start_branch_name,
            start_repository: req.start_repository.as_ref(),
            dry_run: req.dry_run,
            timestamp: req.timestamp.as_ref(),
            expected_old_oid: &req.expected_old_oid,
        };
        let update = self.pick(&metadata, Pick::Revert, &r, None).await?;
        Ok(Response::new(UserRevertResponse {
            branch_update: Some(update),
            ..Default::default()
        }))
    }

    /// A cherry-pick or revert (`kind`) of `r`; `author` overrides a cherry-pick's
    /// kept author (name, email), dated at the request's time.
    async fn pick(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        kind: Pick,
        r: &PickRequest<'_>,
        author: Option<(&[u8], &[u8])>,
    ) -> Result<OperationBranchUpdate, Status> {
        let repo = self.node.storages.existing(r.repository)?;
        let invalid = |what: &str| -> Status { NodeError::invalid(what.to_owned()).into() };
        let who = r.user.ok_or_else(|| invalid("empty User"))?;
        let commit = r.commit.ok_or_else(|| invalid("empty Commit"))?;
        if r.branch_name.is_empty() {
            return Err(invalid("empty BranchName"));
        }
        if r.message.is_empty() {
            return Err(invalid("empty Message"));
        }
        // As for UserCommitFiles: a start repository must be the target itself (the
        // router routes one virtual storage under the target's relative path).
        if let Some(start) = r.start_repository
            && start.relative_path != r.repository.map_or("", |x| &x.relative_path)
        {
            return Err(invalid(
                "start_repository other than the target repository is not supported by this node; fetch the start branch first",
            ));
        }
        let branch = non_empty(r.branch_name, "BranchName")?;
        let refname = format!("refs/heads/{branch}");
        Self::check_ref_format(&refname)?;
        let start_name = if r.start_branch_name.is_empty() {
            branch.clone()
        } else {
            non_empty(r.start_branch_name, "StartBranchName")?
        };
        let mut cat = CatFile::start(&self.node.git, &repo)?;
        let start =
            match crate::refs::names::revision("start_branch_name", start_name.as_bytes()) {
                Ok(rev) => cat.commit(rev).await?,
                Err(_) => None,
            }
            .ok_or_else(|| invalid("resolve start ref: reference not found"))?;
        let repo_created = self
            .git_text(&repo, &["for-each-ref", "--count=1", "refs/heads/"])
            .await?
            .is_empty();
        let mut sig = Signature::by(who, r.timestamp, Some(&start))?;
        let picked = match crate::catfile::is_object_id(&commit.id) {
            true => cat.commit(&commit.id).await?,
            false => None,
        }
        .ok_or_else(|| match kind {
            Pick::CherryPick => Status::new(
                Code::NotFound,
                format!(
                    "cherry-pick: commit lookup: commit not found: {:?}",
                    commit.id
                ),
            ),
            Pick::Revert => Status::new(Code::NotFound, "revert commit lookup: commit not found"),
        })?;
        let parent = picked.parent_ids.first().cloned();
        let (theirs, base) = match kind {
            Pick::CherryPick => {
                let Some(parent) = parent else {
                    return Err(Status::internal(format!(
                        "cherry-pick command: {} has no parent to pick it against",
                        picked.id
                    )));
                };
                if let Some((name, email)) = author {
                    sig.author = Ident {
                        name: String::from_utf8_lossy(name).into_owned(),
                        email: String::from_utf8_lossy(email).into_owned(),
                        date: sig.committer.date.clone(),
                    };
                } else {
                    sig.author = Ident::of_commit_author(picked.author.as_ref());
                }
                (picked.id.clone(), parent)
            }
            Pick::Revert => (
                parent.unwrap_or_else(|| EMPTY_TREE.to_owned()),
                picked.id.clone(),
            ),
        };
        let (old, branch_created) = match self
            .expected_or_current(&mut cat, &repo, r.expected_old_oid, &refname)
            .await?
        {
            Some(old) => (old, false),
            None => (zero_oid(&start.id), true),
        };
        let dry_run = r.dry_run;
        let mut hooks = self.node.gitlab.operation(metadata, r.repository, r.user)?;
        let message = r.message.to_vec();
        in_transaction(&self.node, metadata, |ctx| async move {
            hooks.join(&ctx, &repo.path);
            let tree = match self
                .objects()
                .merge_tree(&repo, &ctx, &start.id, &theirs, Some(&base))
                .await?
            {
                MergeTree::Clean(tree) => tree,
                MergeTree::Conflict(files) => {
                    let message = match kind {
                        Pick::CherryPick => "cherry pick: merge: there are conflicting files",
                        Pick::Revert => "revert: there are conflicting files",
                    };
                    return Err(kind.error(
                        Code::FailedPrecondition,
                        message.into(),
                        PickError::Conflict(MergeConflictError {
                            conflicting_files: files,
                            conflicting_commit_ids: Vec::new(),
                        }),
                    ));
                }
            };
            if tree == start.tree_id {
                return Err(kind.error(
                    Code::FailedPrecondition,
                    format!(
                        "{}: could not apply because the result was empty",
                        kind.name()
                    ),
                    PickError::Empty,
                ));
            }
            let mut new = self
                .objects()
                .commit_tree(&repo, &ctx, &tree, &[&start.id], &sig, &message)
                .await?;
            if dry_run {
                new = start.id.clone();
            }
            if !branch_created {
                let exit = self
                    .node
                    .git
                    .command(["merge-base", "--is-ancestor", &old, &new])
                    .git_dir(&repo.path)
                    .status()
                    .await?;
                if !exit.success() {
                    return Err(kind.error(
                        Code::FailedPrecondition,
                        format!("{}: branch diverged", kind.name()),
                        PickError::Diverged(NotAncestorError {
                            parent_revision: old.clone().into_bytes(),
                            child_revision: new.clone().into_bytes(),
                        }),
                    ));
                }
            }
            // A dry run onto the branch itself changes nothing: no update to vote.
            if old != new {
                let op = match kind {
                    Pick::CherryPick => Op::CherryPick,
                    Pick::Revert => Op::Revert,
                };
                self.update_checked(&repo, &ctx, &hooks, op, &refname, &old, &new)
                    .await
                    .map_err(|e| {
                        e.status_with(|f| {
                            Status::internal(format!("update reference with hooks: {}", f.stderr()))
                        })
                    })?;
            }
            Ok(OperationBranchUpdate {
                commit_id: new,
                repo_created,
                branch_created,
            })
        })
        .await
    }
}
