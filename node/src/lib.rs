//! refvote-node: the storage node's Gitaly-compatible gRPC service. Gitaly's RPCs
//! (package `gitaly`) are answered by running real git on this node's storages, plus
//! the standard gRPC health service. The router forwards clients' calls here
//! unchanged, with the refvote transaction in request metadata ([`tx`]): the node
//! joins it, runs git with the hook's environment, and reports itself done. With
//! `[auth]` set every call (health excepted) must carry Gitaly's v2 token, on TCP and
//! the Unix socket; with `[tls]` the TCP listener serves TLS only.
//!
//! Both listeners take plain HTTP/2 gRPC and Gitaly's backchannel (refvote-sidechannel:
//! a connection that starts with `backchannel` runs yamux, gRPC on its first stream),
//! which is how gitlab-shell, workhorse and the router dial; TLS is ended by that
//! listener, before it tells the two apart. The fetch RPCs current clients call,
//! `SSHUploadPackWithSidechannel` and `PostUploadPackWithSidechannel`, move their data
//! over a sidechannel of such a connection ([`upload_pack`]).
//!
//! Layout: one file per Gitaly service (`server`, `repository`, `refs`, `commit`,
//! `blob`, `diff`, `operations`, `remote`, `smarthttp`, `ssh`), plus refvote's own node
//! service and GitLab's side of a call ([`gitlab`]: the checks once per transaction, the
//! receive hooks of a gated push, post-receive once), sharing the storage resolver
//! ([`storage`]), the git runner ([`git`]), the transaction handling ([`tx`]), the
//! per-repository lock ([`repolock`]), the error mapping ([`error`]) and Gitaly's
//! structured errors ([`detail`]), what every handler holds (`state`) and the streams
//! between gRPC and git (`stream`). A new service is a new file plus one `add_service`
//! line in [`serve`]; methods not implemented yet answer UNIMPLEMENTED. `push` puts a
//! push's commands in one canonical order (with `refvote_pktline`), so every replica's
//! receive-pack applies them alike.
//!
//! Modules import only downwards (`scripts/import-cycles.py` checks it): [`git`] and
//! [`detail`] import nothing of this crate; [`error`] only `git`; [`storage`] only
//! `error`; `repolock`, `catfile`, the ref helpers (`refs/names`, `objects`, `list`)
//! and `repository/checksum` import those; [`tx`] imports `git`, `error` and the
//! checksum; `refs/update`, `refs/write`, `repository/bundle` and
//! `repository/replicate` add `tx`; [`gitlab`] sits on `tx`, `git`, `error` and
//! `detail`; `state` and `stream` sit on all of that, `push` (what every receive-pack
//! shares) on `state`; `upload_pack` on `git` alone; the services on everything below
//! them; this file only wires the services together.
//!
//! Reads go through the read engine ([`engine`]): long-lived `git cat-file` processes
//! pooled per repository, checked for freshness before reuse, with [`object`]'s
//! parsers (commits, tags, trees as Gitaly presents them; no I/O). `object` imports
//! nothing of this crate; `engine` imports `git`, `error`, `storage` and `object`.
//!
//! It does not vote: the hook asks votingd's vote service, which decides in etcd; the
//! node only settles its confirmations through it ([`tx::SettleVotes`]) before it
//! reports done. It does not hold the node's etcd lease, read its config file or
//! install the hook; votingd does, and builds [`NodeState`] from its config.
#![forbid(unsafe_code)]

mod analysis;
mod archive;
mod attributes;
mod blame;
mod blob;
mod catfile;
mod commit;
mod conflicts;
pub mod detail;
mod diff;
pub mod engine;
pub mod error;
pub mod git;
pub mod gitlab;
mod languages;
mod license;
mod linguist;
pub mod object;
mod operations;
mod push;
mod quarantine;
mod records;
mod refs;
mod remote;
pub mod repolock;
mod repository;
mod respond;
mod search;
mod server;
mod signature;
mod smarthttp;
mod snapshot;
mod ssh;
mod state;
pub mod storage;
mod stream;
pub mod tx;
mod upload_pack;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use refvote_auth::AuthLayer;
use refvote_proto::gitaly;
use refvote_sidechannel::tls::TlsAcceptor;
use refvote_sidechannel::{ListenConfig, ListenStats, MuxIncoming};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use error::NodeError;
/// The upload-pack bridge an incremental repair's `git fetch` runs (see votingd's main).
pub use repository::{BRIDGE_ARG as REPAIR_BRIDGE_ARG, run_bridge as run_repair_bridge};
pub use state::NodeState;

/// Binds the service's TCP listener (before anything else starts, so a busy port fails
/// start-up at once). Accepted connections get TCP_NODELAY: small gRPC frames must not
/// wait for Nagle.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    refvote_sidechannel::listen::bind(addr)
}

/// The running service.
pub struct NodeServer {
    local_addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    health: tonic_health::server::HealthReporter,
}

impl NodeServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Reports NOT_SERVING on the health service (the whole server and the Gitaly
    /// services), while calls go on being served: the first step of a drain.
    pub async fn set_not_serving(&self) {
        use tonic_health::ServingStatus;
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.health
            .set_not_serving::<gitaly::server_service_server::ServerServiceServer<server::ServerSvc>>()
            .await;
    }

    /// Stops accepting calls and gives running ones up to `drain` to finish; returns
    /// whether they all did.
    pub async fn shutdown(self, drain: Duration) -> bool {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + drain;
        let mut finished = true;
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!("gRPC calls still running after {drain:?}; stopping them");
                task.abort();
                finished = false;
            }
        }
        finished
    }
}

/// Every implemented Gitaly service and the health service, routed, behind the token
/// check (which lets health through). TLS is the listener's, not tonic's.
fn routes(
    state: &Arc<NodeState>,
    auth: &AuthLayer,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> tonic::transport::server::Router<refvote_auth::server::Layered> {
    tonic::transport::Server::builder()
        .layer(auth.clone())
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
        .add_service(gitaly::diff_service_server::DiffServiceServer::new(
            diff::DiffSvc::new(state.clone()),
        ))
        .add_service(
            gitaly::conflicts_service_server::ConflictsServiceServer::new(
                conflicts::ConflictsSvc::new(state.clone()),
            ),
        )
        .add_service(gitaly::analysis_service_server::AnalysisServiceServer::new(
            analysis::AnalysisSvc::new(state.clone()),
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
        ))
        .add_service(gitaly::remote_service_server::RemoteServiceServer::new(
            remote::RemoteSvc::new(state.clone()),
        ))
        .add_service(
            refvote_proto::node::node_service_server::NodeServiceServer::new(
                gitlab::post::NodeSvc::new(state.gitlab.clone(), state.storages.clone()),
            ),
        )
}

/// Serves every implemented Gitaly service and the health service on `listener`, and
/// on the Unix socket `unix` if given (local clients, as Gitaly's `socket_path`), both
/// for plain and backchannel connections. Both check tokens when `auth` says so; TCP
/// serves TLS when `tls` is given (`refvote_sidechannel::tls::acceptor` of `[tls]`).
/// Both listeners count the connections they accept in `connections`.
pub fn serve(
    listener: TcpListener,
    unix: Option<tokio::net::UnixListener>,
    state: Arc<NodeState>,
    auth: Option<refvote_auth::AuthPolicy>,
    tls: Option<TlsAcceptor>,
    connections: Arc<ListenStats>,
) -> std::io::Result<NodeServer> {
    let auth = AuthLayer::new(auth, format!("votingd node {}", state.name));
    let listen = ListenConfig {
        stats: connections,
        ..ListenConfig::default()
    };
    let incoming = MuxIncoming::new(listener, tls, listen.clone())?;
    let local_addr = incoming
        .local_addr()
        .ok_or_else(|| std::io::Error::other("the TCP listener has no address"))?;
    let (reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    let tcp = routes(&state, &auth, health.clone());
    let until = signal(stopped.clone());
    let serving = reporter.clone();
    tasks.push(tokio::spawn(async move {
        // The empty service name (the whole server) is SERVING from the start; name
        // the Gitaly services too, for probes that ask for one.
        serving
            .set_serving::<gitaly::server_service_server::ServerServiceServer<server::ServerSvc>>()
            .await;
        if let Err(e) = tcp.serve_with_incoming_shutdown(incoming, until).await {
            tracing::error!(error = %e, "gRPC service failed");
        }
    }));
    if let Some(listener) = unix {
        let local = routes(&state, &auth, health);
        let until = signal(stopped);
        let incoming = MuxIncoming::unix(listener, listen);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = local.serve_with_incoming_shutdown(incoming, until).await {
                tracing::error!(error = %e, "gRPC service on the Unix socket failed");
            }
        }));
    }
    tracing::info!(%local_addr, node = %state.name, "gRPC service listening");
    Ok(NodeServer {
        local_addr,
        stop,
        tasks,
        health: reporter,
    })
}
