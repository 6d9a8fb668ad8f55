//! A real `refvote-router` process with its own directory, config and log, listening
//! on a free port of a random loopback address. The config (a
//! `refvote_router::Config`, serialized) and the command are the launcher's, as in a
//! local cluster; the process is a child of the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use refvote_launcher::Member;
use refvote_launcher::config::RouterSpec;
use tonic::transport::Channel;

use crate::node::{Edit, bin, tls_settings, wait_ready};
use crate::proc::{Proc, free_port, loopback_ip};
use crate::tls::TestCa;

pub struct Router {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// How the launcher starts it (`--config`, its ports as the health check).
    member: Member,
    addr: SocketAddr,
    /// git smart HTTP, when started with [`RouterOptions::http`].
    http: Option<SocketAddr>,
    /// The CA of the router's TLS certificate, when it serves TLS.
    pub tls: Option<TestCa>,
    /// Prometheus `/metrics` (`prometheus_listen_addr`).
    metrics: SocketAddr,
    proc: Option<Proc>,
    /// Added to the process's environment at every launch (e.g. an armed fault point).
    pub env: Vec<(String, String)>,
}

/// Settings a test may add to a router's generated config.
#[derive(Debug, Clone, Default)]
pub struct RouterOptions {
    /// Serve TLS with a certificate from this CA (and trust it for `tls://` nodes).
    pub tls: Option<TestCa>,
    /// Serve git smart HTTP on a free port too (`http_listen_addr`).
    pub http: bool,
    /// Replicas of a repository created through this router (default 3).
    pub replication_factor: Option<usize>,
    /// Applied last to the generated config, in order ([`RouterOptions::config`]).
    pub edits: Vec<Edit<refvote_router::Config>>,
}

impl RouterOptions {
    /// The defaults, and git smart HTTP served.
    pub fn http() -> RouterOptions {
        RouterOptions {
            http: true,
            ..RouterOptions::default()
        }
    }

    /// These options, and `f` applied to the generated config (`[auth]`, stale reads,
    /// etcd's TLS files...).
    pub fn config(
        mut self,
        f: impl Fn(&mut refvote_router::Config) + Send + Sync + 'static,
    ) -> Self {
        self.edits.push(Edit::new(f));
        self
    }
}

impl Router {
    /// Writes `root/<name>/router.toml` and starts the router; waits until it accepts
    /// connections (it binds only after its registry and etcd client are set up).
    pub async fn start(name: &str, root: &Path, endpoints: &[String]) -> anyhow::Result<Router> {
        Router::start_with(name, root, endpoints, &RouterOptions::default()).await
    }

    /// [`Router::start`] with `opts` applied to the config.
    pub async fn start_with(
        name: &str,
        root: &Path,
        endpoints: &[String],
        opts: &RouterOptions,
    ) -> anyhow::Result<Router> {
        let ip = loopback_ip();
        let addr = SocketAddr::from((ip, free_port(ip)?));
        let metrics = SocketAddr::from((ip, crate::node::other_port(ip, addr.port())?));
        let http = match opts.http {
            true => Some(SocketAddr::from((ip, free_port(ip)?))),
            false => None,
        };
        let spec = RouterSpec {
            name: name.to_owned(),
            home: root.join(name),
            listen: addr,
            http,
            etcd: endpoints.to_vec(),
            lease_ttl_secs: 3,
        };
        let mut config = spec.config();
        config.prometheus_listen_addr = metrics.to_string();
        config.etcd.request_timeout_ms = 1000;
        if let Some(n) = opts.replication_factor {
            config.replication_factor = n;
        }
        if let Some(ca) = &opts.tls {
            config.tls = tls_settings(ca, name, ip.into())?;
        }
        for edit in &opts.edits {
            edit.apply(&mut config);
        }
        spec.write(
            &config,
            &format!("test router {name}, written by the harness"),
        )?;
        let mut router = Router {
            name: name.to_owned(),
            dir: spec.home.clone(),
            config: spec.config_file(),
            member: spec.member(&bin("refvote-router")),
            addr,
            http,
            tls: opts.tls.clone(),
            metrics,
            proc: None,
            env: Vec::new(),
        };
        router.launch().await?;
        Ok(router)
    }

    /// (Re)starts the process with the same config.
    pub async fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.member.command();
        cmd.env(
            "RUST_LOG",
            std::env::var("REFVOTE_ROUTER_LOG")
                .unwrap_or_else(|_| "info,refvote_router=debug".into()),
        );
        cmd.envs(self.env.iter().cloned());
        self.proc = Some(Proc::spawn(&self.name, cmd, &self.dir)?);
        wait_ready(&self.member, Duration::from_secs(20))
            .await
            .with_context(|| format!("router {} log:\n{}", self.name, self.log_tail(30)))
    }

    /// The git smart HTTP URL of `relative` (with [`RouterOptions::http`]).
    pub fn http_url(&self, relative: &str) -> String {
        let addr = self.http.expect("the router was started without http");
        format!("http://{addr}/{relative}")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the router serves Prometheus `/metrics`.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// `http://<addr>` (`https://` with TLS), for tonic clients.
    pub fn grpc_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A connected channel (over TLS, trusting the test CA, if the router serves TLS).
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let mut endpoint = Channel::from_shared(self.grpc_url())?;
        if let Some(ca) = &self.tls {
            endpoint = endpoint.tls_config(ca.client()?)?;
        }
        Ok(endpoint.tcp_nodelay(true).connect().await?)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(15))?;
        }
        Ok(())
    }

    /// Whether the process runs; false once it exited (a fault point) or was stopped.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// SIGTERM without waiting: the router drains while the test goes on; see
    /// [`Router::exit_status`].
    pub fn sigterm(&mut self) -> anyhow::Result<()> {
        let pid = self.pid().context("the router is not running")?;
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

    /// Where git smart HTTP listens (with [`RouterOptions::http`]).
    pub fn http_addr(&self) -> SocketAddr {
        self.http.expect("the router was started without http")
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill()?;
        }
        Ok(())
    }

    pub fn log_tail(&self, n: usize) -> String {
        crate::proc::log_tail(&self.dir.join(format!("{}.log", self.name)), n)
    }
}
