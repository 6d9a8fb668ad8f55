//! The node's Gitaly-compatible gRPC service: Gitaly's RPCs (package `gitaly`),
//! answered by running real git on this node's storages, plus the standard gRPC
//! health service. The router forwards clients' calls here unchanged, with the
//! refvote transaction in request metadata ([`tx`]).
//!
//! Layout: one file per Gitaly service ([`server`], [`repository`], [`refs`],
//! [`smarthttp`], [`ssh`]), sharing the storage resolver ([`storage`]), the git runner ([`git`]),
//! the transaction handling ([`tx`]) and the error mapping ([`error`]). A new service
//! is a new file plus one `add_service` line in [`serve`]; methods not implemented yet
//! answer UNIMPLEMENTED.

mod blob;
mod catfile;
mod commit;
pub mod detail;
pub mod error;
pub mod git;
mod operations;
mod push;
mod refs;
pub mod repolock;
mod repository;
mod server;
mod smarthttp;
mod ssh;
pub mod storage;
pub mod tx;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use refvote_proto::gitaly;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

pub use error::NodeError;
use git::Git;
use storage::Storages;
use tx::TxSettings;

/// What every RPC handler shares.
pub struct NodeState {
    pub name: String,
    pub storages: Storages,
    pub git: Git,
    pub tx: TxSettings,
    /// Orders ref-writing git runs against maintenance and repair.
    pub locks: repolock::RepoLocks,
}

/// Binds the service's TCP listener (before anything else starts, so a busy port fails
/// start-up at once). Small gRPC frames must not wait for Nagle.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpIncoming> {
    Ok(TcpIncoming::bind(addr)?.with_nodelay(Some(true)))
}

/// The running service.
pub struct NodeServer {
    local_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl NodeServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting calls and gives running ones up to `drain` to finish.
    pub async fn shutdown(self, drain: Duration) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(drain, &mut task).await.is_err() {
            tracing::warn!("gRPC calls still running after {drain:?}; stopping them");
            task.abort();
        }
    }
}

/// Serves every implemented Gitaly service and the health service on `incoming`.
pub fn serve(incoming: TcpIncoming, state: Arc<NodeState>) -> std::io::Result<NodeServer> {
    let local_addr = incoming.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(gitaly::server_service_server::ServerServiceServer::new(
            server::ServerSvc::new(state.clone()),
        ))
        .add_service(
            gitaly::repository_service_server::RepositoryServiceServer::new(
                repository::RepositorySvc::new(state.clone()),
            ),
        )
        .add_service(gitaly::ref_service_server::RefServiceServer::new(
            refs::RefSvc::new(state.clone()),
        ))
        .add_service(gitaly::commit_service_server::CommitServiceServer::new(
            commit::CommitSvc::new(state.clone()),
        ))
        .add_service(gitaly::blob_service_server::BlobServiceServer::new(
            blob::BlobSvc::new(state.clone()),
        ))
        .add_service(
            gitaly::operation_service_server::OperationServiceServer::new(
                operations::OperationSvc::new(state.clone()),
            ),
        )
        .add_service(
            gitaly::smart_http_service_server::SmartHttpServiceServer::new(
                smarthttp::SmartHttpSvc::new(state.clone()),
            ),
        )
        .add_service(gitaly::ssh_service_server::SshServiceServer::new(
            ssh::SshSvc::new(state.clone()),
        ));
    let task = tokio::spawn(async move {
        // The empty service name (the whole server) is SERVING from the start; name
        // the Gitaly services too, for probes that ask for one.
        reporter
            .set_serving::<gitaly::server_service_server::ServerServiceServer<server::ServerSvc>>()
            .await;
        let result = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC service failed");
        }
    });
    tracing::info!(%local_addr, node = %state.name, "gRPC service listening");
    Ok(NodeServer {
        local_addr,
        stop,
        task,
    })
}

/// Reads the first message of a client stream; an empty stream is the client's error.
async fn first_message<M>(stream: &mut tonic::Streaming<M>) -> Result<M, tonic::Status> {
    stream.message().await?.ok_or_else(|| {
        NodeError::invalid("empty request stream: the first message must name the repository")
            .into()
    })
}

/// git's stdin from a client stream: the first message's data, then every later one's.
fn stream_input<M, F>(first: Vec<u8>, rest: tonic::Streaming<M>, data: F) -> git::Input
where
    M: Send + 'static,
    F: Fn(M) -> Vec<u8> + Send + 'static,
{
    use tokio_stream::StreamExt;
    Box::pin(tokio_stream::once(Ok(first)).chain(rest.map(move |m| m.map(&data))))
}
