//! RepositoryService: existence, creation and removal of whole repositories, their
//! checksum, size, bundles, replication from a peer (repair), WriteRef and
//! FindMergeBase.
//!
//! Creation never leaves a half-done repository where clients look: a new repository
//! (also one made from a bundle or by replication) is built in the storage's private
//! area, fsynced (every file and directory: `git init` syncs nothing) and renamed into
//! place, and the rename is fsynced before the call returns; a removed one is renamed
//! away first (durably) and deleted afterwards. The logic of the larger RPCs lives in submodules: [`checksum`],
//! [`info`], [`bundle`], [`replicate`].

mod bundle;
pub(super) mod checksum;
mod incremental;
pub use incremental::{BRIDGE_ARG, run_bridge};
mod info;
mod replicate;

pub(crate) use info::hash_len;

use std::path::Path;
use std::sync::Arc;

use refvote_proto::gitaly::repository_service_server::RepositoryService;
use refvote_proto::gitaly::{
    CalculateChecksumRequest, CalculateChecksumResponse, CreateBundleRequest, CreateBundleResponse,
    CreateRepositoryFromBundleRequest, CreateRepositoryFromBundleResponse, CreateRepositoryRequest,
    CreateRepositoryResponse, FindLicenseRequest, FindLicenseResponse, FindMergeBaseRequest,
    FindMergeBaseResponse, GetArchiveRequest, GetArchiveResponse, GetFileAttributesRequest,
    GetFileAttributesResponse, GetInfoAttributesRequest, GetInfoAttributesResponse,
    GetObjectDirectorySizeRequest, GetObjectDirectorySizeResponse, GetRawChangesRequest,
    GetRawChangesResponse, GetSnapshotRequest, GetSnapshotResponse, HasLocalBranchesRequest,
    HasLocalBranchesResponse, ObjectFormat, ObjectFormatRequest, ObjectFormatResponse,
    RemoveRepositoryRequest, RemoveRepositoryResponse, ReplicateRepositoryRequest,
    ReplicateRepositoryResponse, RepositoryExistsRequest, RepositoryExistsResponse,
    RepositoryInfoRequest, RepositoryInfoResponse, RepositorySizeRequest, RepositorySizeResponse,
    SearchFilesByContentRequest, SearchFilesByContentResponse, SearchFilesByNameRequest,
    SearchFilesByNameResponse, WriteRefRequest, WriteRefResponse,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::error::NodeError;
use super::refs::names;
use super::refs::update::{self, FailureKind, RefUpdate};
use super::storage::{RepoPath, Storages, TempDir, is_repository};
use super::tx::WriteContext;

/// Longest a repair waits for running pushes to finish before it gives up (UNAVAILABLE).
const REPAIR_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
use crate::state::NodeState;
use crate::stream::{first_message, stdout_stream};

pub struct RepositorySvc {
    node: Arc<NodeState>,
}

impl RepositorySvc {
    pub fn new(node: Arc<NodeState>) -> RepositorySvc {
        RepositorySvc { node }
    }
}

#[tonic::async_trait]
impl RepositoryService for RepositorySvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn repository_exists(
        &self,
        request: Request<RepositoryExistsRequest>,
    ) -> Result<Response<RepositoryExistsResponse>, Status> {
        let repo = self
            .node
            .storages
            .resolve(request.get_ref().repository.as_ref())?;
        Ok(Response::new(RepositoryExistsResponse {
            exists: is_repository(&repo.path),
        }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name, repo))]
    async fn create_repository(
        &self,
        request: Request<CreateRepositoryRequest>,
    ) -> Result<Response<CreateRepositoryResponse>, Status> {
        let repo = self
            .node
            .storages
            .resolve(request.get_ref().repository.as_ref())?;
        tracing::Span::current().record("repo", tracing::field::display(&repo));
        let req = request.get_ref();
        let branch = default_branch(&req.default_branch)?;
        let object_format = match ObjectFormat::try_from(req.object_format) {
            Ok(ObjectFormat::Unspecified | ObjectFormat::Sha1) => "sha1",
            Ok(ObjectFormat::Sha256) => "sha256",
            Err(_) => {
                return Err(NodeError::invalid(format!(
                    "unknown object_format {}",
                    req.object_format
                ))
                .into());
            }
        };
        let ctx = WriteContext::from_metadata(&self.node.tx, request.metadata()).await?;
        let result = if repo.path.exists() {
            // Refused inside the transaction: finalize hears it at once instead of
            // waiting for a voter that never reports.
            Err(NodeError::RepositoryExists(repo.to_string()))
        } else {
            self.create(&repo, &branch, object_format).await
        };
        ctx.settle(result).await?;
        tracing::info!("repository created");
        Ok(Response::new(CreateRepositoryResponse {}))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name, repo))]
    async fn remove_repository(
        &self,
        request: Request<RemoveRepositoryRequest>,
    ) -> Result<Response<RemoveRepositoryResponse>, Status> {
        let repo = self
            .node
            .storages
            .existing(request.get_ref().repository.as_ref())?;
        tracing::Span::current().record("repo", tracing::field::display(&repo));
        let ctx = WriteContext::from_metadata(&self.node.tx, request.metadata()).await?;
        let result = remove(&repo).await;
        self.node.reads.evict(&repo.path);
        ctx.settle(result).await?;
        tracing::info!("repository removed");
        Ok(Response::new(RemoveRepositoryResponse {}))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn calculate_checksum(
        &self,
        request: Request<CalculateChecksumRequest>,
    ) -> Result<Response<CalculateChecksumResponse>, Status> {
        let repo = self
            .node
            .storages
            .existing(request.get_ref().repository.as_ref())?;
        let checksum = checksum::calculate(&self.node.git, &repo.path).await?;
        Ok(Response::new(CalculateChecksumResponse { checksum }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn repository_size(
        &self,
        request: Request<RepositorySizeRequest>,
    ) -> Result<Response<RepositorySizeResponse>, Status> {
        let repo = self
            .node
            .storages
            .existing(request.get_ref().repository.as_ref())?;
        let size = measure(&repo, info::size_kib).await?;
        Ok(Response::new(RepositorySizeResponse { size }))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn repository_info(
        &self,
        request: Request<RepositoryInfoRequest>,
    ) -> Result<Response<RepositoryInfoResponse>, Status> {
        let repo = self
            .node
            .storages
            .existing(request.get_ref().repository.as_ref())?;
        let relative = repo.relative.clone();
        let answer = measure(&repo, move |path| info::info(path, &relative)).await?;
        Ok(Response::new(answer))
    }

    /// The repository's `info/attributes` file, in 128 KiB pieces; one empty message
    /// if it has none (Gitaly's answer).
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_info_attributes(
        &self,
        request: Request<GetInfoAttributesRequest>,
    ) -> Result<Response<BoxStream<GetInfoAttributesResponse>>, Status> {
        use tokio::io::AsyncReadExt;
        let repo = self
            .node
            .storages
            .existing(request.get_ref().repository.as_ref())?;
        let path = repo.path.join("info").join("attributes");
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Response::new(Box::pin(tokio_stream::once(Ok(
                    GetInfoAttributesResponse::default(),
                )))));
            }
            Err(e) => return Err(NodeError::io(format!("opening {}", path.display()), e).into()),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut sent = false;
            loop {
                let mut buf = vec![0u8; 128 * 1024];
                let n = match file.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(NodeError::io("reading info/attributes", e).into()))
                            .await;
                        return;
                    }
                };
                if n == 0 {
                    if !sent {
                        let _ = tx.send(Ok(GetInfoAttributesResponse::default())).await;
                    }
                    return;
                }
                buf.truncate(n);
                sent = true;
                if tx
                    .send(Ok(GetInfoAttributesResponse { attributes: buf }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    /// KiB of the repository's object directory.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_object_directory_size(
        &self,
        request: Request<GetObjectDirectorySizeRequest>,
    ) -> Result<Response<GetObjectDirectorySizeResponse>, Status> {
        let repo = self
            .node
            .storages
            .existing(request.get_ref().repository.as_ref())?;
        let size = measure(&repo, |path| info::size_kib(&path.join("objects"))).await?;
        Ok(Response::new(GetObjectDirectorySizeResponse { size }))
    }

    /// Whether any branch exists (`git for-each-ref --count=1 refs/heads/`).
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn has_local_branches(
        &self,
        request: Request<HasLocalBranchesRequest>,
    ) -> Result<Response<HasLocalBranchesResponse>, Status> {
        let repo = self
            .node
            .storages
            .existing(request.get_ref().repository.as_ref())?;
        let (out, exit) = self
            .node
            .git
            .command([
                "for-each-ref",
                "--count=1",
                "--format=%(refname)",
                "refs/heads/",
            ])
            .repo(&repo)
            .output(64 * 1024)
            .await
            .map_err(NodeError::from)?;
        exit.check().map_err(NodeError::from)?;
        Ok(Response::new(HasLocalBranchesResponse {
            value: !out.trim_ascii().is_empty(),
        }))
    }

    /// SHA-1 or SHA-256, from the repository's config.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn object_format(
        &self,
        request: Request<ObjectFormatRequest>,
    ) -> Result<Response<ObjectFormatResponse>, Status> {
        let repo = self
            .node
            .storages
            .existing(request.get_ref().repository.as_ref())?;
        let format = match hash_len(&repo.path) {
            64 => ObjectFormat::Sha256,
            _ => ObjectFormat::Sha1,
        };
        Ok(Response::new(ObjectFormatResponse {
            format: format as i32,
        }))
    }

    /// Gitaly answers an empty base when git finds none or cannot resolve a revision.
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_merge_base(
        &self,
        request: Request<FindMergeBaseRequest>,
    ) -> Result<Response<FindMergeBaseResponse>, Status> {
        let req = request.into_inner();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        if req.revisions.len() < 2 {
            return Err(NodeError::invalid("at least 2 revisions are required").into());
        }
        let mut cmd = self.node.git.command(["merge-base"]).repo(&repo);
        for r in &req.revisions {
            cmd = cmd.arg(names::revision("revision", r)?);
        }
        let (out, exit) = cmd.output(4096).await?;
        let base = if exit.success() {
            String::from_utf8_lossy(&out).trim().to_owned()
        } else {
            String::new()
        };
        Ok(Response::new(FindMergeBaseResponse { base }))
    }

    /// Mutator. `ref` "HEAD" points the HEAD symref at `revision` (a ref name);
    /// anything else is one update-ref with an explicit old value.
    #[tracing::instrument(skip_all, fields(node = %self.node.name, repo))]
    async fn write_ref(
        &self,
        request: Request<WriteRefRequest>,
    ) -> Result<Response<WriteRefResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let repo = self.node.storages.existing(req.repository.as_ref())?;
        tracing::Span::current().record("repo", tracing::field::display(&repo));
        if req.r#ref.is_empty() {
            return Err(NodeError::invalid(
                "empty ref: name the ref to write, e.g. refs/heads/main",
            )
            .into());
        }
        let revision = names::revision("revision", &req.revision)?;
        let head = req.r#ref == b"HEAD";
        let name = if head {
            names::ref_name(
                "revision (the ref HEAD should point at)",
                revision.as_bytes(),
            )?;
            "HEAD"
        } else {
            names::ref_name("ref", &req.r#ref)?
        };
        let ctx = WriteContext::from_metadata(&self.node.tx, &metadata).await?;
        ctx.checksum_repository(&self.node.git, &repo.path);
        let result = if head {
            replicate::set_head_with(&self.node.git, &repo.path, revision, &ctx)
                .await
                .map_err(Status::from)
        } else {
            self.write_ref_in(&repo, &ctx, name, revision, &req.old_revision)
                .await
        };
        ctx.settle(result).await?;
        Ok(Response::new(WriteRefResponse {}))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn create_bundle(
        &self,
        request: Request<CreateBundleRequest>,
    ) -> Result<Response<BoxStream<CreateBundleResponse>>, Status> {
        let repo = self
            .node
            .storages
            .existing(request.get_ref().repository.as_ref())?;
        bundle::ensure_not_empty(&self.node.git, &repo.path).await?;
        let run = bundle::create(&self.node.git, &repo.path)?;
        Ok(Response::new(stdout_stream(run, None, |data| {
            CreateBundleResponse { data }
        })))
    }

    /// Mutator. The repository must not exist; it appears whole or not at all.
    #[tracing::instrument(skip_all, fields(node = %self.node.name, repo))]
    async fn create_repository_from_bundle(
        &self,
        request: Request<Streaming<CreateRepositoryFromBundleRequest>>,
    ) -> Result<Response<CreateRepositoryFromBundleResponse>, Status> {
        let (metadata, _, mut stream) = request.into_parts();
        let first = first_message(&mut stream).await?;
        let repo = self.node.storages.resolve(first.repository.as_ref())?;
        tracing::Span::current().record("repo", tracing::field::display(&repo));
        let ctx = WriteContext::from_metadata(&self.node.tx, &metadata).await?;
        // Refusals before any change (an existing repository, a bad bundle: every
        // replica refuses alike) are reported inside the transaction, so finalize hears
        // them at once instead of waiting for a voter that never reports.
        let received = async {
            if repo.path.exists() {
                return Err(Status::from(NodeError::RepositoryExists(repo.to_string())));
            }
            use tokio_stream::StreamExt;
            let chunks =
                tokio_stream::once(Ok(first.data)).chain(stream.map(|m| m.map(|m| m.data)));
            let bundle = bundle::receive(&repo.root, Box::pin(chunks)).await?;
            bundle::heads(&self.node.git, &bundle.path).await?;
            Ok(bundle)
        }
        .await;
        let bundle = match received {
            Ok(b) => b,
            Err(status) => return ctx.settle(Err(status)).await,
        };
        // Before any git run names the private copy: the checksum is of the final place.
        ctx.checksum_repository(&self.node.git, &repo.path);
        let result = self.create_from_bundle(&repo, &bundle.path, &ctx).await;
        ctx.settle(result).await?;
        tracing::info!("repository created from a bundle");
        Ok(Response::new(CreateRepositoryFromBundleResponse {}))
    }

    /// Mutator used for repair: see [`replicate`].
    #[tracing::instrument(skip_all, fields(node = %self.node.name, repo))]
    async fn replicate_repository(
        &self,
        request: Request<ReplicateRepositoryRequest>,
    ) -> Result<Response<ReplicateRepositoryResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let target = self.node.storages.resolve(req.repository.as_ref())?;
        tracing::Span::current().record("repo", tracing::field::display(&target));
        let source = req
            .source
            .clone()
            .ok_or_else(|| NodeError::invalid("source repository not set"))?;
        refvote_cluster::repo::validate_relative_path(&source.relative_path)
            .map_err(|e| NodeError::invalid(format!("source relative path is malformed: {e}")))?;
        let server = replicate::source_server(
            &metadata,
            &source.storage_name,
            self.node.secret.as_ref(),
            self.node.client_tls.as_ref(),
        )?;
        // Outside a transaction this is a router's repair: it copies what a majority
        // already decided, so `require_transaction` does not refuse it.
        let ctx = if metadata.contains_key(crate::tx::TX_METADATA) {
            WriteContext::from_metadata(&self.node.tx, &metadata).await?
        } else {
            WriteContext::Untracked
        };
        ctx.checksum_repository(&self.node.git, &target.path);
        // A repair runs alone on the repository (no push holds a ref lock it needs),
        // after clearing ref locks a crash left behind.
        if is_repository(&target.path) {
            self.node
                .locks
                .clear_stale_ref_locks(&target.path, REPAIR_LOCK_WAIT)
                .await?;
        }
        let _exclusive = self
            .node
            .locks
            .exclusive(&target.path, REPAIR_LOCK_WAIT)
            .await?;
        let result = async {
            let git = &self.node.git;
            // A replica with a usable base fetches only what it lacks; the whole copy
            // is for one with none, or when that fetch fails.
            if is_repository(&target.path) && incremental::usable_base(git, &target.path).await? {
                match self.fetch_incremental(&server, &source, &target).await {
                    Ok(moved) => {
                        tracing::info!(
                            repair_mode = "fetch",
                            bytes_from_source = moved.from_source,
                            bytes_to_source = moved.to_source,
                            "replica brought level by fetch"
                        );
                        return Ok::<(), Status>(());
                    }
                    Err(e) => tracing::warn!(
                        error = %e.message(),
                        "the incremental fetch failed; copying the whole repository"
                    ),
                }
            }
            let src =
                replicate::fetch_source(&self.node.git, &server, source, &target.root).await?;
            tracing::info!(
                repair_mode = "bundle",
                bytes_from_source = src.bundle.as_ref().map_or(0, |b| b.len),
                "copying the source's whole repository"
            );
            if is_repository(&target.path) {
                replicate::sync_existing(&self.node.git, &target, &src).await?;
            } else {
                let branch = src.head.strip_prefix("refs/heads/").unwrap_or("main");
                let branch = default_branch(branch.as_bytes()).unwrap_or_else(|_| "main".into());
                let tmp = self.init_private(&target.root, &branch, "sha1").await?;
                if let Some(b) = &src.bundle {
                    bundle::fetch(
                        &self.node.git,
                        &tmp.0,
                        &b.path,
                        &WriteContext::Maintenance,
                        false,
                    )
                    .await?;
                }
                place(tmp, &target).await?;
            }
            Ok::<(), Status>(())
        }
        .await;
        // What the pool's processes hold of the old state goes with it.
        self.node.reads.evict(&target.path);
        ctx.settle(result).await?;
        tracing::info!("repository replicated");
        Ok(Response::new(ReplicateRepositoryResponse {}))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_archive(
        &self,
        request: Request<GetArchiveRequest>,
    ) -> Result<Response<BoxStream<GetArchiveResponse>>, Status> {
        crate::archive::get_archive(&self.node, request.into_inner()).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<BoxStream<GetSnapshotResponse>>, Status> {
        crate::snapshot::get_snapshot(&self.node, request.into_inner()).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_raw_changes(
        &self,
        request: Request<GetRawChangesRequest>,
    ) -> Result<Response<BoxStream<GetRawChangesResponse>>, Status> {
        crate::diff::raw_changes::get_raw_changes(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn find_license(
        &self,
        request: Request<FindLicenseRequest>,
    ) -> Result<Response<FindLicenseResponse>, Status> {
        crate::license::find_license(&self.node, request.into_inner()).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn get_file_attributes(
        &self,
        request: Request<GetFileAttributesRequest>,
    ) -> Result<Response<GetFileAttributesResponse>, Status> {
        crate::attributes::get_file_attributes(&self.node, request.into_inner()).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn search_files_by_name(
        &self,
        request: Request<SearchFilesByNameRequest>,
    ) -> Result<Response<BoxStream<SearchFilesByNameResponse>>, Status> {
        crate::search::by_name(&self.node, request.into_inner()).await
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn search_files_by_content(
        &self,
        request: Request<SearchFilesByContentRequest>,
    ) -> Result<Response<BoxStream<SearchFilesByContentResponse>>, Status> {
        crate::search::by_content(&self.node, request.into_inner()).await
    }
}

impl RepositorySvc {
    /// The incremental repair of `target` from `source` (see [`incremental`]), then
    /// HEAD as the source's.
    async fn fetch_incremental(
        &self,
        server: &replicate::SourceServer,
        source: &refvote_proto::gitaly::Repository,
        target: &RepoPath,
    ) -> Result<incremental::Moved, Status> {
        let channel = replicate::channel(server).await?;
        // HEAD before the advertisement, as the whole copy reads it before its bundle.
        let head = replicate::source_head(&channel, source).await?;
        refvote_cluster::faults::reach(refvote_cluster::faults::MID_REPAIR).await;
        let moved = incremental::fetch(&self.node.git, &channel, source.clone(), target).await?;
        replicate::set_head(&self.node.git, &target.path, &head).await?;
        Ok(moved)
    }

    /// `git init --bare` then one rename into place.
    async fn create(&self, repo: &RepoPath, branch: &str, format: &str) -> Result<(), NodeError> {
        let tmp = self.init_private(&repo.root, branch, format).await?;
        place(tmp, repo).await
    }

    /// A new bare repository in the storage's private area, the hook wired in through
    /// `core.hooksPath`; clients cannot see it yet.
    async fn init_private(
        &self,
        root: &Path,
        branch: &str,
        format: &str,
    ) -> Result<TempDir, NodeError> {
        let git = &self.node.git;
        let tmp = TempDir(Storages::tmp_dir(root).join(format!("create-{}", uuid::Uuid::new_v4())));
        // Plain runs: the repository is not visible yet and has no hook to vote with.
        git.command(["init", "--bare", "--quiet"])
            .arg(format!("--initial-branch={branch}"))
            .arg(format!("--object-format={format}"))
            .arg(&tmp.0)
            .status()
            .await?
            .check()?;
        let hooks = git.hooks_dir().to_owned();
        for (key, value) in [
            ("core.hooksPath", hooks.as_os_str()),
            // Also for git runs that do not come through votingd (an operator's).
            ("receive.autogc", "false".as_ref()),
            ("gc.auto", "0".as_ref()),
        ] {
            git.command(["config", key])
                .arg(value)
                .git_dir(&tmp.0)
                .status()
                .await?
                .check()?;
        }
        Ok(tmp)
    }

    /// Creates `repo` from `bundle`: built privately, the refs fetched in one voted
    /// transaction (inside a refvote transaction every replica fetches the same refs),
    /// then renamed into place.
    async fn create_from_bundle(
        &self,
        repo: &RepoPath,
        bundle: &Path,
        ctx: &WriteContext,
    ) -> Result<(), NodeError> {
        let heads = bundle::heads(&self.node.git, bundle).await?;
        let branch = bundle::head_branch(&heads).unwrap_or_else(|| "main".into());
        let format = if heads.first().is_some_and(|(o, _)| o.len() == 64) {
            "sha256"
        } else {
            "sha1"
        };
        let tmp = self.init_private(&repo.root, &branch, format).await?;
        if is_repository(&repo.path) {
            return Err(NodeError::RepositoryExists(repo.to_string()));
        }
        bundle::fetch(&self.node.git, &tmp.0, bundle, ctx, false).await?;
        place(tmp, repo).await
    }

    /// WriteRef's work once validated (inside the write context).
    async fn write_ref_in(
        &self,
        repo: &RepoPath,
        ctx: &WriteContext,
        name: &str,
        revision: &str,
        old_revision: &[u8],
    ) -> Result<(), Status> {
        let git = &self.node.git;
        let new = names::resolve(git, &repo.path, revision)
            .await?
            .ok_or_else(|| NodeError::NotFound(format!("revision not found: {revision:?}")))?;
        let oid_len = new.len();
        let current = names::current_value(git, &repo.path, name)
            .await?
            .unwrap_or_else(|| "0".repeat(oid_len));
        let old = if old_revision.is_empty() {
            current.clone()
        } else {
            let old = names::revision("old_revision", old_revision)?;
            if names::is_zero(old) {
                "0".repeat(oid_len)
            } else {
                names::resolve(git, &repo.path, old).await?.ok_or_else(|| {
                    NodeError::invalid(format!("old_revision {old:?} names no object"))
                })?
            }
        };
        if old != current {
            return Err(NodeError::Aborted(format!(
                "reference does not point to the expected object: {name} is at {current}, expected {old}; read it again and retry"
            ))
            .into());
        }
        let u = RefUpdate {
            name: name.to_owned(),
            old,
            new,
        };
        update::apply(git, &repo.path, ctx, &[u])
            .await
            .map_err(|f| match f.kind {
                FailureKind::Unlockable(_) | FailureKind::Other => NodeError::from(f.git).into(),
                _ => Status::aborted(format!("{f}; retry")),
            })
    }
}

/// Runs `f` (a walk of the repository's files) off the async runtime.
async fn measure<T: Send + 'static>(
    repo: &RepoPath,
    f: impl FnOnce(&Path) -> std::io::Result<T> + Send + 'static,
) -> Result<T, NodeError> {
    let path = repo.path.clone();
    tokio::task::spawn_blocking(move || f(&path))
        .await
        .map_err(|e| NodeError::io("measuring the repository", std::io::Error::other(e)))?
        .map_err(|e| NodeError::io(format!("measuring {}", repo.path.display()), e))
}

/// Moves a repository built in the private area to where clients see it.
async fn place(tmp: TempDir, repo: &RepoPath) -> Result<(), NodeError> {
    let repo = repo.clone();
    tokio::task::spawn_blocking(move || place_blocking(tmp, &repo))
        .await
        .map_err(|e| NodeError::io("placing the new repository", std::io::Error::other(e)))?
}

fn place_blocking(tmp: TempDir, repo: &RepoPath) -> Result<(), NodeError> {
    let parent = repo.path.parent().unwrap_or(&repo.root);
    std::fs::create_dir_all(parent)
        .map_err(|e| NodeError::io(format!("creating {}", parent.display()), e))?;
    // rename(2) replaces an empty directory but never a non-empty one, so of two
    // concurrent creations exactly one wins.
    if is_repository(&repo.path) {
        return Err(NodeError::RepositoryExists(repo.to_string()));
    }
    // Durable before it is visible: `git init` fsyncs nothing, and a power cut after
    // the creation was acknowledged would leave an empty HEAD (not a repository).
    sync_tree(&tmp.0).map_err(|e| NodeError::io(format!("syncing {}", tmp.0.display()), e))?;
    match std::fs::rename(&tmp.0, &repo.path) {
        Ok(()) => {
            std::mem::forget(tmp);
            sync_parents(&repo.path, &repo.root).map_err(|e| {
                NodeError::io(format!("syncing the parents of {}", repo.path.display()), e)
            })
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists
            ) =>
        {
            Err(NodeError::RepositoryExists(repo.to_string()))
        }
        Err(e) => Err(NodeError::io(
            format!("moving the new repository to {}", repo.path.display()),
            e,
        )),
    }
}

/// fsyncs every regular file and directory under `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// fsyncs each directory from `path`'s parent up to `root` (inclusive), so the
/// entries leading to `path` (some just made by `create_dir_all`) are durable.
fn sync_parents(path: &Path, root: &Path) -> std::io::Result<()> {
    let mut dir = path.parent();
    while let Some(d) = dir {
        std::fs::File::open(d)?.sync_all()?;
        if d == root || !d.starts_with(root) {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

/// Renames the repository into the private area (clients stop seeing it at once), then
/// deletes it.
async fn remove(repo: &RepoPath) -> Result<(), NodeError> {
    let aside = Storages::tmp_dir(&repo.root).join(format!("remove-{}", uuid::Uuid::new_v4()));
    std::fs::rename(&repo.path, &aside)
        .map_err(|e| NodeError::io(format!("moving {} aside", repo.path.display()), e))?;
    // The removal is durable before it is acknowledged (a power cut must not bring the
    // repository back).
    sync_parents(&repo.path, &repo.root)
        .map_err(|e| NodeError::io(format!("syncing the parent of {}", repo.path.display()), e))?;
    let gone = aside.clone();
    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&gone))
        .await
        .map_err(|e| NodeError::io("deleting the removed repository", std::io::Error::other(e)))?
        .map_err(|e| NodeError::io(format!("deleting {}", aside.display()), e))
}

/// The branch HEAD of a new repository points at: the request's, or `main`.
fn default_branch(requested: &[u8]) -> Result<String, NodeError> {
    if requested.is_empty() {
        return Ok("main".into());
    }
    let name = std::str::from_utf8(requested)
        .map_err(|_| NodeError::invalid("default_branch is not UTF-8"))?;
    let name = name.strip_prefix("refs/heads/").unwrap_or(name);
    if !names::valid_branch_name(name) {
        return Err(NodeError::invalid(format!(
            "default_branch {name:?} is not a valid branch name"
        )));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names() {
        assert_eq!(default_branch(b"").unwrap(), "main");
        assert_eq!(default_branch(b"refs/heads/dev").unwrap(), "dev");
        assert_eq!(default_branch(b"feature/x").unwrap(), "feature/x");
        for bad in [
            "-x", "a..b", "a b", "x.lock", "a//b", ".hidden", "a/", "@", "a~1",
        ] {
            assert!(default_branch(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
