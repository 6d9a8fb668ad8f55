//! RefService: questions about refs, answered as Gitaly answers them, and ref writes
//! (DeleteRefs, UpdateReferences), each one atomic `git update-ref` with explicit old
//! values.
//!
//! The logic lives in submodules: [`names`] (validation, current values), [`head`]
//! (HEAD and the default branch), [`branches`] and [`tags`] (listings and lookups),
//! [`update`] (the one update-ref run), [`write`] (the two write RPCs' rules and
//! errors), [`list`] (ListRefs); typed error details come from [`crate::detail`]. Lookups of single
//! refs and objects go through the read engine; listings are `git for-each-ref`.

mod branches;
pub(crate) mod head;
mod list;
pub(super) mod names;
mod tags;
pub(super) mod update;
mod write;

use std::sync::Arc;

use refvote_proto::gitaly::ref_service_server::RefService;
use refvote_proto::gitaly::{
    Branch, DeleteRefsRequest, DeleteRefsResponse, FindAllBranchesRequest, FindAllBranchesResponse,
    FindAllRemoteBranchesRequest, FindAllRemoteBranchesResponse, FindAllTagsRequest,
    FindAllTagsResponse, FindBranchRequest, FindBranchResponse, FindDefaultBranchNameRequest,
    FindDefaultBranchNameResponse, FindLocalBranchesRequest, FindLocalBranchesResponse,
    FindRefsByOidRequest, FindRefsByOidResponse, FindTagRequest, FindTagResponse,
    GetTagMessagesRequest, GetTagMessagesResponse, GetTagSignaturesRequest,
    GetTagSignaturesResponse, ListBranchNamesContainingCommitRequest,
    ListBranchNamesContainingCommitResponse, ListRefsRequest, ListRefsResponse,
    ListTagNamesContainingCommitRequest, ListTagNamesContainingCommitResponse, RefExistsRequest,
    RefExistsResponse, UpdateReferencesRequest, UpdateReferencesResponse,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::error::NodeError;
use super::tx::WriteContext;
use crate::state::NodeState;
use crate::stream::first_message;

/// Most updates one UpdateReferences call may carry (they are held until applied).
const MAX_UPDATES: usize = 100_000;

type Stream<T> = Result<Response<BoxStream<T>>, Status>;

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
    /// it exists, else `main`, else `master`, else the first branch; empty when there
    /// is no branch at all.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_default_branch_name(
        &self,
        request: Request<FindDefaultBranchNameRequest>,
    ) -> Result<Response<FindDefaultBranchNameResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        let name = if req.head_only {
            head::head_target(&self.node.git, &repo.path)
                .await
                .map_err(|e| Status::internal(format!("head reference: {e}")))?
                .unwrap_or_default()
        } else {
            let mut reader = self.node.reads.reader(&repo).await?;
            head::default_branch(&self.node.git, &repo.path, &mut reader)
                .await
                .map_err(|e| Status::internal(format!("get default branch: {e}")))?
                .unwrap_or_default()
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
            .repo(&repo)
            .spawn()
            .map_err(NodeError::from)?
            .wait()
            .await
            .map_err(NodeError::from)?;
        let value = match exit.code() {
            Some(0) => true,
            Some(1) => false,
            _ => return Err(NodeError::from(exit.into_error()).into()),
        };
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
        let mut reader = self.node.reads.reader(&repo).await?;
        let commit = reader
            .commits(std::slice::from_ref(&oid))
            .await?
            .pop()
            .flatten();
        Ok(Response::new(FindBranchResponse {
            branch: Some(Branch {
                name: short.to_vec(),
                target_commit: commit,
            }),
        }))
    }

    /// A missing tag is NOT_FOUND with a `FindTagError` detail, as in Gitaly.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_tag(
        &self,
        request: Request<FindTagRequest>,
    ) -> Result<Response<FindTagResponse>, Status> {
        tags::find_tag(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_all_tags(
        &self,
        request: Request<FindAllTagsRequest>,
    ) -> Stream<FindAllTagsResponse> {
        tags::find_all_tags(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_tag_messages(
        &self,
        request: Request<GetTagMessagesRequest>,
    ) -> Stream<GetTagMessagesResponse> {
        tags::get_tag_messages(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_tag_signatures(
        &self,
        request: Request<GetTagSignaturesRequest>,
    ) -> Stream<GetTagSignaturesResponse> {
        tags::get_tag_signatures(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_local_branches(
        &self,
        request: Request<FindLocalBranchesRequest>,
    ) -> Stream<FindLocalBranchesResponse> {
        branches::find_local_branches(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_all_branches(
        &self,
        request: Request<FindAllBranchesRequest>,
    ) -> Stream<FindAllBranchesResponse> {
        branches::find_all_branches(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_all_remote_branches(
        &self,
        request: Request<FindAllRemoteBranchesRequest>,
    ) -> Stream<FindAllRemoteBranchesResponse> {
        branches::find_all_remote_branches(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_branch_names_containing_commit(
        &self,
        request: Request<ListBranchNamesContainingCommitRequest>,
    ) -> Stream<ListBranchNamesContainingCommitResponse> {
        branches::list_branch_names_containing_commit(&self.node, request.into_inner())
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_tag_names_containing_commit(
        &self,
        request: Request<ListTagNamesContainingCommitRequest>,
    ) -> Stream<ListTagNamesContainingCommitResponse> {
        branches::list_tag_names_containing_commit(&self.node, request.into_inner())
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_refs_by_oid(
        &self,
        request: Request<FindRefsByOidRequest>,
    ) -> Result<Response<FindRefsByOidResponse>, Status> {
        branches::find_refs_by_oid(&self.node, request.into_inner())
            .await
            .map(Response::new)
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
