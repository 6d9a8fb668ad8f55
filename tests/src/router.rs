//! A real `refvote-router` process with its own directory, config and log, listening
//! on a free port of a random loopback address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::Channel;

use crate::node::bin;
use crate::proc::{Proc, free_port, loopback_ip, wait_until};

pub struct Router {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    addr: SocketAddr,
    proc: Option<Proc>,
}

impl Router {
    /// Writes `root/<name>/router.toml` and starts the router; waits until it accepts
    /// connections (it binds only after its registry and etcd client are set up).
    pub async fn start(name: &str, root: &Path, endpoints: &[String]) -> anyhow::Result<Router> {
        Self::start_with(name, root, endpoints, "").await
    }

    /// [`Router::start`] with `extra` top-level TOML settings (e.g.
    /// `allow_stale_reads = true`).
    pub async fn start_with(
        name: &str,
        root: &Path,
        endpoints: &[String],
        extra: &str,
    ) -> anyhow::Result<Router> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let ip = loopback_ip();
        let addr = SocketAddr::from((ip, free_port(ip)?));
        let endpoints = endpoints
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join("router.toml");
        std::fs::write(
            &config,
            format!(
                "router_id = {name:?}\nlisten_addr = \"{addr}\"\n{extra}\n\
                 [etcd]\nendpoints = [{endpoints}]\nprefix = \"/refvote/\"\nlease_ttl_secs = 3\nrequest_timeout_ms = 1000\n"
            ),
        )?;
        let mut router = Router {
            name: name.to_owned(),
            dir,
            config,
            addr,
            proc: None,
        };
        router.launch().await?;
        Ok(router)
    }

    /// (Re)starts the process with the same config.
    pub async fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("refvote-router"));
        cmd.arg("--config").arg(&self.config).env(
            "RUST_LOG",
            std::env::var("REFVOTE_ROUTER_LOG")
                .unwrap_or_else(|_| "info,refvote_router=debug".into()),
        );
        self.proc = Some(Proc::spawn(&self.name, cmd, &self.dir)?);
        let addr = self.addr;
        let result = wait_until(
            &format!("{} listens on {addr}", self.name),
            Duration::from_secs(20),
            || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await;
        result.with_context(|| format!("router {} log:\n{}", self.name, self.log_tail(30)))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for tonic clients.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.grpc_url())?
            .tcp_nodelay(true)
            .connect()
            .await?)
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
