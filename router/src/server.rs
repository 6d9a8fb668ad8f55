//! Starting and stopping the router: registry, etcd, listener, and the catch-all
//! service on top. Everything a test needs to run a router in-process.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use refvote_cluster::Store;
use refvote_cluster::session::Session;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::codegen::http;
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::forward::Forwarder;
use crate::reads::{ReadStats, Reads};
use crate::registry::{Registry, RegistryError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the method registry is invalid")]
    Registry(#[from] RegistryError),
    #[error("cannot set up the etcd client")]
    Etcd(#[from] refvote_cluster::Error),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running router.
pub struct RouterServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    /// The lease this router's transactions are bound to.
    session: Option<Session>,
    forwarder: Arc<Forwarder>,
}

impl RouterServer {
    pub async fn start(config: &Config) -> Result<RouterServer, StartError> {
        // A method without its annotations fails here, not on its first call.
        let registry = Registry::gitaly()?;
        let store = Store::connect(&config.etcd.store_config()).await?;
        let addr = config.listen();
        let incoming = TcpIncoming::bind(addr)
            .map_err(|source| StartError::Bind { addr, source })?
            .with_nodelay(Some(true));
        let addr = incoming
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        // Every transaction this router creates hangs on this lease: if the router dies
        // the lease lapses and the reaper finalizes what it left (DESIGN.md §2 step 8).
        let router_id = config.router_id.clone();
        let register = store.clone();
        let listen = addr.to_string();
        let session = Session::start(store.clone(), config.lease_ttl(), move |lease| {
            let (store, id, listen) = (register.clone(), router_id.clone(), listen.clone());
            async move { store.register_router(&id, &listen, lease).await }
        });
        // Writes need the lease; waiting a little here spares the first pushes an
        // UNAVAILABLE. Reads do not need it, so a slow etcd does not stop the start.
        if session.wait_for_lease(config.lease_ttl()).await.is_none() {
            tracing::warn!("no etcd lease yet; writes are refused until one is granted");
        }
        let reads = Reads::start(store.clone(), config.stale_reads());
        let forwarder = Arc::new(Forwarder::new(
            registry,
            store,
            config.router_id.clone(),
            session.subscribe(),
            config.replication_factor,
            reads,
        ));
        let serving = forwarder.clone();
        let svc = tower::service_fn(move |req: http::Request<tonic::body::Body>| {
            let f = serving.clone();
            async move { Ok::<_, Infallible>(f.handle(req).await) }
        });
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let until = async {
                let _ = rx.await;
            };
            if let Err(e) = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(svc, incoming, until)
                .await
            {
                tracing::error!(error = %e, "the gRPC server stopped");
            }
        });
        tracing::info!(%addr, router = %config.router_id, "serving");
        Ok(RouterServer {
            addr,
            shutdown: Some(tx),
            task,
            session: Some(session),
            forwarder,
        })
    }

    /// Counters of the read path (reads, shared etcd confirm rounds, stale reads).
    pub fn read_stats(&self) -> ReadStats {
        self.forwarder.read_stats()
    }

    /// Where the router listens (the bound port when `listen_addr` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting calls and waits up to `grace` for calls in flight.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            tracing::warn!(
                ?grace,
                "calls still in flight after the grace period; stopping them"
            );
            self.task.abort();
        }
        // Revoked only after the calls in flight finished: their transactions are
        // finalized by then, and revoking frees their outcome records at once.
        if let Some(session) = self.session.take() {
            session.close().await;
        }
    }
}
