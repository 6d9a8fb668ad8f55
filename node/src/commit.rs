//! CommitService: commits, trees and history, as Gitaly answers them. The work lives
//! in submodules: [`lookup`] (commits by name, signatures, messages, ancestry,
//! stats), [`tree`] (tree entries, listings, files), [`walk`] (history walks and
//! counts), [`all`] (FindAllCommits), [`last`] (the last commit of a path), [`exist`]
//! (CheckObjectsExist, FilterShasWithSignatures) and [`page`] (GetTreeEntries' page
//! tokens). Object lookups go through the read engine; walks git does itself.
//!
//! Malformed input (an option-like revision, a path climbing out of the tree, a
//! negative limit) is INVALID_ARGUMENT before git runs; where Gitaly answers a missing
//! object with an empty answer rather than an error (FindCommit, CommitIsAncestor,
//! CountCommits, LastCommitForPath), so does this.

mod all;
mod exist;
mod last;
mod lookup;
mod page;
pub(crate) mod tree;
mod walk;

pub(crate) use lookup::empty_tree;

use std::sync::Arc;

use refvote_proto::gitaly::commit_service_server::CommitService;
use refvote_proto::gitaly::{
    CheckObjectsExistRequest, CheckObjectsExistResponse, CommitIsAncestorRequest,
    CommitIsAncestorResponse, CommitLanguagesRequest, CommitLanguagesResponse, CommitStatsRequest,
    CommitStatsResponse, CommitsByMessageRequest, CommitsByMessageResponse, CountCommitsRequest,
    CountCommitsResponse, CountDivergingCommitsRequest, CountDivergingCommitsResponse,
    FilterShasWithSignaturesRequest, FilterShasWithSignaturesResponse, FindAllCommitsRequest,
    FindAllCommitsResponse, FindCommitRequest, FindCommitResponse, FindCommitsRequest,
    FindCommitsResponse, GetCommitMessagesRequest, GetCommitMessagesResponse,
    GetCommitSignaturesRequest, GetCommitSignaturesResponse, GetTreeEntriesRequest,
    GetTreeEntriesResponse, LastCommitForPathRequest, LastCommitForPathResponse,
    ListAllCommitsRequest, ListAllCommitsResponse, ListCommitsByOidRequest,
    ListCommitsByOidResponse, ListCommitsByRefNameRequest, ListCommitsByRefNameResponse,
    ListCommitsRequest, ListCommitsResponse, ListFilesRequest, ListFilesResponse,
    ListLastCommitsForTreeRequest, ListLastCommitsForTreeResponse, RawBlameRequest,
    RawBlameResponse, TreeEntryRequest, TreeEntryResponse,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::state::NodeState;

pub struct CommitSvc {
    node: Arc<NodeState>,
}

impl CommitSvc {
    pub fn new(node: Arc<NodeState>) -> CommitSvc {
        CommitSvc { node }
    }
}

type Stream<T> = Result<Response<BoxStream<T>>, Status>;

#[tonic::async_trait]
impl CommitService for CommitSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_commit(
        &self,
        request: Request<FindCommitRequest>,
    ) -> Result<Response<FindCommitResponse>, Status> {
        lookup::find_commit(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_commits_by_oid(
        &self,
        request: Request<ListCommitsByOidRequest>,
    ) -> Stream<ListCommitsByOidResponse> {
        lookup::list_commits_by_oid(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_commits_by_ref_name(
        &self,
        request: Request<ListCommitsByRefNameRequest>,
    ) -> Stream<ListCommitsByRefNameResponse> {
        lookup::list_commits_by_ref_name(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_commit_messages(
        &self,
        request: Request<GetCommitMessagesRequest>,
    ) -> Stream<GetCommitMessagesResponse> {
        lookup::get_commit_messages(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_commit_signatures(
        &self,
        request: Request<GetCommitSignaturesRequest>,
    ) -> Stream<GetCommitSignaturesResponse> {
        lookup::get_commit_signatures(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn commit_is_ancestor(
        &self,
        request: Request<CommitIsAncestorRequest>,
    ) -> Result<Response<CommitIsAncestorResponse>, Status> {
        lookup::commit_is_ancestor(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn commit_stats(
        &self,
        request: Request<CommitStatsRequest>,
    ) -> Result<Response<CommitStatsResponse>, Status> {
        lookup::commit_stats(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn tree_entry(&self, request: Request<TreeEntryRequest>) -> Stream<TreeEntryResponse> {
        tree::tree_entry(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_tree_entries(
        &self,
        request: Request<GetTreeEntriesRequest>,
    ) -> Stream<GetTreeEntriesResponse> {
        tree::get_tree_entries(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_files(&self, request: Request<ListFilesRequest>) -> Stream<ListFilesResponse> {
        tree::list_files(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_commits(
        &self,
        request: Request<ListCommitsRequest>,
    ) -> Stream<ListCommitsResponse> {
        walk::list_commits(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_all_commits(
        &self,
        request: Request<ListAllCommitsRequest>,
    ) -> Stream<ListAllCommitsResponse> {
        walk::list_all_commits(&self.node, request.into_inner()).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_commits(
        &self,
        request: Request<FindCommitsRequest>,
    ) -> Stream<FindCommitsResponse> {
        walk::find_commits(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn commits_by_message(
        &self,
        request: Request<CommitsByMessageRequest>,
    ) -> Stream<CommitsByMessageResponse> {
        walk::commits_by_message(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn count_commits(
        &self,
        request: Request<CountCommitsRequest>,
    ) -> Result<Response<CountCommitsResponse>, Status> {
        walk::count_commits(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn count_diverging_commits(
        &self,
        request: Request<CountDivergingCommitsRequest>,
    ) -> Result<Response<CountDivergingCommitsResponse>, Status> {
        walk::count_diverging_commits(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn last_commit_for_path(
        &self,
        request: Request<LastCommitForPathRequest>,
    ) -> Result<Response<LastCommitForPathResponse>, Status> {
        last::last_commit_for_path(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn list_last_commits_for_tree(
        &self,
        request: Request<ListLastCommitsForTreeRequest>,
    ) -> Stream<ListLastCommitsForTreeResponse> {
        last::list_last_commits_for_tree(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn check_objects_exist(
        &self,
        request: Request<Streaming<CheckObjectsExistRequest>>,
    ) -> Stream<CheckObjectsExistResponse> {
        exist::check_objects_exist(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn filter_shas_with_signatures(
        &self,
        request: Request<Streaming<FilterShasWithSignaturesRequest>>,
    ) -> Stream<FilterShasWithSignaturesResponse> {
        exist::filter_shas_with_signatures(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_all_commits(
        &self,
        request: Request<FindAllCommitsRequest>,
    ) -> Stream<FindAllCommitsResponse> {
        all::find_all_commits(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn raw_blame(&self, request: Request<RawBlameRequest>) -> Stream<RawBlameResponse> {
        crate::blame::raw_blame(&self.node, request.into_inner()).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn commit_languages(
        &self,
        request: Request<CommitLanguagesRequest>,
    ) -> Result<Response<CommitLanguagesResponse>, Status> {
        crate::languages::commit_languages(&self.node, request).await
    }
}
