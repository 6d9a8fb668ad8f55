//! A real votingd process with its own directory: config, storage, hooks, socket, log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::proc::{Proc, free_port, free_ports, loopback_ip, wait_until};
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
    /// TOML appended to the generated config (sections such as `[auth]`).
    pub extra_config: String,
    /// Lines added to the `[etcd]` section (e.g. [`crate::etcd::Etcd::tls_config`]).
    pub etcd_config: String,
    /// Serve TLS with a certificate from this CA (and trust it for other nodes).
    pub tls: Option<TestCa>,
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
            extra_config: String::new(),
            etcd_config: String::new(),
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
    /// Writes the node's config under `root/<name>` and starts votingd; waits until it
    /// holds its lease.
    pub async fn start(
        name: &str,
        root: &Path,
        endpoints: &[String],
        opts: &NodeOptions,
    ) -> anyhow::Result<Node> {
        let dir = root.join(name);
        let storage = dir.join("storage");
        let hooks = dir.join("hooks");
        std::fs::create_dir_all(&storage)?;
        let socket = dir.join("vote.sock");
        let config = dir.join("votingd.toml");
        let ip = loopback_ip();
        let grpc = match opts.grpc_addr {
            Some(addr) => addr,
            None => SocketAddr::from((ip, free_port(ip)?)),
        };
        let advertise = opts
            .advertise_addr
            .map(|a| format!("advertise_addr = \"{a}\"\n"))
            .unwrap_or_default();
        let metrics = SocketAddr::from((ip, other_port(ip, grpc.port())?));
        let endpoints = endpoints
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "node_name = {name:?}\nlisten_addr = \"{grpc}\"\n{advertise}socket_path = {:?}\n\
                 prometheus_listen_addr = \"{metrics}\"\n\
                 [etcd]\nendpoints = [{endpoints}]\nprefix = \"/refvote/\"\nlease_ttl_secs = {}\nrequest_timeout_ms = {}\n{}\
                 [vote]\nsocket_path = {:?}\nhooks_dir = {:?}\nvote_timeout_ms = {}\nrequire_transaction = {}\n\
                 reaper = {}\nreaper_interval_ms = {}\nhook_binary = {:?}\n\
                 [[storage]]\nname = \"default\"\npath = {:?}\n{}{}",
                dir.join("gitaly.sock"),
                opts.lease_ttl_secs,
                opts.request_timeout_ms,
                opts.etcd_config,
                socket,
                hooks,
                opts.vote_timeout_ms,
                opts.require_transaction,
                opts.reaper,
                opts.reaper_interval_ms,
                bin("reference-transaction"),
                storage,
                tls_config(opts.tls.as_ref(), name, ip.into())?,
                opts.extra_config,
            ),
        )?;
        let mut node = Node {
            name: name.to_owned(),
            dir,
            storage,
            hooks,
            socket,
            config,
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
        let mut cmd = Command::new(bin("votingd"));
        cmd.arg("--config").arg(&self.config).env(
            "RUST_LOG",
            std::env::var("REFVOTE_NODE_LOG")
                .unwrap_or_else(|_| "info,refvote_cluster=debug".into()),
        );
        cmd.envs(self.env.iter().cloned());
        self.proc = Some(Proc::spawn(&self.name, cmd, &self.dir)?);
        let socket = self.socket.clone();
        let result = wait_until(
            &format!("{} holds its lease", self.name),
            Duration::from_secs(20),
            || {
                let socket = socket.clone();
                async move {
                    votingd::client::status(&socket)
                        .map(|s| s.lease.held)
                        .unwrap_or(false)
                }
            },
        )
        .await;
        result.with_context(|| format!("votingd {} log:\n{}", self.name, self.log_tail(30)))
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

/// The `[tls]` section for a server `name` at `ip` with a certificate from `ca`
/// (empty without one).
pub fn tls_config(ca: Option<&TestCa>, name: &str, ip: std::net::IpAddr) -> anyhow::Result<String> {
    let Some(ca) = ca else {
        return Ok(String::new());
    };
    let (cert, key) = ca.issue(name, ip)?;
    Ok(format!(
        "[tls]\ncertificate_path = {cert:?}\nkey_path = {key:?}\nca_path = {:?}\n",
        ca.cert
    ))
}

/// A free port on `ip` other than `taken`.
pub(crate) fn other_port(ip: std::net::Ipv4Addr, taken: u16) -> anyhow::Result<u16> {
    free_ports(ip, 2)?
        .into_iter()
        .find(|p| *p != taken)
        .context("no second free port")
}
