//! The router's calls to storage nodes outside a client's RPC: copying a replica from
//! another node (`ReplicateRepository`), a replica's checksum (`CalculateChecksum`),
//! recording a new repository's checksum, and removing a replica's copy on disk. Used
//! by repair, the admin service and repository creation; each call is bounded in time.

use std::time::Duration;

use base64::Engine;
use refvote_cluster::Store;
use refvote_cluster::repository::RepoView;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{
    CalculateChecksumRequest, RemoveRepositoryRequest, ReplicateRepositoryRequest, Repository,
};
use tonic::metadata::MetadataValue;

use crate::pool::Pool;

/// The request metadata key naming where the source storage is served (votingd's
/// `SERVERS_METADATA`, Gitaly's name).
pub const SERVERS_METADATA: &str = "gitaly-servers";

/// Why a call to a node did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    #[error("copy from {source_node} failed: {status}")]
    Copy { source_node: String, status: String },
    /// The target refused the copy as a concurrency conflict (ABORTED): e.g. the
    /// source's refs moved while it bundled them. The next try, at worst the locked
    /// one, copies again.
    #[error("copy from {source_node} overtaken by writes: {status}")]
    Overtaken { source_node: String, status: String },
    #[error("checksum after the copy failed: {0}")]
    Checksum(String),
    /// The node is not live, registers no storage, or cannot be dialled.
    #[error("{0}")]
    Unreachable(String),
}

/// Why a creation checksum was not recorded (only logged).
#[derive(Debug, thiserror::Error)]
enum CreationChecksumError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("etcd: {0}")]
    Etcd(#[from] refvote_cluster::Error),
}

/// A node's address and the storage it keeps replicas in.
fn node_of<'a>(view: &'a RepoView, node: &str) -> Result<(&'a str, &'a str), NodeError> {
    let (record, _) = view
        .live_nodes
        .get(node)
        .ok_or_else(|| NodeError::Unreachable(format!("node {node} is not live")))?;
    let storage = record
        .storages
        .first()
        .ok_or_else(|| NodeError::Unreachable(format!("node {node} registers no storage")))?;
    Ok((&record.address, storage))
}

fn repository(storage: &str, relative: &str) -> Repository {
    Repository {
        storage_name: storage.to_owned(),
        relative_path: relative.to_owned(),
        ..Default::default()
    }
}

/// `ReplicateRepository` on `target` from `source`, bounded by `timeout` (dropping the
/// call cancels it; the node then kills its git processes).
pub(crate) async fn replicate(
    pool: &Pool,
    view: &RepoView,
    source: &str,
    target: &str,
    relative: &str,
    timeout: Duration,
) -> Result<(), NodeError> {
    let (target_addr, target_storage) = node_of(view, target)?;
    let (source_addr, source_storage) = node_of(view, source)?;
    let channel = pool.channel(target_addr).map_err(NodeError::Unreachable)?;
    let mut request = tonic::Request::new(ReplicateRepositoryRequest {
        repository: Some(repository(target_storage, relative)),
        source: Some(repository(source_storage, relative)),
    });
    let servers = serde_json::json!({ source_storage: { "address": source_addr } });
    let value = base64::engine::general_purpose::STANDARD.encode(servers.to_string());
    request.metadata_mut().insert(
        SERVERS_METADATA,
        MetadataValue::try_from(value).map_err(|e| NodeError::Unreachable(e.to_string()))?,
    );
    request.set_timeout(timeout);
    let mut client = RepositoryServiceClient::new(channel);
    match tokio::time::timeout(timeout, client.replicate_repository(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) if status.code() == tonic::Code::Aborted => Err(NodeError::Overtaken {
            source_node: source.to_owned(),
            status: status.message().to_owned(),
        }),
        Ok(Err(status)) => Err(NodeError::Copy {
            source_node: source.to_owned(),
            status: format!("{:?}: {}", status.code(), status.message()),
        }),
        Err(_) => Err(NodeError::Copy {
            source_node: source.to_owned(),
            status: format!("no answer within {timeout:?}"),
        }),
    }
}

/// `CalculateChecksum` of `node`'s replica.
pub(crate) async fn checksum(
    pool: &Pool,
    view: &RepoView,
    node: &str,
    relative: &str,
) -> Result<String, NodeError> {
    let (addr, storage) = node_of(view, node)?;
    let channel = pool.channel(addr).map_err(NodeError::Unreachable)?;
    let mut request = tonic::Request::new(CalculateChecksumRequest {
        repository: Some(repository(storage, relative)),
    });
    request.set_timeout(Duration::from_secs(60));
    RepositoryServiceClient::new(channel)
        .calculate_checksum(request)
        .await
        .map(|r| r.into_inner().checksum)
        .map_err(|s| NodeError::Checksum(format!("{}: {:?}: {}", node, s.code(), s.message())))
}

/// Records a just-created repository's checksum (DESIGN.md §3 `repos/`), taken from a
/// replica the creation promoted; kept only if no write landed meanwhile.
pub(crate) async fn record_creation_checksum(
    store: &Store,
    pool: &Pool,
    repo: &refvote_cluster::RepoId,
    create_revision: i64,
    outcome: &refvote_cluster::records::TxOutcome,
) {
    let result = async {
        let view = store.repo_view(repo).await?;
        let up = view.up_to_date_live();
        let node = if outcome.committed {
            outcome.promoted.first()
        } else {
            up.first()
        }
        .cloned()
        .ok_or_else(|| NodeError::Unreachable("no replica to take the checksum from".into()))?;
        let sum = checksum(pool, &view, &node, &repo.relative_path).await?;
        let recorded = store
            .set_creation_checksum(repo, create_revision, outcome.generation, &sum)
            .await?;
        Ok::<_, CreationChecksumError>((sum, recorded))
    }
    .await;
    match result {
        Ok((sum, true)) => tracing::debug!(%repo, checksum = %sum, "creation checksum recorded"),
        Ok((_, false)) => {
            tracing::info!(%repo, "the repository changed before its creation checksum was recorded")
        }
        Err(e) => tracing::warn!(%repo, error = %e, "cannot record the creation checksum"),
    }
}

/// Deletes `node`'s copy of the repository on disk; `false` if the node could not do it.
pub(crate) async fn remove(pool: &Pool, view: &RepoView, node: &str) -> bool {
    let Some((record, _)) = view.live_nodes.get(node) else {
        return false;
    };
    let (Some(storage), Ok(channel)) = (record.storages.first(), pool.channel(&record.address))
    else {
        return false;
    };
    let mut request = tonic::Request::new(RemoveRepositoryRequest {
        repository: Some(repository(storage, &view.record.repo.relative_path)),
    });
    request.set_timeout(Duration::from_secs(60));
    match RepositoryServiceClient::new(channel)
        .remove_repository(request)
        .await
    {
        Ok(_) => true,
        // Already gone is what was wanted.
        Err(s) if s.code() == tonic::Code::NotFound => true,
        Err(s) => {
            tracing::warn!(repo = %view.record.repo, node, status = %s, "cannot remove the copy on disk");
            false
        }
    }
}
