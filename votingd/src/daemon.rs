//! Assembles a running votingd from its config: the hooks directory, the etcd session
//! and node registration, the vote socket, the reaper.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use refvote_cluster::Store;
use refvote_cluster::reaper::{self, ReaperConfig};
use refvote_cluster::records::NodeRecord;
use refvote_cluster::session::Session;
use refvote_node::engine::{Limits as ReadLimits, ReadEngine};
use refvote_node::git::Git;
use refvote_node::storage::Storages;
use refvote_node::tx::TxSettings;
use refvote_node::{NodeServer, NodeState};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::hooks;
use crate::status::{self, Status};
use crate::vote::{self, VoteService};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up the hooks directory {path}")]
    Hooks {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the vote socket {path}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another votingd is serving {0}")]
    SocketInUse(String),
    #[error("socket_group {0:?} is not a group on this host")]
    UnknownGroup(String),
    #[error("cannot set up the etcd client")]
    Etcd(#[source] refvote_cluster::Error),
    #[error("cannot listen on listen_addr {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on prometheus_listen_addr {addr}")]
    MetricsListen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the storages")]
    Storages(#[source] std::io::Error),
    /// `[auth]` or `[tls]` could not be set up (a file changed since validation).
    #[error("{key}: {reason}")]
    Security { key: &'static str, reason: String },
    /// `[gitlab]` could not be set up (a file changed since validation).
    #[error("{0}")]
    Gitlab(String),
}

/// Nothing else holds a repository lock at start-up; this only bounds a surprise.
const STARTUP_LOCK_WAIT: Duration = Duration::from_secs(5);

/// votingd's exit code when its drain ran out of `drain_timeout_secs` and stopped calls
/// still in flight (EX_TEMPFAIL; 0 means every call finished): systemd shows
/// `status=75/TEMPFAIL`.
pub const EXIT_DRAIN_CUT: u8 = 75;

/// A running votingd.
pub struct Daemon {
    config: Arc<Config>,
    store: Store,
    /// What the node registers in etcd (without the draining mark).
    node: NodeRecord,
    /// Set once a drain starts: re-registrations (a new lease) keep the mark.
    draining: Arc<AtomicBool>,
    session: Session,
    service: Arc<VoteService>,
    node_server: Option<NodeServer>,
    tasks: Vec<JoinHandle<()>>,
}

impl Daemon {
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        let config = Arc::new(config);
        let hooks_dir = &config.vote.hooks_dir;
        hooks::install(
            hooks_dir,
            &config.hook_binary(),
            config.vote.require_transaction,
        )
        .map_err(|source| StartError::Hooks {
            path: hooks_dir.display().to_string(),
            source,
        })?;
        // Validated with the config; read again here (the token file may have moved).
        let invalid = |(key, reason)| StartError::Security { key, reason };
        let auth = config.auth.policy().map_err(invalid)?;
        // The listener ends TLS itself (the backchannel magic travels inside it).
        let server_tls = refvote_sidechannel::tls::acceptor(&config.tls).map_err(invalid)?;
        let client_tls = config.tls.client().map_err(invalid)?;
        let listener = bind_socket(&config)?;
        let incoming = if config.listen_addr.is_empty() {
            None
        } else {
            let listen = |source| StartError::Listen {
                addr: config.listen_addr.clone(),
                source,
            };
            let addr = config.listen_addr.parse().expect("validated");
            Some(refvote_node::bind(addr).map_err(listen)?)
        };
        // What the node's listeners accepted, for `/metrics`.
        let connections = Arc::new(refvote_sidechannel::ListenStats::default());
        let metrics = match config.prometheus_listen_addr.as_str() {
            "" => None,
            addr => Some(
                refvote_telemetry::metrics::bind(addr.parse().expect("validated"))
                    .await
                    .map_err(|source| StartError::MetricsListen {
                        addr: addr.to_owned(),
                        source,
                    })?,
            ),
        };
        let storages = Storages::open(
            config
                .storages
                .iter()
                .map(|s| (s.name.as_str(), s.path.as_path())),
        )
        .map_err(StartError::Storages)?;
        let locks = refvote_node::repolock::RepoLocks::default();
        // A crash (SIGKILL, power loss) leaves git's ref locks behind, and each one
        // fails every later update of its refs on this replica. Nothing runs git yet.
        for (name, root) in storages.names() {
            let removed = locks
                .clear_stale_ref_locks_in_storage(root, STARTUP_LOCK_WAIT)
                .await
                .map_err(|e| StartError::Storages(std::io::Error::other(e)))?;
            if !removed.is_empty() {
                tracing::warn!(
                    storage = name,
                    count = removed.len(),
                    "removed stale ref locks left by a crash"
                );
            }
        }

        let store = connect(&config).await?;
        let address = match (&incoming, config.advertise_addr.is_empty()) {
            // The bound address, so `listen_addr = "127.0.0.1:0"` registers its real port.
            (Some(i), true) => i
                .local_addr()
                .map(|a| format!("{}://{a}", config.address_scheme()))
                .unwrap_or_else(|_| config.registered_address()),
            _ => config.registered_address(),
        };
        let gitlab = Arc::new(gitlab_side(&config, store.clone())?);
        let service = Arc::new(
            VoteService::new(
                config.node_name.clone(),
                store.clone(),
                config.vote_timeout(),
            )
            .with_gitlab(gitlab.clone()),
        );
        let node_server = match incoming {
            Some(incoming) => {
                let git = Git::new(
                    config.git.bin_path.clone(),
                    config.git_timeout(),
                    config.vote.hooks_dir.clone(),
                );
                let state = Arc::new(NodeState {
                    name: config.node_name.clone(),
                    storages,
                    reads: ReadEngine::new(git.clone(), ReadLimits::default()),
                    git,
                    tx: TxSettings {
                        store: store.clone(),
                        node: config.node_name.clone(),
                        vote_socket: config.vote.socket_path.clone(),
                        require_transaction: config.vote.require_transaction,
                        votes: service.clone(),
                        post_receive: Some(gitlab.clone()),
                    },
                    locks,
                    secret: auth.as_ref().map(|a| a.secret.clone()),
                    client_tls,
                    upload_pack_negotiation: config.upload_pack_negotiation(),
                    gitlab,
                });
                let listen = |source| StartError::Listen {
                    addr: config.listen_addr.clone(),
                    source,
                };
                let unix = if config.socket_path.as_os_str().is_empty() {
                    None
                } else {
                    Some(bind_unix(&config, &config.socket_path)?)
                };
                Some(
                    refvote_node::serve(
                        incoming,
                        unix,
                        state,
                        auth,
                        server_tls,
                        connections.clone(),
                    )
                    .map_err(listen)?,
                )
            }
            None => None,
        };
        let node = NodeRecord {
            name: config.node_name.clone(),
            address,
            storages: config.storages.iter().map(|s| s.name.clone()).collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            gitlab_api: config.gitlab.is_enabled(),
            custom_hooks: config.hooks.custom_hooks_dir.is_some(),
            draining: false,
        };
        let register_store = store.clone();
        let draining = Arc::new(AtomicBool::new(false));
        let registered = node.clone();
        let marked = draining.clone();
        let session = Session::start(store.clone(), config.lease_ttl(), move |lease| {
            let store = register_store.clone();
            let node = NodeRecord {
                draining: marked.load(Ordering::SeqCst),
                ..registered.clone()
            };
            async move { store.register_node(&node, lease).await }
        });

        let started = Instant::now();
        let status_fn: vote::StatusFn = {
            let config = config.clone();
            let service = service.clone();
            let store = store.clone();
            let lease = session.subscribe();
            let draining = draining.clone();
            Arc::new(move || {
                let config = config.clone();
                let service = service.clone();
                let store = store.clone();
                let lease = *lease.borrow();
                let draining = draining.load(Ordering::SeqCst);
                Box::pin(async move {
                    let mut status = build_status(&config, &service, &store, lease, started).await;
                    status.draining = draining;
                    serde_json::to_string(&status).expect("status serializes")
                })
            })
        };
        let mut tasks = vec![tokio::spawn(vote::serve(
            listener,
            service.clone(),
            status_fn,
        ))];
        if let Some(listener) = metrics {
            tasks.push(crate::metrics::serve(
                listener,
                service.clone(),
                session.subscribe(),
                connections.clone(),
            ));
        }
        if config.vote.reaper {
            let cfg = ReaperConfig {
                id: config.node_name.clone(),
                interval: Duration::from_millis(config.vote.reaper_interval_ms),
            };
            tasks.push(tokio::spawn(reaper::run(
                store.clone(),
                session.subscribe(),
                cfg,
            )));
        }
        let sweeper = service.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                sweeper.sweep();
            }
        }));
        tracing::info!(node = %config.node_name, socket = %config.vote.socket_path.display(), "votingd started");
        Ok(Daemon {
            config,
            store,
            node,
            draining,
            session,
            service,
            node_server,
            tasks,
        })
    }

    /// Where the node's gRPC service listens, if it runs.
    pub fn grpc_addr(&self) -> Option<std::net::SocketAddr> {
        self.node_server.as_ref().map(NodeServer::local_addr)
    }

    pub fn service(&self) -> &Arc<VoteService> {
        &self.service
    }

    /// Waits until the node holds its lease (registered in etcd), up to `wait`.
    pub async fn wait_registered(&self, wait: Duration) -> bool {
        self.session.wait_for_lease(wait).await.is_some()
    }

    /// SIGTERM's drain. At once: gRPC health NOT_SERVING and the node's etcd record
    /// marked `draining`, so routers leave it out of the transactions they begin from
    /// now on and send reads elsewhere. For `grace` calls are still accepted (a
    /// transaction begun just before the mark may still call this node). Then the gRPC
    /// service stops accepting calls and gives running ones (pushes mid-vote: their git
    /// runs still need the vote socket, and report done when they end) up to
    /// `timeout`; then new hook calls are refused; votes already waiting get what is left
    /// of `timeout` to be decided; then the lease is revoked so the cluster sees this
    /// node gone without waiting for its TTL. Returns whether everything in flight
    /// finished in time.
    pub async fn drain(self, grace: Duration, timeout: Duration) -> bool {
        let Daemon {
            config,
            store,
            node,
            draining,
            session,
            service,
            node_server,
            mut tasks,
        } = self;
        draining.store(true, Ordering::SeqCst);
        if let Some(server) = &node_server {
            server.set_not_serving().await;
        }
        if let Some(lease) = session.lease() {
            let marked = NodeRecord {
                draining: true,
                ..node
            };
            // Same lease: the transactions this node votes in still see it alive.
            match store.register_node(&marked, lease).await {
                Ok(()) => tracing::info!("draining: marked in etcd, reported not ready"),
                Err(e) => {
                    tracing::warn!(error = %e, "draining: cannot mark the node in etcd; routers see it only when the lease goes")
                }
            }
        }
        tracing::info!(
            grace_secs = grace.as_secs(),
            timeout_secs = timeout.as_secs(),
            "draining: serving on for the grace"
        );
        tokio::time::sleep(grace).await;
        let started = Instant::now();
        let mut finished = true;
        if let Some(server) = node_server {
            finished &= server.shutdown(timeout).await;
            if !config.socket_path.as_os_str().is_empty() {
                let _ = std::fs::remove_file(&config.socket_path);
            }
        }
        let drain = timeout.saturating_sub(started.elapsed());
        tasks.remove(0).abort();
        let _ = std::fs::remove_file(&config.vote.socket_path);
        let deadline = Instant::now() + drain;
        while service.counters.votes_waiting.load(Ordering::Relaxed) > 0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        finished &= service.counters.votes_waiting.load(Ordering::Relaxed) == 0;
        for t in tasks {
            t.abort();
        }
        if finished {
            tracing::info!("every call in flight finished");
        } else {
            tracing::warn!(
                ?timeout,
                "calls still in flight after drain_timeout_secs; stopped them (their \
                 transactions count this node failed; it is repaired when back); raise \
                 drain_timeout_secs (and TimeoutStopSec) if calls this long are expected"
            );
        }
        // Revoked last: the calls that finished reported done first, so their
        // transactions do not count this node as failed.
        session.close().await;
        tracing::info!("votingd stopped; the etcd lease is revoked");
        finished
    }

    /// Stops at once: [`Daemon::drain`] with no grace, calls in flight given up to
    /// `timeout`.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        self.drain(Duration::ZERO, timeout).await
    }
}

/// GitLab's side of this node, from `[gitlab]`, `[hooks]` and `vote.verdict_timeout_ms`.
fn gitlab_side(
    config: &Config,
    store: Store,
) -> Result<refvote_node::gitlab::GitlabSide, StartError> {
    use refvote_gitlab::{Client, CustomHooks, GitlabHooks, RetryPolicy};
    let api = config
        .gitlab
        .resolve()
        .map_err(|e| StartError::Gitlab(e.to_string()))?
        .map(|api| Client::new(&api, concat!("refvote/", env!("CARGO_PKG_VERSION"))))
        .transpose()
        .map_err(|e| StartError::Gitlab(format!("gitlab: {e}")))?;
    let hooks = GitlabHooks::new(
        api,
        CustomHooks::new(&config.hooks),
        git_path(&config.git.bin_path),
    );
    Ok(refvote_node::gitlab::GitlabSide::new(
        refvote_node::gitlab::GitlabConfig {
            hooks,
            api: config.gitlab.is_enabled(),
            verdict_timeout: config.verdict_timeout(),
            retry: RetryPolicy::default(),
            hooks_dir: hooks::gated_dir(&config.vote.hooks_dir),
        },
        store,
        config.node_name.clone(),
    ))
}

/// `bin` as a path custom hooks can find git by: a bare name looked up in `PATH`.
fn git_path(bin: &Path) -> std::path::PathBuf {
    if bin.components().count() > 1 {
        return bin.to_owned();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| bin.to_owned())
}

async fn connect(config: &Config) -> Result<Store, StartError> {
    let store_config = config.etcd.store_config();
    Store::connect(&store_config)
        .await
        .map_err(StartError::Etcd)
}

fn bind_socket(config: &Config) -> Result<UnixListener, StartError> {
    bind_unix(config, &config.vote.socket_path)
}

/// Binds a Unix socket at `path` (removing one a dead process left), with the vote
/// socket's mode and group.
fn bind_unix(config: &Config, path: &Path) -> Result<UnixListener, StartError> {
    let shown = path.display().to_string();
    let io = |source| StartError::Socket {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse(shown));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    let mode = config.socket_mode().expect("validated");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    if !config.vote.socket_group.is_empty() {
        let gid = group_id(&config.vote.socket_group)
            .ok_or_else(|| StartError::UnknownGroup(config.vote.socket_group.clone()))?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io)?;
    }
    Ok(listener)
}

/// Looks a group up in /etc/group.
fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

async fn build_status(
    config: &Config,
    service: &VoteService,
    store: &Store,
    lease: Option<i64>,
    started: Instant,
) -> Status {
    let t = Instant::now();
    let etcd = match store.get(&store.keys().node(&config.node_name)).await {
        Ok(_) => status::EtcdHealth {
            endpoints: config.etcd.endpoints.clone(),
            reachable: true,
            error: String::new(),
            latency_ms: t.elapsed().as_secs_f64() * 1000.0,
        },
        Err(e) => status::EtcdHealth {
            endpoints: config.etcd.endpoints.clone(),
            reachable: false,
            error: e.to_string(),
            latency_ms: 0.0,
        },
    };
    let storages = config
        .storages
        .iter()
        .map(|s| status::StorageHealth {
            name: s.name.clone(),
            path: s.path.display().to_string(),
            hooks: hooks::check_storage(&s.path, &config.vote.hooks_dir),
        })
        .collect();
    let cluster = match store.repair_jobs().await {
        Ok(jobs) => status::ClusterHealth {
            repair_jobs: jobs
                .into_iter()
                .map(|j| status::RepairJobStatus {
                    repo: j.job.repo.to_string(),
                    node: j.job.node,
                    reason: j.job.reason,
                    attempts: j.job.attempts,
                    last_error: j.job.last_error,
                    last_attempt_unix_ms: j.job.last_attempt_unix_ms,
                    repairing_by: j.claimed_by,
                })
                .collect(),
            // Shown when readable; the repair jobs say whether etcd answered.
            verifiers: store.verifier_statuses().await.unwrap_or_default(),
            error: String::new(),
        },
        Err(e) => status::ClusterHealth {
            repair_jobs: Vec::new(),
            verifiers: Vec::new(),
            error: e.to_string(),
        },
    };
    let c = &service.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Status {
        node: config.node_name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_secs: started.elapsed().as_secs(),
        etcd,
        lease: status::LeaseHealth {
            held: lease.is_some(),
            id: lease,
            ttl_secs: config.etcd.lease_ttl_secs,
        },
        socket: status::SocketHealth {
            path: config.vote.socket_path.display().to_string(),
            up: true,
        },
        hooks: status::HooksHealth {
            dir: config.vote.hooks_dir.display().to_string(),
            installed: hooks::installed(Path::new(&config.vote.hooks_dir)),
            require_transaction: config.vote.require_transaction,
        },
        storages,
        open_transactions: service.open_transactions(),
        votes_waiting: get(&c.votes_waiting),
        counters: status::CounterValues {
            commits: get(&c.commits),
            aborts: get(&c.aborts),
            lost_votes: get(&c.lost),
            timeouts: get(&c.timeouts),
            errors: get(&c.errors),
            confirmations: get(&c.confirms),
            rejected_requests: get(&c.rejected_requests),
        },
        cluster,
        draining: false,
    }
}
