//! A real nginx (Debian's, from PATH or /usr/sbin) in front of test routers, run with
//! the shipped `install/nginx/refvote.conf`: its upstream `server` lines replaced by
//! the routers' addresses and its `listen` lines by free loopback ports, everything
//! else as shipped. The main config, pid file, logs and temp directories live in the
//! test's directory (`-p prefix -c conf -g 'daemon off;'`); the access log records the
//! upstream every request went to. The master is stopped by pid (SIGTERM, then SIGKILL
//! to it and any worker left) when the value is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use refvote_launcher::process::{Signal, signal};

use crate::proc::{Proc, descendants, free_port, loopback_ip, wait_until};

/// The shipped configuration.
pub const SHIPPED: &str = include_str!("../../install/nginx/refvote.conf");

pub struct Nginx {
    pub dir: PathBuf,
    /// git smart HTTP, in front of the routers' `http_listen_addr`.
    pub http: SocketAddr,
    /// gRPC (HTTP/2 cleartext), in front of the routers' `listen_addr`.
    pub grpc: SocketAddr,
    proc: Option<Proc>,
}

/// nginx's binary: `nginx` on PATH, else Debian's /usr/sbin/nginx.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("nginx"))
            .find(|p| p.is_file())
    }) {
        return Ok(p);
    }
    let debian = PathBuf::from("/usr/sbin/nginx");
    if debian.is_file() {
        return Ok(debian);
    }
    bail!("nginx is not installed (scripts/setup.sh installs Debian's nginx-light)")
}

/// The shipped config with `http` and `grpc` as the upstreams' servers and the two
/// servers listening on `listen_http` and `listen_grpc`. Pure, so the rewrite itself
/// is checked apart from nginx.
pub fn render(
    shipped: &str,
    http: &[SocketAddr],
    grpc: &[SocketAddr],
    listen_http: SocketAddr,
    listen_grpc: SocketAddr,
) -> anyhow::Result<String> {
    let mut out = String::new();
    // Inside an upstream block: its servers, and whether they were written yet.
    let mut upstream: Option<(&[SocketAddr], bool)> = None;
    let mut replaced = 0;
    let mut listens = 0;
    for line in shipped.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("upstream ") {
            let servers = match name.trim_end_matches('{').trim() {
                "refvote_git_http" => http,
                "refvote_grpc" => grpc,
                other => bail!("unexpected upstream {other}"),
            };
            upstream = Some((servers, false));
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if let (Some((servers, written)), Some(rest)) =
            (upstream.as_mut(), t.strip_prefix("server "))
        {
            // The shipped parameters (max_fails, fail_timeout) kept, one line per
            // router in place of the example's.
            let params = rest
                .trim_end_matches(';')
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ");
            if !*written {
                for s in servers.iter() {
                    out.push_str(&format!("    server {s} {params};\n"));
                }
                *written = true;
            }
            replaced += 1;
            continue;
        }
        if t.starts_with('}') {
            upstream = None;
        }
        if let Some(rest) = t.strip_prefix("listen ") {
            let mut words = rest.trim_end_matches(';').split_whitespace();
            let _port = words.next();
            let flags: Vec<_> = words.collect();
            let addr = if flags.contains(&"http2") {
                listen_grpc
            } else {
                listen_http
            };
            out.push_str(&format!("    listen {addr} {};\n", flags.join(" ")));
            listens += 1;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if replaced != 4 || listens != 2 {
        bail!("the shipped config changed shape: {replaced} upstream servers, {listens} listens");
    }
    Ok(out)
}

impl Nginx {
    /// Starts nginx in `root/nginx` in front of routers serving HTTP on `http` and gRPC
    /// on `grpc`; waits until both ports accept connections.
    pub async fn start(
        root: &Path,
        http: &[SocketAddr],
        grpc: &[SocketAddr],
    ) -> anyhow::Result<Nginx> {
        Nginx::start_edited(&root.join("nginx"), http, grpc, |site| site).await
    }

    /// [`Nginx::start`] in `dir`, with the rendered config passed through `edit` (one
    /// setting changed, to see what an operator who changes it gets).
    pub async fn start_edited(
        dir: &Path,
        http: &[SocketAddr],
        grpc: &[SocketAddr],
        edit: impl FnOnce(String) -> String,
    ) -> anyhow::Result<Nginx> {
        let dir = dir.to_owned();
        std::fs::create_dir_all(dir.join("logs"))?;
        let ip = loopback_ip();
        let listen_http = SocketAddr::from((ip, free_port(ip)?));
        let listen_grpc = SocketAddr::from((ip, free_port(ip)?));
        let site = edit(render(SHIPPED, http, grpc, listen_http, listen_grpc)?);
        std::fs::write(dir.join("refvote.conf"), site)?;
        // Workers run as the test's user (nginx started as root would switch to
        // nobody, who cannot write the test's directory).
        let user = if rustix::process::geteuid().is_root() {
            "user root root;\n"
        } else {
            ""
        };
        let d = dir.display();
        let main = format!(
            "# written by the refvote test harness\n\
             {user}worker_processes 2;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/logs/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   log_format upstream '$remote_addr \"$request\" $status $upstream_addr $upstream_status $request_time';\n\
             \x20   access_log {d}/logs/access.log upstream;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   include {d}/refvote.conf;\n\
             }}\n"
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, main)?;
        let bin = binary()?;
        let check = Command::new(&bin)
            .arg("-t")
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-c")
            .arg(&conf)
            .output()?;
        if !check.status.success() {
            bail!(
                "nginx -t refuses the config: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let mut cmd = Command::new(&bin);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-c")
            .arg(&conf)
            .arg("-g")
            .arg("daemon off;");
        let proc = Proc::spawn("nginx", cmd, &dir)?;
        let nginx = Nginx {
            dir,
            http: listen_http,
            grpc: listen_grpc,
            proc: Some(proc),
        };
        for addr in [listen_http, listen_grpc] {
            wait_until("nginx listening", Duration::from_secs(10), || async move {
                tokio::net::TcpStream::connect(addr).await.is_ok()
            })
            .await
            .with_context(|| nginx.log_tail(20))?;
        }
        Ok(nginx)
    }

    /// The git smart HTTP URL of `relative` through nginx.
    pub fn http_url(&self, relative: &str) -> String {
        format!("http://{}/{relative}", self.http)
    }

    /// `http://<grpc>` for tonic clients.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The access log: one line per request, with the upstream that served it.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/access.log")).unwrap_or_default()
    }

    /// What went wrong, for failure messages: the error log's warnings and errors (not
    /// its info lines about closed keep-alive connections) and every access-log line
    /// nginx answered with a 5xx, with the upstream it tried and that upstream's status.
    pub fn problems(&self) -> String {
        let errors = std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default();
        let mut out = String::from("nginx errors:\n");
        for line in errors
            .lines()
            .filter(|l| !l.contains("[info]") && !l.contains("[notice]"))
        {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("nginx 5xx answers:\n");
        for line in self.access_log().lines() {
            // `$remote_addr "$request" $status ...`: the status follows the quoted request.
            let status = line
                .rsplit_once('"')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            if status.is_some_and(|s| s.starts_with('5')) {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The error log's last `n` lines and the process log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "{}\n{}",
            crate::proc::log_tail(&self.dir.join("logs/error.log"), n),
            crate::proc::log_tail(&self.dir.join("nginx.log"), n)
        )
    }

    /// Fast shutdown (SIGTERM to the master, which stops its workers), then SIGKILL to
    /// the master and to any worker still there, each by pid.
    pub fn stop(&mut self) {
        let Some(mut proc) = self.proc.take() else {
            return;
        };
        let workers: Vec<u32> = descendants(proc.pid())
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        let _ = proc.terminate(Duration::from_secs(5));
        for pid in workers {
            if crate::proc::pid_exists(pid) {
                let _ = signal(pid, Signal::KILL);
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_is_rewritten_to_the_test_addresses() {
        let a: SocketAddr = "127.0.0.5:1001".parse().unwrap();
        let b: SocketAddr = "127.0.0.5:1002".parse().unwrap();
        let g: SocketAddr = "127.0.0.5:2001".parse().unwrap();
        let (lh, lg) = (
            "127.0.0.5:80".parse().unwrap(),
            "127.0.0.5:81".parse().unwrap(),
        );
        let out = render(SHIPPED, &[a, b], &[g], lh, lg).unwrap();
        assert!(out.contains("server 127.0.0.5:1001 max_fails=2 fail_timeout=5s;"));
        assert!(out.contains("server 127.0.0.5:1002 max_fails=2 fail_timeout=5s;"));
        assert!(out.contains("server 127.0.0.5:2001 max_fails=2 fail_timeout=5s;"));
        assert!(!out.contains("10.0.0.1"), "{out}");
        assert!(out.contains("listen 127.0.0.5:80 ;"));
        assert!(out.contains("listen 127.0.0.5:81 http2;"));
        assert_eq!(out.matches("server 127.0.0.5:2001").count(), 1, "{out}");
    }
}
