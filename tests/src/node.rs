//! A real votingd process with its own directory: config, storage, hooks, socket, log.
//! The directory, the config (a `votingd::Config`, serialized) and the command are the
//! launcher's, as in a local cluster; the process is a child of the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use refvote_auth::TlsSettings;
use refvote_launcher::Member;
use refvote_launcher::config::NodeSpec;

use crate::proc::{Proc, free_port, free_ports, loopback_ip, wait_for};
use crate::tls::TestCa;

/// Where the workspace's binaries are: `$REFVOTE_BIN_DIR` if set, else next to the
/// test binary's `deps/` folder. The override is for a target directory shared by
/// several worktrees, where `target/debug/<bin>` is whichever worktree built last.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("REFVOTE_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        assert!(path.is_file(), "{} is missing", path.display());
        return path;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().expect("deps dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target dir")
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A change a test makes to a generated config before it is written (an `[auth]`
/// section, another git, etcd's TLS files...).
pub struct Edit<T>(Arc<dyn Fn(&mut T) + Send + Sync>);

impl<T> Edit<T> {
    pub fn new(f: impl Fn(&mut T) + Send + Sync + 'static) -> Edit<T> {
        Edit(Arc::new(f))
    }

    pub fn apply(&self, config: &mut T) {
        (self.0)(config)
    }
}

impl<T> Clone for Edit<T> {
    fn clone(&self) -> Self {
        Edit(self.0.clone())
    }
}

impl<T> std::fmt::Debug for Edit<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Edit(..)")
    }
}

/// Settings a test may change; the rest of the config is derived.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub lease_ttl_secs: u64,
    pub vote_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub require_transaction: bool,
    pub reaper_interval_ms: u64,
    /// Listen here instead of a free port of a random loopback address.
    pub grpc_addr: Option<SocketAddr>,
    /// What the node registers in etcd for routers and peers (a fault-suite link in
    /// front of it); default its listen address.
    pub advertise_addr: Option<SocketAddr>,
    /// Whether votingd runs the reaper (tests of the routers' reaper turn it off).
    pub reaper: bool,
    /// Applied last to the generated config, in order ([`NodeOptions::config`]).
    pub edits: Vec<Edit<votingd::Config>>,
    /// Serve TLS with a certificate from this CA (and trust it for other nodes).
    pub tls: Option<TestCa>,
}

impl NodeOptions {
    /// These options, and `f` applied to the generated config (an `[auth]` section,
    /// another git, etcd's TLS files...).
    pub fn config(mut self, f: impl Fn(&mut votingd::Config) + Send + Sync + 'static) -> Self {
        self.edits.push(Edit::new(f));
        self
    }
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            lease_ttl_secs: 3,
            vote_timeout_ms: 15_000,
            request_timeout_ms: 1_000,
            require_transaction: false,
            reaper_interval_ms: 200,
            grpc_addr: None,
            advertise_addr: None,
            reaper: true,
            edits: Vec::new(),
            tls: None,
        }
    }
}

pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub storage: PathBuf,
    pub hooks: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// How the launcher starts it (`--config`, its vote socket as the health check).
    member: Member,
    /// The node's gRPC service (a free port on a random loopback address).
    grpc: SocketAddr,
    /// The CA of the node's TLS certificate, when it serves TLS.
    pub tls: Option<TestCa>,
    /// Prometheus `/metrics` (`prometheus_listen_addr`).
    metrics: SocketAddr,
    proc: Option<Proc>,
    /// Added to the process's environment at every launch (e.g. an armed fault point).
    pub env: Vec<(String, String)>,
}

impl Node {
    /// Writes the node's config under `root/<name>` (the launcher's layout, as in a
    /// local cluster) and starts votingd; waits until it holds its lease.
    pub async fn start(
        name: &str,
        root: &Path,
        endpoints: &[String],
        opts: &NodeOptions,
    ) -> anyhow::Result<Node> {
        let ip = loopback_ip();
        let grpc = match opts.grpc_addr {
            Some(addr) => addr,
            None => SocketAddr::from((ip, free_port(ip)?)),
        };
        let metrics = SocketAddr::from((ip, other_port(ip, grpc.port())?));
        let spec = NodeSpec {
            name: name.to_owned(),
            home: root.join(name),
            listen: grpc,
            etcd: endpoints.to_vec(),
            lease_ttl_secs: opts.lease_ttl_secs,
            hook: bin("reference-transaction"),
        };
        let mut config = spec.config();
        config.advertise_addr = opts
            .advertise_addr
            .map(|a| a.to_string())
            .unwrap_or_default();
        config.prometheus_listen_addr = metrics.to_string();
        config.etcd.request_timeout_ms = opts.request_timeout_ms;
        config.vote.vote_timeout_ms = opts.vote_timeout_ms;
        config.vote.require_transaction = opts.require_transaction;
        config.vote.reaper = opts.reaper;
        config.vote.reaper_interval_ms = opts.reaper_interval_ms;
        if let Some(ca) = &opts.tls {
            config.tls = tls_settings(ca, name, ip.into())?;
        }
        for edit in &opts.edits {
            edit.apply(&mut config);
        }
        spec.write(
            &config,
            &format!("test node {name}, written by the harness"),
        )?;
        let mut node = Node {
            name: name.to_owned(),
            dir: spec.home.clone(),
            storage: spec.storage(),
            hooks: spec.hooks(),
            socket: spec.vote_socket(),
            config: spec.config_file(),
            member: spec.member(&bin("votingd")),
            grpc,
            tls: opts.tls.clone(),
            metrics,
            proc: None,
            env: Vec::new(),
        };
        node.launch().await?;
        Ok(node)
    }

    /// (Re)starts the process with the same config and data.
    pub async fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.member.command();
        cmd.env(
            "RUST_LOG",
            std::env::var("REFVOTE_NODE_LOG")
                .unwrap_or_else(|_| "info,refvote_cluster=debug".into()),
        );
        cmd.envs(self.env.iter().cloned());
        self.proc = Some(Proc::spawn(&self.name, cmd, &self.dir)?);
        wait_ready(&self.member, Duration::from_secs(20))
            .await
            .with_context(|| format!("votingd {} log:\n{}", self.name, self.log_tail(30)))
    }

    /// Where the node's Gitaly-compatible gRPC service listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// Where the node serves Prometheus `/metrics`.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// The Unix socket serving the same gRPC service (`socket_path`).
    pub fn grpc_socket(&self) -> PathBuf {
        self.dir.join("gitaly.sock")
    }

    /// `http://<grpc_addr>` (`https://` with TLS), for tonic clients.
    pub fn grpc_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    /// SIGTERM and wait: a clean stop (the lease is revoked).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(15))?;
        }
        Ok(())
    }

    /// SIGTERM without waiting: the node drains while the test goes on; see
    /// [`Node::exit_status`].
    pub fn sigterm(&mut self) -> anyhow::Result<()> {
        let pid = self.pid().context("the node is not running")?;
        refvote_launcher::process::signal(pid, refvote_launcher::process::Signal::TERM)?;
        Ok(())
    }

    /// The exit status once the process exited (it stays reaped here); `None` while it
    /// runs.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.proc
            .as_mut()
            .and_then(|p| p.try_status().ok().flatten())
    }

    /// SIGKILL: the lease lapses only after its TTL.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill()?;
        }
        Ok(())
    }

    /// Whether the process runs (a paused one counts); false once it exited or was
    /// stopped.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// SIGSTOP: the node freezes with its sockets open; its lease lapses after the TTL.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.proc.as_mut().context("node is not running")?.pause()
    }

    /// SIGCONT: undo [`Node::pause`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.proc.as_mut().context("node is not running")?.resume()
    }

    pub fn log_tail(&self, n: usize) -> String {
        crate::proc::log_tail(&self.dir.join(format!("{}.log", self.name)), n)
    }

    /// Path of a repository in this node's storage.
    pub fn repo(&self, relative: &str) -> PathBuf {
        self.storage.join(relative)
    }

    /// The environment git needs to vote as this node in `tx`.
    pub fn tx_env(&self, tx: &str) -> Vec<(String, String)> {
        refvote_proto::contract::transaction_env(tx, &self.name, &self.socket)
    }
}

/// The `[tls]` section of a server `name` at `ip` with a certificate from `ca`, which
/// it also trusts for the `tls://` nodes it calls.
pub fn tls_settings(ca: &TestCa, name: &str, ip: std::net::IpAddr) -> anyhow::Result<TlsSettings> {
    let (cert, key) = ca.issue(name, ip)?;
    Ok(TlsSettings {
        certificate_path: Some(cert),
        key_path: Some(key),
        client_ca_path: None,
        ca_path: Some(ca.cert.clone()),
    })
}

/// Polls the launcher's health check of `member` until it passes, at most `timeout`.
pub(crate) async fn wait_ready(member: &Member, timeout: Duration) -> anyhow::Result<()> {
    wait_for(&format!("{} is healthy", member.name), timeout, || async {
        refvote_launcher::check(&member.ready).map_err(|e| anyhow::anyhow!(e))
    })
    .await
}

/// A free port on `ip` other than `taken`.
pub(crate) fn other_port(ip: std::net::Ipv4Addr, taken: u16) -> anyhow::Result<u16> {
    free_ports(ip, 2)?
        .into_iter()
        .find(|p| *p != taken)
        .context("no second free port")
}
