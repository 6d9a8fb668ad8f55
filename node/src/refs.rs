//! RefService: questions about refs, answered by git, and ref writes (DeleteRefs,
//! UpdateReferences), each one atomic `git update-ref` with explicit old values.
//!
//! The logic lives in submodules: [`names`] (validation, current values), [`update`]
//! (the one update-ref run), [`write`] (the two write RPCs' rules and errors), [`list`]
//! (streamed listings), [`objects`] (commits and tags); typed error details come from
//! [`crate::detail`].

mod list;
pub(super) mod names;
mod objects;
pub(super) mod update;
mod write;

use std::sync::Arc;

use refvote_proto::gitaly::find_local_branches_request::SortBy;
use refvote_proto::gitaly::ref_service_server::RefService;
use refvote_proto::gitaly::{
    Branch, DeleteRefsRequest, DeleteRefsResponse, FindBranchRequest, FindBranchResponse,
    FindDefaultBranchNameRequest, FindDefaultBranchNameResponse, FindLocalBranchesRequest,
    FindLocalBranchesResponse, FindTagError, FindTagRequest, FindTagResponse, ListRefsRequest,
    ListRefsResponse, RefExistsRequest, RefExistsResponse, ReferenceNotFoundError,
    UpdateReferencesRequest, UpdateReferencesResponse, find_tag_error,
};
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::detail;
use super::error::NodeError;
use super::storage::RepoPath;
use super::tx::WriteContext;
use crate::state::NodeState;
use crate::stream::first_message;

/// Most updates one UpdateReferences call may carry (they are held until applied).
const MAX_UPDATES: usize = 100_000;

/// Bound on the small answers read whole here (a few ref names).
const SMALL_OUTPUT: usize = 64 * 1024;

pub struct RefSvc {
    node: Arc<NodeState>,
}

impl RefSvc {
    pub fn new(node: Arc<NodeState>) -> RefSvc {
        RefSvc { node }
    }
}

#[tonic::async_trait]
impl RefService for RefSvc {
    /// Gitaly's rule: with `head_only`, whatever HEAD names; otherwise HEAD's branch if
    /// it exists, else the only branch, else `main`, else `master`, else the first
    /// branch; empty when there is no branch at all.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_default_branch_name(
        &self,
        request: Request<FindDefaultBranchNameRequest>,
    ) -> Result<Response<FindDefaultBranchNameResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let head = self.head_target(&repo).await?;
        let name = if req.head_only {
            head.unwrap_or_default()
        } else {
            self.default_branch(&repo, head).await?
        };
        Ok(Response::new(FindDefaultBranchNameResponse {
            name: name.into_bytes(),
        }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn ref_exists(
        &self,
        request: Request<RefExistsRequest>,
    ) -> Result<Response<RefExistsResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let name = std::str::from_utf8(&req.r#ref)
            .ok()
            .filter(|r| r.starts_with("refs/") && !r.chars().any(|c| c.is_ascii_control()))
            .ok_or_else(|| {
                NodeError::invalid(
                    "invalid refname: ref must be fully qualified, e.g. refs/heads/main",
                )
            })?;
        let exit = self
            .node
            .git
            .command(["show-ref", "--verify", "--quiet"])
            .arg(name)
            .git_dir(&repo.path)
            .status()
            .await?;
        let value = exit.answer()?;
        Ok(Response::new(RefExistsResponse { value }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_refs(
        &self,
        request: Request<ListRefsRequest>,
    ) -> Result<Response<BoxStream<ListRefsResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        Ok(Response::new(list::list_refs(
            &self.node.git,
            repo.path,
            req,
        )?))
    }

    /// Gitaly's answer for a missing branch is an empty response, not an error.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_branch(
        &self,
        request: Request<FindBranchRequest>,
    ) -> Result<Response<FindBranchResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if req.name.is_empty() {
            return Err(NodeError::invalid("branch name cannot be empty").into());
        }
        let short = req.name.strip_prefix(b"refs/heads/").unwrap_or(&req.name);
        let full = [b"refs/heads/".as_slice(), short].concat();
        let name = names::ref_name("branch name", &full)?;
        let Some(oid) = names::current_value(&self.node.git, &repo.path, name).await? else {
            return Ok(Response::new(FindBranchResponse { branch: None }));
        };
        let commit = objects::read(&self.node.git, &repo.path, std::slice::from_ref(&oid))
            .await?
            .pop()
            .flatten();
        Ok(Response::new(FindBranchResponse {
            branch: Some(Branch {
                name: short.to_vec(),
                target_commit: commit
                    .as_ref()
                    .filter(|o| o.kind == "commit")
                    .map(objects::commit),
            }),
        }))
    }

    /// A missing tag is NOT_FOUND with a `FindTagError` detail, as in Gitaly.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_tag(
        &self,
        request: Request<FindTagRequest>,
    ) -> Result<Response<FindTagResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if req.tag_name.is_empty() {
            return Err(NodeError::invalid("tag name cannot be empty").into());
        }
        let full = [b"refs/tags/".as_slice(), &req.tag_name].concat();
        let name = names::ref_name("tag name", &full)?;
        let Some(oid) = names::current_value(&self.node.git, &repo.path, name).await? else {
            return Err(detail::status_with_detail(
                Code::NotFound,
                format!("tag does not exist: {name}"),
                "gitaly.FindTagError",
                &FindTagError {
                    error: Some(find_tag_error::Error::TagNotFound(ReferenceNotFoundError {
                        reference_name: full.clone(),
                    })),
                },
            ));
        };
        // The object the tag names, and the commit it leads to (if any).
        let mut objs = objects::read(
            &self.node.git,
            &repo.path,
            &[oid.clone(), format!("{oid}^{{commit}}")],
        )
        .await?;
        let target = objs.pop().flatten();
        let obj = objs.pop().flatten();
        Ok(Response::new(FindTagResponse {
            tag: Some(objects::tag(
                &req.tag_name,
                &oid,
                obj.as_ref(),
                target.as_ref(),
            )),
        }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_local_branches(
        &self,
        request: Request<FindLocalBranchesRequest>,
    ) -> Result<Response<BoxStream<FindLocalBranchesResponse>>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let sort = match SortBy::try_from(req.sort_by) {
            Ok(SortBy::Name) => "refname",
            Ok(SortBy::UpdatedAsc) => "committerdate",
            Ok(SortBy::UpdatedDesc) => "-committerdate",
            Err(_) => {
                return Err(NodeError::invalid(format!("unknown sort_by {}", req.sort_by)).into());
            }
        };
        let (after, limit) = match &req.pagination_params {
            None => (None, -1),
            Some(p) => (
                (!p.page_token.is_empty()).then(|| p.page_token.clone()),
                i64::from(p.limit),
            ),
        };
        Ok(Response::new(list::local_branches(
            &self.node.git,
            repo.path,
            sort,
            after,
            limit,
        )?))
    }

    /// Mutator. Deletes only refs that exist, each with its current value as the
    /// expected old one, in one atomic update.
    #[tracing::instrument(skip_all, fields(node = %self.node.name, repo))]
    async fn delete_refs(
        &self,
        request: Request<DeleteRefsRequest>,
    ) -> Result<Response<DeleteRefsResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        tracing::Span::current().record("repo", tracing::field::display(&repo));
        write::validate_deletions(&req.refs, &req.except_with_prefix)?;
        let ctx = WriteContext::from_metadata(&self.node.tx, &metadata).await?;
        ctx.checksum_repository(&self.node.git, &repo.path);
        let git = &self.node.git;
        let result = async {
            let deletions =
                write::deletions(git, &repo.path, &req.refs, &req.except_with_prefix).await?;
            write::apply_deletions(git, &repo.path, &ctx, &deletions).await
        }
        .await;
        ctx.settle(result).await?;
        Ok(Response::new(DeleteRefsResponse {
            git_error: String::new(),
        }))
    }

    /// Mutator. The whole stream is one atomic update; every ref gets an explicit old
    /// value (the client's, else its current one).
    #[tracing::instrument(skip_all, fields(node = %self.node.name, repo))]
    async fn update_references(
        &self,
        request: Request<Streaming<UpdateReferencesRequest>>,
    ) -> Result<Response<UpdateReferencesResponse>, Status> {
        let (metadata, _, mut stream) = request.into_parts();
        let first = first_message(&mut stream).await?;
        let repo = self.node.storages.existing(first.repository.as_ref())?;
        tracing::Span::current().record("repo", tracing::field::display(&repo));
        let mut requested: Vec<write::Requested> = Vec::new();
        let mut take = |m: UpdateReferencesRequest| -> Result<(), Status> {
            for u in m.updates {
                requested.push(write::Requested {
                    name: u.reference,
                    old: u.old_object_id,
                    new: u.new_object_id,
                });
            }
            if requested.len() > MAX_UPDATES {
                return Err(NodeError::invalid(format!(
                    "more than {MAX_UPDATES} updates in one call: split them"
                ))
                .into());
            }
            Ok(())
        };
        take(first)?;
        while let Some(m) = stream.message().await? {
            take(m)?;
        }
        if requested.is_empty() {
            return Err(NodeError::invalid("no updates: send at least one").into());
        }
        let git = &self.node.git;
        let oid_len = names::oid_len(git, &repo.path).await?;
        write::validate_updates(&requested, oid_len)?;
        let ctx = WriteContext::from_metadata(&self.node.tx, &metadata).await?;
        ctx.checksum_repository(git, &repo.path);
        let result = async {
            let updates = write::resolve_updates(git, &repo.path, &requested, oid_len).await?;
            write::apply_updates(git, &repo.path, &ctx, &updates).await
        }
        .await;
        ctx.settle(result).await?;
        Ok(Response::new(UpdateReferencesResponse {}))
    }
}

impl RefSvc {
    /// The ref HEAD points at, or `None` for a detached HEAD.
    async fn head_target(&self, repo: &RepoPath) -> Result<Option<String>, NodeError> {
        let (out, exit) = self
            .node
            .git
            .command(["symbolic-ref", "--quiet", "HEAD"])
            .git_dir(&repo.path)
            .output(SMALL_OUTPUT)
            .await?;
        Ok(exit
            .answer()?
            .then(|| String::from_utf8_lossy(&out).trim().to_owned()))
    }

    async fn default_branch(
        &self,
        repo: &RepoPath,
        head: Option<String>,
    ) -> Result<String, NodeError> {
        // At most two branches tell "none", "the only one" and "the first one" apart.
        let first_two = self.branches(repo, &["--count=2", "refs/heads/"]).await?;
        if first_two.len() <= 1 {
            return Ok(first_two.into_iter().next().unwrap_or_default());
        }
        let mut wanted: Vec<&str> = Vec::new();
        if let Some(h) = head.as_deref().filter(|h| h.starts_with("refs/heads/")) {
            wanted.push(h);
        }
        wanted.extend(["refs/heads/main", "refs/heads/master"]);
        let present = self.branches(repo, &wanted).await?;
        Ok(wanted
            .iter()
            .find(|w| present.iter().any(|p| p == *w))
            .map(|w| (*w).to_owned())
            .unwrap_or_else(|| first_two[0].clone()))
    }

    /// Branch names from `git for-each-ref` with `args` (options, then patterns).
    async fn branches(&self, repo: &RepoPath, args: &[&str]) -> Result<Vec<String>, NodeError> {
        let mut cmd = self
            .node
            .git
            .command(["for-each-ref", "--format=%(refname)"])
            .git_dir(&repo.path);
        for a in args {
            cmd = cmd.arg(*a);
        }
        let (out, exit) = cmd.output(SMALL_OUTPUT).await?;
        exit.check()?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}
