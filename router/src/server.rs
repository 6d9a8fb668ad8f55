//! Starting and stopping the router: registry, etcd, listener, the catch-all
//! service on top with refvote's admin service and the services the router answers
//! itself in front of it, and the background repair worker, reaper and verifier. Everything a
//! test needs to run a router in-process.
//!
//! The listener takes plain HTTP/2 gRPC and Gitaly's backchannel connections on one
//! port (refvote-sidechannel's multiplexed listener); it ends TLS itself, because the
//! backchannel magic comes inside TLS.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use refvote_auth::AuthLayer;
use refvote_cluster::Store;
use refvote_cluster::reaper::{self, ReaperConfig};
use refvote_cluster::session::Session;
use refvote_sidechannel::{ListenConfig, MuxIncoming};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::codegen::http;

use crate::config::Config;
use crate::forward::Forwarder;
use crate::health::{Health, Verdict};
use crate::http::HttpServer;
use crate::reads::{ReadStats, Reads};
use crate::registry::{Registry, RegistryError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the method registry is invalid")]
    Registry(#[from] RegistryError),
    #[error("cannot set up the etcd client")]
    Etcd(#[from] refvote_cluster::Error),
    /// `[auth]` or `[tls]` could not be set up (a file changed since validation).
    #[error("{key}: {reason}")]
    Security { key: &'static str, reason: String },
    #[error("cannot listen on prometheus_listen_addr {addr}")]
    MetricsBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running router.
/// How long the connections get, once the drain cut its calls, to carry their
/// UNAVAILABLE answers before they are dropped.
pub const CUT_FLUSH: Duration = Duration::from_secs(1);

/// The router's exit code when its drain ran out of `drain_timeout_secs` and cut calls
/// (EX_TEMPFAIL; 0 means every call finished): systemd shows `status=75/TEMPFAIL`.
pub const EXIT_DRAIN_CUT: u8 = 75;

pub struct RouterServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    metrics: Option<JoinHandle<()>>,
    /// The lease this router's transactions are bound to.
    session: Option<Session>,
    /// Plain git over HTTP, when `http_listen_addr` is set.
    http: Option<HttpServer>,
    /// The ops web, when `admin_listen_addr` is set.
    ops_web: Option<crate::ops_web::OpsWebServer>,
    /// The repair worker, the reaper and the verifier.
    background: Vec<JoinHandle<()>>,
    forwarder: Arc<Forwarder>,
    health: Arc<Health>,
}

impl RouterServer {
    pub async fn start(config: &Config) -> Result<RouterServer, StartError> {
        // A method without its annotations fails here, not on its first call.
        let registry = Registry::gitaly()?;
        let invalid = |(key, reason)| StartError::Security { key, reason };
        let auth = config.auth_policy().map_err(invalid)?;
        let server_tls = refvote_sidechannel::tls::acceptor(&config.tls).map_err(invalid)?;
        let node_tls = config.tls.client().map_err(invalid)?;
        let node_tls_backchannel =
            refvote_sidechannel::tls::connector(&config.tls).map_err(invalid)?;
        // Every call passes the token check first, whatever answers it and whichever
        // kind of connection it came on: serve every service (the forwarder, health,
        // the router's own) through this builder.
        let builder = tonic::transport::Server::builder()
            .layer(AuthLayer::new(auth.clone(), "refvote-router"));
        let store = Store::connect(&config.etcd.store_config()).await?;
        let addr = config.listen();
        let listener = refvote_sidechannel::listen::bind(addr)
            .map_err(|source| StartError::Bind { addr, source })?;
        let listen = ListenConfig {
            stats: crate::metrics::CONNECTIONS.clone(),
            ..ListenConfig::default()
        };
        let ops_web_tls = server_tls.clone();
        let incoming = MuxIncoming::new(listener, server_tls, listen)
            .map_err(|source| StartError::Bind { addr, source })?;
        let addr = incoming.local_addr().unwrap_or(addr);
        let metrics_listener = match config.metrics() {
            Some(addr) => Some(
                refvote_telemetry::metrics::bind(addr)
                    .await
                    .map_err(|source| StartError::MetricsBind { addr, source })?,
            ),
            None => None,
        };
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
        // Repair and admin calls to nodes are signed and use TLS like forwarded ones.
        let node_pool = Arc::new(crate::pool::Pool::new(
            auth.as_ref().map(|a| a.secret.clone()),
            node_tls.clone(),
        ));
        // Every router repairs, reaps and sweeps post-receives; etcd claims and the
        // `reaper` key keep them from doing the same work twice.
        let background = vec![
            tokio::spawn(crate::repair::run(
                store.clone(),
                node_pool.clone(),
                session.subscribe(),
                crate::repair::RepairConfig::new(
                    config.router_id.clone(),
                    Duration::from_millis(config.repair_interval_ms),
                    config.repair_concurrency,
                ),
            )),
            tokio::spawn(crate::sweep::run(
                store.clone(),
                node_pool.clone(),
                session.subscribe(),
                crate::sweep::SweepConfig {
                    grace: Duration::from_millis(config.post_receive_grace_ms),
                },
            )),
            tokio::spawn(reaper::run(
                store.clone(),
                session.subscribe(),
                ReaperConfig {
                    id: config.router_id.clone(),
                    interval: Duration::from_millis(config.reaper_interval_ms),
                },
            )),
            tokio::spawn(crate::verifier::run(
                store.clone(),
                node_pool.clone(),
                session.subscribe(),
                config.router_id.clone(),
                config.verifier.clone(),
            )),
        ];
        let store_for_admin = store.clone();
        let intercepted = crate::intercepted::Intercepted::new(
            store.clone(),
            node_pool.clone(),
            config.router_id.clone(),
            session.subscribe(),
            config.virtual_storages.clone(),
            config.replication_factor,
        );
        let server_service = refvote_proto::gitaly::server_service_server::ServerServiceServer::new(
            intercepted.clone(),
        );
        let praefect_info =
            refvote_proto::gitaly::praefect_info_service_server::PraefectInfoServiceServer::new(
                intercepted,
            );
        let metrics =
            metrics_listener.map(|l| crate::metrics::serve(l, store.clone(), session.subscribe()));
        let reads = Reads::start(store.clone(), config.stale_reads());
        let forwarder_store_probe = store.clone();
        let forwarder = Arc::new(
            Forwarder::new(
                registry,
                store,
                config.router_id.clone(),
                session.subscribe(),
                config.replication_factor,
                reads,
            )
            .with_lock_wait(config.lock_wait())
            .with_limiter(crate::limit::Limiter::new(config.limits.clone()))
            .secure_calls_to_nodes(auth.as_ref().map(|a| a.secret.clone()), node_tls)
            .with_backchannels(crate::sidechannel::Backchannels::new(
                auth.as_ref().map(|a| a.secret.clone()),
                node_tls_backchannel,
            )),
        );
        // refvote's own admin service answers its paths; everything else is Gitaly's.
        let admin_service = Arc::new(crate::admin::Admin::new(
            store_for_admin.clone(),
            node_pool.clone(),
            config.router_id.clone(),
            session.subscribe(),
        ));
        let admin = refvote_proto::admin::admin_service_server::AdminServiceServer::from_arc(
            admin_service.clone(),
        );
        // grpc.health.v1 on the same port, and /-/readiness on the HTTP front: serving
        // only with the lease, etcd answering and no drain (crate::health).
        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let health = Health::start(
            forwarder_store_probe.clone(),
            forwarder_store_probe.keys().router(&config.router_id),
            session.subscribe(),
            reporter,
        );
        // Health answers from the first probe on, not from the start-up guess.
        if let Verdict::NotServing(why) = health.settle(config.request_timeout()).await {
            tracing::warn!(reason = %why, "not ready yet");
        }
        let http = match config.http_listen() {
            Some(addr) => Some(
                HttpServer::start(
                    addr,
                    forwarder.clone(),
                    config.create_on_push,
                    auth.clone(),
                    health.clone(),
                    config.limits.clone(),
                )
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };
        // The ops web calls the same admin service in-process.
        let ops_web = match config.admin_listen() {
            Some(addr) => {
                let web = crate::ops_web::OpsWeb::new(
                    &config.ops_web,
                    ops_web_tls.is_some(),
                    store_for_admin,
                    forwarder.clone(),
                    admin_service,
                    node_pool,
                    config.virtual_storages.clone(),
                );
                Some(
                    crate::ops_web::OpsWebServer::start(addr, web, ops_web_tls)
                        .await
                        .map_err(|source| StartError::Bind { addr, source })?,
                )
            }
            None => None,
        };
        let health_svc = health_service;
        let serving = forwarder.clone();
        let svc = tower::service_fn(move |req: http::Request<tonic::body::Body>| {
            let f = serving.clone();
            let mut admin = admin.clone();
            let mut health = health_svc.clone();
            let mut server_service = server_service.clone();
            let mut praefect_info = praefect_info.clone();
            let (method, started) = (req.uri().path().to_owned(), std::time::Instant::now());
            // A read-only token (`[auth_read_only]`) may call accessors and nothing else.
            let refused = req
                .extensions()
                .get::<refvote_auth::ReadOnly>()
                .and_then(|_| f.read_only_refusal(&method));
            async move {
                let resp = if let Some(status) = refused {
                    status.into_http()
                } else if method.starts_with(crate::admin::PATH_PREFIX) {
                    let Ok(r) = tower::Service::call(&mut admin, req).await;
                    r
                } else if method.starts_with("/grpc.health.v1.Health/") {
                    let Ok(r) = tower::Service::call(&mut health, req).await;
                    r
                } else if method.starts_with(crate::intercepted::SERVER_SERVICE) {
                    let Ok(r) = tower::Service::call(&mut server_service, req).await;
                    r
                } else if method.starts_with(crate::intercepted::PRAEFECT_INFO_SERVICE) {
                    let Ok(r) = tower::Service::call(&mut praefect_info, req).await;
                    r
                } else {
                    f.handle(req).await
                };
                Ok::<_, Infallible>(crate::metrics::track(&method, started, resp))
            }
        });
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let until = async {
                let _ = rx.await;
            };
            if let Err(e) = builder
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
            metrics,
            session: Some(session),
            http,
            ops_web,
            background,
            forwarder,
            health,
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

    /// Where git smart HTTP listens, if `http_listen_addr` is set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(HttpServer::local_addr)
    }

    /// Where the ops web listens, if `admin_listen_addr` is set.
    pub fn ops_web_addr(&self) -> Option<SocketAddr> {
        self.ops_web
            .as_ref()
            .map(crate::ops_web::OpsWebServer::local_addr)
    }

    /// The health verdict load balancers see.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// SIGTERM's drain. Health turns NOT_SERVING at once; calls go on being served for
    /// `grace` while balancers notice; then both listeners close (new connections are
    /// refused, HTTP/2 clients get GOAWAY, idle HTTP connections close) and calls in
    /// flight, pushes included, get up to `timeout` to finish. Calls still running then
    /// are cut: each ends with UNAVAILABLE saying the router is shutting down
    /// ([`Forwarder::cut_calls`]; a push over HTTP hears it as its refs' rejection),
    /// and the connections get [`CUT_FLUSH`] to carry that before they are dropped.
    /// Then the background work stops and the etcd lease is revoked, last, so the
    /// reaper finalizes a cut write at once. Returns whether every call finished in
    /// time (the binary exits [`EXIT_DRAIN_CUT`] when not).
    pub async fn drain(mut self, grace: Duration, timeout: Duration) -> bool {
        self.health.drain();
        self.health.drained().await;
        tracing::info!(
            grace_secs = grace.as_secs(),
            timeout_secs = timeout.as_secs(),
            "draining: reported not ready; serving on while balancers notice"
        );
        tokio::time::sleep(grace).await;
        tracing::info!("drain grace over: closing the listeners");
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(h) = &mut self.http {
            h.close();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let ops_web = self.ops_web.take();
        let ops_web = async move {
            if let Some(w) = ops_web {
                w.shutdown(timeout).await;
            }
        };
        let calls = async {
            if self.calls_end_by(deadline).await {
                tracing::info!("every call in flight finished");
                return true;
            }
            tracing::warn!(
                ?timeout,
                "calls still in flight after drain_timeout_secs: cutting them (each ends \
                 with UNAVAILABLE: the router is shutting down); raise drain_timeout_secs \
                 (and TimeoutStopSec) if calls this long are expected"
            );
            self.forwarder.cut_calls(timeout);
            if !self
                .calls_end_by(tokio::time::Instant::now() + CUT_FLUSH)
                .await
            {
                tracing::warn!("connections still open after the cut; dropping them");
                self.task.abort();
                if let Some(h) = &self.http {
                    h.abort();
                }
            }
            false
        };
        let (finished, ()) = tokio::join!(calls, ops_web);
        for task in &self.background {
            task.abort();
        }
        if let Some(m) = self.metrics.take() {
            m.abort();
        }
        // Revoked only after the calls in flight ended: their transactions are
        // finalized by then (or, cut, left for the reaper, which takes them as soon as
        // the lease is gone), and revoking frees their outcome records at once and lets
        // the other routers take over repair claims.
        if let Some(session) = self.session.take() {
            session.close().await;
        }
        tracing::info!(finished, "drained; the etcd lease is revoked");
        finished
    }

    /// Waits until both listeners' connections have ended, at most until `deadline`.
    async fn calls_end_by(&mut self, deadline: tokio::time::Instant) -> bool {
        let http = async {
            match &mut self.http {
                Some(h) => h.closed_by(deadline).await,
                None => true,
            }
        };
        let task = &mut self.task;
        let grpc =
            async { task.is_finished() || tokio::time::timeout_at(deadline, task).await.is_ok() };
        let (http, grpc) = tokio::join!(http, grpc);
        http && grpc
    }

    /// Stops at once: [`RouterServer::drain`] with no grace, calls in flight given up
    /// to `timeout`.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        self.drain(Duration::ZERO, timeout).await
    }
}
