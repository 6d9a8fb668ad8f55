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
    GitCommit, MergeConflictError, OperationBranchUpdate, ReferenceUpdateError, User,
    UserFfBranchRequest, UserFfBranchResponse, UserMergeBranchError, UserMergeBranchRequest,
    UserMergeBranchResponse, UserMergeToRefRequest, UserMergeToRefResponse,
    UserUpdateBranchRequest, UserUpdateBranchResponse, user_merge_branch_error,
};
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::{
    OperationSvc, in_transaction, is_conflict, lossy, non_empty, oid_of, ref_status, user, zero_oid,
};
use crate::catfile::{self, CatFile};
use crate::detail::status_with_detail;
use crate::error::NodeError;
use crate::gitlab::operation::{Op, refusal_status, update_branch_refused};
use crate::refs::names::{self, is_zero};
use crate::signature::{commit_time, git_date};
use crate::storage::RepoPath;
use crate::tx::{WriteContext, WriteIn};

/// Bound on `git merge-tree`'s answer: the tree, the conflicting names, git's messages.
const MERGE_TREE_OUTPUT: usize = 16 * 1024 * 1024;

/// How `git merge-tree --write-tree` ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum MergeTree {
    Clean(String),
    /// The paths that conflict, each once.
    Conflict(Vec<Vec<u8>>),
}

/// Reads `git merge-tree --write-tree --name-only -z`'s stdout for exit code `code`:
/// the tree id, then (on a conflict) each conflicting path, then an empty field before
/// git's messages.
pub(super) fn read_merge_tree(out: &[u8], code: Option<i32>) -> Result<MergeTree, String> {
    let mut fields = out.split(|b| *b == 0);
    let tree = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    match code {
        Some(0) if catfile::is_object_id(&tree) => Ok(MergeTree::Clean(tree)),
        Some(1) if catfile::is_object_id(&tree) => Ok(MergeTree::Conflict(
            fields
                .take_while(|f| !f.is_empty())
                .map(<[u8]>::to_vec)
                .collect(),
        )),
        _ => Err(format!(
            "git merge-tree answered {:?} with exit code {code:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        )),
    }
}

/// Who writes a commit, and when (`git_date` form).
pub(super) struct Signature<'a> {
    pub author: &'a User,
    pub committer: &'a User,
    pub date: String,
}

impl OperationSvc {
    /// The merge of `theirs` into `ours`: its tree written (inside `ctx`), or the paths
    /// that conflict.
    pub(super) async fn merge_tree(
        &self,
        repo: &RepoPath,
        ctx: &WriteContext,
        ours: &str,
        theirs: &str,
    ) -> Result<MergeTree, Status> {
        let (out, exit) = self
            .node
            .git
            .command([
                "merge-tree",
                "--write-tree",
                "--allow-unrelated-histories",
                "--name-only",
                "-z",
                ours,
                theirs,
            ])
            .git_dir(&repo.path)
            .write_in(ctx)
            .output(MERGE_TREE_OUTPUT)
            .await?;
        read_merge_tree(&out, exit.code()).map_err(Status::internal)
    }

    /// Writes the commit of `tree` with `parents` (inside `ctx`), never signed.
    pub(super) async fn commit_tree(
        &self,
        repo: &RepoPath,
        ctx: &WriteContext,
        tree: &str,
        parents: &[&str],
        who: &Signature<'_>,
        message: &[u8],
    ) -> Result<String, Status> {
        let mut cmd = self
            .node
            .git
            .command(["commit-tree", "--no-gpg-sign"])
            .git_dir(&repo.path)
            .write_in(ctx);
        for p in parents {
            cmd = cmd.arg("-p").arg(*p);
        }
        for (role, u) in [("AUTHOR", who.author), ("COMMITTER", who.committer)] {
            cmd = cmd
                .env(&format!("GIT_{role}_NAME"), lossy(&u.name)?)
                .env(&format!("GIT_{role}_EMAIL"), lossy(&u.email)?)
                .env(&format!("GIT_{role}_DATE"), who.date.clone());
        }
        oid_of(
            cmd.arg(tree)
                .stdin(Box::pin(tokio_stream::once(Ok(message.to_vec()))))
                .spawn()
                .map_err(NodeError::from)?,
        )
        .await
    }

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
        let old = match expected_commitish(&mut cat, &req.expected_old_oid).await? {
            Some(old) => old,
            None => names::current_value(&self.node.git, &repo.path, &target)
                .await?
                .unwrap_or_else(|| zero_oid(&ours.id)),
        };
        let (seconds, zone) = commit_time(
            req.timestamp.as_ref(),
            super::committer_seconds(Some(&ours)),
            who,
        )?;
        in_transaction(&self.node, &metadata, |ctx| async move {
            let tree = match self.merge_tree(&repo, &ctx, &ours.id, &theirs.id).await? {
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
            let sig = Signature {
                author: who,
                committer: who,
                date: git_date(seconds, &zone),
            };
            let commit = self
                .commit_tree(&repo, &ctx, &tree, &[&ours.id, &theirs.id], &sig, &req.message)
                .await?;
            self.set_ref(&repo, &ctx, &target, &old, &commit)
                .await
                .map_err(|f| match &f.kind {
                    kind if is_conflict(kind) => Status::new(
                        Code::FailedPrecondition,
                        format!("Could not update {target}. Please refresh and try again."),
                    ),
                    _ => ref_status(f, &target),
                })?;
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
        let ours = match expected_commitish(&mut cat, &first.expected_old_oid).await? {
            Some(old) => old,
            None => names::current_value(&self.node.git, &repo.path, &refname)
                .await?
                .ok_or_else(|| {
                    Status::new(Code::NotFound, format!("reference not found: {refname}"))
                })?,
        };
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
        let who = signed_user(first.user.as_ref())?.clone();
        let (seconds, zone) = commit_time(
            first.timestamp.as_ref(),
            super::committer_seconds(Some(&ours_commit)),
            &who,
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
                let tree = match svc.merge_tree(&repo, &ctx, &ours, &theirs.id).await? {
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
                let sig = Signature {
                    author: &who,
                    committer: &who,
                    date: git_date(seconds, &zone),
                };
                // A squash merge keeps its squashed commit's one parent line: the
                // result sits on the branch alone.
                let parents: Vec<&str> = if first.squash {
                    vec![&ours]
                } else {
                    vec![&ours, &theirs.id]
                };
                let commit = svc
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
                hooks
                    .check(&refname, &ours, &commit)
                    .await
                    .map_err(|r| refusal_status(Op::MergeBranch, &r))?;
                if let Err(f) = svc.set_ref(&repo, &ctx, &refname, &ours, &commit).await {
                    return Err(if is_conflict(&f.kind) {
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
                    } else {
                        ref_status(f, &refname)
                    });
                }
                hooks.committed(&refname, &ours, &commit);
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
        let current = match expected_commitish(&mut cat, &req.expected_old_oid).await? {
            Some(old) => old,
            None => names::current_value(&self.node.git, &repo.path, &refname)
                .await?
                .ok_or_else(|| NodeError::invalid(format!("reference not found: {refname}")))?,
        };
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
            hooks
                .check(&refname, &current, &target)
                .await
                .map_err(|r| refusal_status(Op::FFBranch, &r))?;
            match self.set_ref(&repo, &ctx, &refname, &current, &target).await {
                Ok(()) => {}
                // Gitaly answers a lost race with an empty response, as its Ruby
                // ancestor did.
                Err(f) if is_conflict(&f.kind) => {
                    return Ok(Response::new(UserFfBranchResponse::default()));
                }
                Err(f) => return Err(ref_status(f, &refname)),
            }
            hooks.committed(&refname, &current, &target);
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
            if let Err(r) = hooks.check(&refname, &old, &new).await {
                // Gitaly answers a custom hook's refusal in the response, not as an
                // error.
                return Ok(Response::new(UserUpdateBranchResponse {
                    pre_receive_error: update_branch_refused(&branch, &r)?,
                }));
            }
            self.set_ref(&repo, &ctx, &refname, &old, &new)
                .await
                .map_err(|f| match &f.kind {
                    kind if is_conflict(kind) => Status::new(
                        Code::FailedPrecondition,
                        format!("Could not update {refname}. Please refresh and try again."),
                    ),
                    _ => ref_status(f, &refname),
                })?;
            hooks.committed(&refname, &old, &new);
            Ok(Response::new(UserUpdateBranchResponse::default()))
        })
        .await
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

#[cfg(test)]
mod tests {
    use super::*;

    const TREE: &str = "ce3637f50ccddc067010db673c40a8ad44984eb7";

    #[test]
    fn a_clean_merge_is_its_tree() {
        let out = format!("{TREE}\0");
        assert_eq!(
            read_merge_tree(out.as_bytes(), Some(0)),
            Ok(MergeTree::Clean(TREE.into()))
        );
    }

    #[test]
    fn a_conflict_names_each_path_once_and_leaves_git_messages_out() {
        // What git 2.47 prints for a content conflict in `f` and `d/g`.
        let out = format!(
            "{TREE}\0f\0d/g\0\x001\0f\0Auto-merging\0Auto-merging f\n\x001\0f\0CONFLICT (contents)\0CONFLICT (content): Merge conflict in f\n\0"
        );
        assert_eq!(
            read_merge_tree(out.as_bytes(), Some(1)),
            Ok(MergeTree::Conflict(vec![b"f".to_vec(), b"d/g".to_vec()]))
        );
    }

    #[test]
    fn anything_else_is_an_error() {
        assert!(read_merge_tree(b"fatal: bad revision\n", Some(128)).is_err());
        assert!(read_merge_tree(b"", Some(0)).is_err());
        assert!(read_merge_tree(b"notanoid\0", Some(1)).is_err());
    }
}
