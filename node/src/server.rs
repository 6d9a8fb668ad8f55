//! ServerService: what this node is and how its storages are doing.

use std::path::Path;
use std::sync::Arc;

use refvote_proto::gitaly::server_info_response::StorageStatus;
use refvote_proto::gitaly::server_service_server::ServerService;
use refvote_proto::gitaly::{ServerInfoRequest, ServerInfoResponse};
use tonic::{Request, Response, Status};

use super::error::NodeError;
use super::storage::{PRIVATE_DIR, Storages};
use crate::state::NodeState;

pub struct ServerSvc {
    node: Arc<NodeState>,
}

impl ServerSvc {
    pub fn new(node: Arc<NodeState>) -> ServerSvc {
        ServerSvc { node }
    }
}

#[tonic::async_trait]
impl ServerService for ServerSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn server_info(
        &self,
        _request: Request<ServerInfoRequest>,
    ) -> Result<Response<ServerInfoResponse>, Status> {
        let git_version = self.node.git.version().await.map_err(NodeError::from)?;
        let storages: Vec<(String, std::path::PathBuf)> = self
            .node
            .storages
            .names()
            .map(|(n, p)| (n.to_owned(), p.to_owned()))
            .collect();
        // File-system probes block; keep them off the async workers.
        let storage_statuses = tokio::task::spawn_blocking(move || {
            storages
                .iter()
                .map(|(name, root)| storage_status(name, root))
                .collect()
        })
        .await
        .map_err(|e| Status::internal(format!("probing storages: {e}")))?;
        Ok(Response::new(ServerInfoResponse {
            server_version: format!("refvote-votingd {}", env!("CARGO_PKG_VERSION")),
            git_version,
            storage_statuses,
        }))
    }
}

fn storage_status(name: &str, root: &Path) -> StorageStatus {
    let readable = std::fs::read_dir(root).is_ok();
    let probe = Storages::tmp_dir(root).join(format!("probe-{}", uuid::Uuid::new_v4()));
    let writeable = std::fs::write(&probe, b"").is_ok() && std::fs::remove_file(&probe).is_ok();
    StorageStatus {
        storage_name: name.to_owned(),
        readable,
        writeable,
        fs_type: fs_type(root).unwrap_or_else(|| "unknown".into()),
        filesystem_id: filesystem_id(root).unwrap_or_default(),
        replication_factor: 0, // set by proxies, not by a node
    }
}

/// The type of the file system `path` is on, from the longest matching mount point.
fn fs_type(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?.replace("\\040", " ");
            let fs = right.split(' ').next()?;
            path.starts_with(&mount_point)
                .then(|| (mount_point.len(), fs.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs)
}

/// A stable id of the storage's file system, kept in the storage itself (as Gitaly
/// keeps its `.gitaly-metadata`): two nodes sharing one directory report the same id.
fn filesystem_id(root: &Path) -> Option<String> {
    let file = root.join(PRIVATE_DIR).join("filesystem-id");
    if let Ok(id) = std::fs::read_to_string(&file) {
        return Some(id.trim().to_owned());
    }
    let id = uuid::Uuid::new_v4().to_string();
    let tmp = Storages::tmp_dir(root).join(format!("filesystem-id-{id}"));
    std::fs::write(&tmp, &id).ok()?;
    // Another probe may have won the race; then its id stands.
    if std::fs::hard_link(&tmp, &file).is_err() {
        let _ = std::fs::remove_file(&tmp);
        return std::fs::read_to_string(&file)
            .ok()
            .map(|s| s.trim().to_owned());
    }
    let _ = std::fs::remove_file(&tmp);
    Some(id)
}
