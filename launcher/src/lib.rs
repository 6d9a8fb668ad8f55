//! refvote-launcher: a complete refvote cluster on one machine, for trying refvote and
//! for tests and demos of failures (DESIGN.md §7); `votingctl cluster` is its command
//! line. `up` starts etcd (from PATH; one
//! member `etcd`, or `etcd1`…`etcdM`), N votingd nodes (`node1`…) and one router on
//! free loopback ports, each with its own config file and data under the cluster's
//! directory, waits until each is healthy, and writes `cluster.env` and a pid file per
//! process. `down` stops every process by its pid file; `stop` and `start` do it for
//! one member, with the same config and data.
//!
//! The processes run in their own process groups and outlive votingctl; nothing but
//! the pid files (and `cluster.json`, which records how each member is started) ties
//! them to the directory. A pid is only signalled while its command line still names
//! the directory, so a pid reused by an unrelated process is never touched. The
//! cluster runs without auth; its router creates a repository on the first push over
//! HTTP.
//!
//! Layout of DIR: `cluster.env`, `cluster.json`, `<name>.pid`, `logs/<name>.log`,
//! `etcd/` (or `etcd1/`…: data), `node1/` (`votingd.toml`, `storage/`, `hooks/`,
//! sockets), `router/router.toml`.
//!
//! It builds nothing: the binaries (`etcd` from PATH; `votingd`, `refvote-router` and
//! the hook beside the running executable or on PATH) must exist. It is not the test
//! harness's launcher (yet: `tests/src` starts its processes itself), and it never
//! runs a cluster across machines.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The file recording how every member is started.
pub const LAYOUT_FILE: &str = "cluster.json";
/// The shell-sourceable summary.
pub const ENV_FILE: &str = "cluster.env";
/// How long a member gets after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest path of a Unix socket (sun_path holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Lease TTL of the local nodes and router: a killed node stops counting as live
/// after this long (a cleanly stopped one at once).
const LEASE_TTL_SECS: u64 = 5;
const POLL: Duration = Duration::from_millis(50);

/// What `cluster up` builds.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub dir: PathBuf,
    pub nodes: usize,
    pub etcd_members: usize,
    /// The loopback address every process binds.
    pub host: Ipv4Addr,
    /// How long each stage (etcd, nodes, router) may take to become healthy.
    pub timeout: Duration,
    /// GitLab's internal API every node calls (`[gitlab]`), if any.
    pub gitlab: Option<GitlabOptions>,
}

/// `--gitlab-url URL --gitlab-secret-file FILE`: written into every node's `[gitlab]`.
#[derive(Debug, Clone)]
pub struct GitlabOptions {
    pub url: String,
    pub secret_file: PathBuf,
}

impl GitlabOptions {
    /// The `[gitlab]` section, checked as votingd will check it (the error names the
    /// option's key).
    pub fn settings(&self) -> anyhow::Result<refvote_gitlab::GitlabSettings> {
        let settings = refvote_gitlab::GitlabSettings {
            url: self.url.clone(),
            secret_file: Some(self.secret_file.clone()),
            ..Default::default()
        };
        settings
            .resolve()
            .map_err(|e| anyhow::anyhow!("--gitlab-url/--gitlab-secret-file: {e}"))?;
        Ok(settings)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Etcd,
    Node,
    Router,
}

/// How to tell a member is healthy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ready {
    /// etcd's `/health` answers `"health":"true"` (it has a leader and a quorum).
    EtcdHealth { addr: String },
    /// votingd answers on its vote socket and holds its etcd lease.
    NodeLease { socket: PathBuf },
    /// Every address accepts TCP connections (the router binds them only once its
    /// registry and etcd client are set up).
    Listening { addrs: Vec<String> },
}

/// One process of the cluster and how to start it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub kind: Kind,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ready: Ready,
}

/// `DIR/cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    pub dir: PathBuf,
    pub members: Vec<Member>,
    /// `cluster.env`'s keys and values, in order.
    pub env: Vec<(String, String)>,
}

impl Layout {
    pub fn load(dir: &Path) -> anyhow::Result<Layout> {
        let path = dir.join(LAYOUT_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no local cluster in {} ({} is missing); start one with `votingctl cluster up --dir {}`",
                dir.display(),
                path.display(),
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }

    pub fn member(&self, name: &str) -> anyhow::Result<&Member> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .with_context(|| {
                format!(
                    "no member {name:?} in the cluster at {}; its members are: {}",
                    self.dir.display(),
                    self.names().join(", ")
                )
            })
    }

    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    fn pid_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }

    fn log_file(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// The pid of `name` if its pid file names a live process that is still this
    /// cluster's (its command line names the cluster's directory).
    pub fn running_pid(&self, name: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_file(name))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (alive(pid) && cmdline_names(pid, &self.dir)).then_some(pid)
    }
}

/// Starts a new cluster in `opts.dir`, or the stopped members of the one already
/// there. Prints progress to `out`. On failure, stops what it started.
pub fn up(opts: &UpOptions, out: &mut dyn Write) -> anyhow::Result<Layout> {
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let dir = opts
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", opts.dir.display()))?;
    let layout = if dir.join(LAYOUT_FILE).exists() {
        let layout = Layout::load(&dir)?;
        writeln!(
            out,
            "cluster: {} already holds a cluster; starting its stopped members (as it was set up: --nodes and the other options apply to a new cluster only)",
            dir.display()
        )?;
        layout
    } else {
        // Never scatter a cluster over a directory that holds something else.
        if std::fs::read_dir(&dir)?.next().is_some() {
            bail!(
                "{} is not empty and holds no cluster ({LAYOUT_FILE} is missing); use a new or empty --dir",
                dir.display()
            );
        }
        if let Some(g) = &opts.gitlab {
            g.settings()?;
        }
        let layout = create(&dir, opts)?;
        std::fs::write(
            dir.join(LAYOUT_FILE),
            serde_json::to_string_pretty(&layout)?,
        )?;
        layout
    };
    write_env(&layout)?;
    let mut started: Vec<String> = Vec::new();
    let result = start_all(&layout, opts.timeout, out, &mut started);
    if let Err(e) = result {
        if !started.is_empty() {
            writeln!(
                out,
                "cluster: stopping what was started: {}",
                started.join(", ")
            )?;
            let names: Vec<&str> = started.iter().rev().map(String::as_str).collect();
            let _ = stop_members(&layout, &names, STOP_GRACE, out);
        }
        return Err(e);
    }
    writeln!(
        out,
        "cluster: up. Its settings: {} (source it: . {})",
        dir.join(ENV_FILE).display(),
        dir.join(ENV_FILE).display()
    )?;
    Ok(layout)
}

fn start_all(
    layout: &Layout,
    timeout: Duration,
    out: &mut dyn Write,
    started: &mut Vec<String>,
) -> anyhow::Result<()> {
    // etcd first (everything needs it), the nodes next (the router places
    // repositories on live nodes), the router last.
    for kind in [Kind::Etcd, Kind::Node, Kind::Router] {
        let mut children = Vec::new();
        for m in layout.members.iter().filter(|m| m.kind == kind) {
            if let Some(pid) = layout.running_pid(&m.name) {
                writeln!(out, "cluster: {} is already running (pid {pid})", m.name)?;
                continue;
            }
            let child = spawn(layout, m)?;
            started.push(m.name.clone());
            children.push((m, child));
        }
        let deadline = Instant::now() + timeout;
        for (m, mut child) in children {
            wait_ready(layout, m, &mut child, deadline, timeout)?;
            writeln!(out, "cluster: {} is up (pid {})", m.name, child.id())?;
        }
    }
    Ok(())
}

/// Starts one stopped member with its own config and data, and waits until it is
/// healthy.
pub fn start(dir: &Path, name: &str, timeout: Duration, out: &mut dyn Write) -> anyhow::Result<()> {
    let layout = Layout::load(dir)?;
    let m = layout.member(name)?;
    if let Some(pid) = layout.running_pid(name) {
        writeln!(out, "cluster: {name} is already running (pid {pid})")?;
        return Ok(());
    }
    let mut child = spawn(&layout, m)?;
    if let Err(e) = wait_ready(&layout, m, &mut child, Instant::now() + timeout, timeout) {
        let _ = stop_members(&layout, &[name], STOP_GRACE, out);
        return Err(e);
    }
    writeln!(out, "cluster: {name} is up (pid {})", child.id())?;
    Ok(())
}

/// Stops one member (SIGTERM, SIGKILL after [`STOP_GRACE`]). Stopping a stopped
/// member is not an error.
pub fn stop(dir: &Path, name: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let layout = Layout::load(dir)?;
    layout.member(name)?;
    stop_members(&layout, &[name], STOP_GRACE, out)
}

/// Stops every member: the router, then the nodes (they revoke their leases in etcd
/// as they go), then etcd. Idempotent.
pub fn down(dir: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let layout = match Layout::load(dir) {
        Ok(l) => l,
        Err(_) if !dir.join(LAYOUT_FILE).exists() => {
            writeln!(
                out,
                "cluster: no cluster in {}; nothing to stop",
                dir.display()
            )?;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for kind in [Kind::Router, Kind::Node, Kind::Etcd] {
        let names: Vec<&str> = layout
            .members
            .iter()
            .filter(|m| m.kind == kind)
            .map(|m| m.name.as_str())
            .collect();
        stop_members(&layout, &names, STOP_GRACE, out)?;
    }
    writeln!(out, "cluster: down")?;
    Ok(())
}

/// SIGTERM to each running member at once, then waits; SIGKILL for whoever is left
/// after `grace`. Removes the pid files.
fn stop_members(
    layout: &Layout,
    names: &[&str],
    grace: Duration,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut pending = Vec::new();
    for name in names {
        match layout.running_pid(name) {
            Some(pid) => {
                signal(pid, rustix::process::Signal::TERM);
                // A paused process keeps SIGTERM pending until it runs again.
                signal(pid, rustix::process::Signal::CONT);
                pending.push((*name, pid, Instant::now()));
            }
            None => {
                let _ = std::fs::remove_file(layout.pid_file(name));
            }
        }
    }
    let deadline = Instant::now() + grace;
    let mut killed = Vec::new();
    while !pending.is_empty() {
        let now = Instant::now();
        pending.retain(|(name, pid, since)| {
            if alive(*pid) {
                return true;
            }
            let _ = writeln!(
                out,
                "cluster: {name} stopped (pid {pid}, {:.1}s)",
                since.elapsed().as_secs_f64()
            );
            let _ = std::fs::remove_file(layout.pid_file(name));
            false
        });
        if now >= deadline {
            for (name, pid, _) in pending.drain(..) {
                signal(pid, rustix::process::Signal::KILL);
                killed.push((name, pid));
            }
            break;
        }
        std::thread::sleep(POLL);
    }
    for (name, pid) in killed {
        let until = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        if alive(pid) {
            bail!("{name} (pid {pid}) is still running after SIGKILL");
        }
        writeln!(
            out,
            "cluster: {name} did not stop within {grace:?} of SIGTERM; killed (pid {pid})"
        )?;
        let _ = std::fs::remove_file(layout.pid_file(name));
    }
    Ok(())
}

/// Signals the member's process group (it leads one: see [`spawn`]), so a helper it
/// started goes with it; the process alone if the group is gone.
fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        && rustix::process::kill_process_group(pid, sig).is_err()
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Whether `pid` is a process that has not exited (a zombie has).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some("Z") | Some("X") | None => false,
        Some(_) => true,
    }
}

/// Whether `pid`'s command line names `dir` (every member's does: config or data).
fn cmdline_names(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // `DIR/`, so that a sibling `DIR2/` does not count.
    let mut dir = dir.as_os_str().as_encoded_bytes().to_vec();
    dir.push(b'/');
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg.windows(dir.len()).any(|w| w == dir.as_slice()))
}

fn spawn(layout: &Layout, m: &Member) -> anyhow::Result<Child> {
    let log_path = layout.log_file(&m.name);
    std::fs::create_dir_all(log_path.parent().expect("logs dir"))?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    writeln!(
        log,
        "=== votingctl cluster: starting {}: {} {}",
        m.name,
        m.program.display(),
        m.args.join(" ")
    )?;
    let mut cmd = Command::new(&m.program);
    cmd.args(&m.args)
        .envs(m.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        // Its own process group: a Ctrl-C meant for votingctl or a script does not
        // reach it, and it outlives votingctl.
        .process_group(0);
    if m.kind == Kind::Etcd {
        // etcd reads ETCD_* variables as flags (cluster.env has ETCD_ENDPOINTS).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}: cannot run {}", m.name, m.program.display()))?;
    std::fs::write(layout.pid_file(&m.name), format!("{}\n", child.id()))?;
    Ok(child)
}

fn wait_ready(
    layout: &Layout,
    m: &Member,
    child: &mut Child,
    deadline: Instant,
    timeout: Duration,
) -> anyhow::Result<()> {
    let log = layout.log_file(&m.name);
    let failed = |why: String| {
        anyhow::anyhow!(
            "{} {why}; its log is {}:\n{}",
            m.name,
            log.display(),
            log_tail(&log, 15)
        )
    };
    loop {
        if let Some(status) = child.try_wait()? {
            let _ = std::fs::remove_file(layout.pid_file(&m.name));
            return Err(failed(format!("exited at start-up ({status})")));
        }
        let last = match check(&m.ready) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "did not become healthy within {timeout:?} (last check: {last})"
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// One health check; the error says what is not ready.
pub fn check(ready: &Ready) -> Result<(), String> {
    match ready {
        Ready::EtcdHealth { addr } => {
            let body = http_get(addr, "/health").map_err(|e| format!("GET /health: {e}"))?;
            if body.contains("\"health\":\"true\"") {
                Ok(())
            } else {
                Err(format!("GET /health answered {}", body.trim()))
            }
        }
        Ready::NodeLease { socket } => match votingd::client::status(socket) {
            Ok(s) if s.lease.held => Ok(()),
            Ok(_) => Err("votingd answers but holds no etcd lease yet".into()),
            Err(e) => Err(format!("votingd's socket {}: {e:#}", socket.display())),
        },
        Ready::Listening { addrs } => {
            for a in addrs {
                let addr: SocketAddr = a.parse().map_err(|e| format!("{a}: {e}"))?;
                TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    .map_err(|e| format!("{a} does not accept connections: {e}"))?;
            }
            Ok(())
        }
    }
}

/// A minimal HTTP/1.0 GET; returns the body.
fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.take(64 * 1024).read_to_string(&mut resp)?;
    Ok(resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(resp))
}

fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}

/// A program next to this executable (where `cargo build` and the packages put
/// refvote's binaries), else from PATH.
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    on_path(name).with_context(|| {
        format!("{name} is neither next to votingctl nor on PATH (build the workspace: cargo build --workspace --bins)")
    })
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `n` distinct ports on `ip` that were free a moment ago (all held until chosen).
fn free_ports(ip: Ipv4Addr, n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Writes every member's config and data directories and returns the layout.
fn create(dir: &Path, opts: &UpOptions) -> anyhow::Result<Layout> {
    if !(1..=9).contains(&opts.nodes) {
        bail!("--nodes must be between 1 and 9, not {}", opts.nodes);
    }
    if !matches!(opts.etcd_members, 1 | 3 | 5) {
        bail!(
            "--etcd-members must be 1, 3 or 5, not {}",
            opts.etcd_members
        );
    }
    if !opts.host.is_loopback() {
        bail!(
            "--host must be a loopback address (127.0.0.0/8), not {}",
            opts.host
        );
    }
    let longest = dir.join("node9").join("gitaly.sock");
    if longest.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "{} is too long for the nodes' Unix sockets ({} bytes, at most {MAX_SOCKET_PATH}); use a shorter --dir",
            dir.display(),
            longest.as_os_str().len()
        );
    }
    let etcd = on_path("etcd").context(
        "etcd is not on PATH: install it (Debian: apt-get install etcd-server, or run scripts/setup.sh)",
    )?;
    let votingd = find_binary("votingd")?;
    let router = find_binary("refvote-router")?;
    let hook = find_binary("reference-transaction")?;

    let ip = opts.host;
    let m = opts.etcd_members;
    let n = opts.nodes;
    let mut ports = free_ports(ip, 2 * m + n + 2)?.into_iter();
    let mut port = || ports.next().expect("enough ports");
    let mut members = Vec::new();
    let mut env: Vec<(String, String)> = vec![("CLUSTER_DIR".into(), dir.display().to_string())];

    // etcd
    let etcd_names: Vec<String> = if m == 1 {
        vec!["etcd".into()]
    } else {
        (1..=m).map(|i| format!("etcd{i}")).collect()
    };
    let etcd_ports: Vec<(u16, u16)> = (0..m).map(|_| (port(), port())).collect();
    let initial_cluster = etcd_names
        .iter()
        .zip(&etcd_ports)
        .map(|(name, (_, peer))| format!("{name}=http://{ip}:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let endpoints: Vec<String> = etcd_ports
        .iter()
        .map(|(client, _)| format!("http://{ip}:{client}"))
        .collect();
    let token = format!("refvote-local-{}", uuid::Uuid::new_v4());
    for (name, (client, peer)) in etcd_names.iter().zip(&etcd_ports) {
        let data = dir.join(name);
        std::fs::create_dir_all(&data)?;
        let client_url = format!("http://{ip}:{client}");
        let peer_url = format!("http://{ip}:{peer}");
        let args = [
            "--name",
            name,
            "--data-dir",
            &data.join("data").display().to_string(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &token,
            "--logger=zap",
            "--log-level=warn",
            "--log-outputs=stderr",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        members.push(Member {
            name: name.clone(),
            kind: Kind::Etcd,
            program: etcd.clone(),
            args,
            env: Vec::new(),
            ready: Ready::EtcdHealth {
                addr: format!("{ip}:{client}"),
            },
        });
    }
    let endpoints_toml = endpoints
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    env.push(("ETCD_ENDPOINTS".into(), endpoints.join(",")));
    env.push(("ETCD_MEMBERS".into(), etcd_names.join(" ")));

    // Nodes
    let node_names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
    env.push(("NODES".into(), node_names.join(" ")));
    for name in &node_names {
        let home = dir.join(name);
        let storage = home.join("storage");
        let hooks = home.join("hooks");
        std::fs::create_dir_all(&storage)?;
        std::fs::create_dir_all(&hooks)?;
        let addr = format!("{ip}:{}", port());
        let socket = home.join("vote.sock");
        let config = home.join("votingd.toml");
        let mut text = String::new();
        writeln!(
            text,
            "# A local cluster's node, written by `votingctl cluster up`.\n\
             node_name = {name:?}\nlisten_addr = {addr:?}\nsocket_path = {}\n\n\
             [etcd]\nendpoints = [{endpoints_toml}]\nlease_ttl_secs = {LEASE_TTL_SECS}\n\n\
             [vote]\nsocket_path = {}\nhooks_dir = {}\nhook_binary = {}\n\n\
             [[storage]]\nname = \"default\"\npath = {}",
            toml_str(&home.join("gitaly.sock")),
            toml_str(&socket),
            toml_str(&hooks),
            toml_str(&hook),
            toml_str(&storage),
        )?;
        if let Some(g) = &opts.gitlab {
            #[derive(Serialize)]
            struct Section {
                gitlab: refvote_gitlab::GitlabSettings,
            }
            let section = toml::to_string(&Section {
                gitlab: g.settings()?,
            })?;
            write!(text, "\n{section}")?;
        }
        std::fs::write(&config, text)?;
        let upper = name.to_uppercase();
        env.push((format!("{upper}_ADDR"), addr));
        env.push((format!("{upper}_CONFIG"), config.display().to_string()));
        env.push((format!("{upper}_STORAGE"), storage.display().to_string()));
        members.push(Member {
            name: name.clone(),
            kind: Kind::Node,
            program: votingd.clone(),
            args: vec!["--config".into(), config.display().to_string()],
            env: vec![("RUST_LOG".into(), "info".into())],
            ready: Ready::NodeLease { socket },
        });
    }

    // Router
    let home = dir.join("router");
    std::fs::create_dir_all(&home)?;
    let grpc = format!("{ip}:{}", port());
    let http = format!("{ip}:{}", port());
    let config = home.join("router.toml");
    std::fs::write(
        &config,
        format!(
            "# A local cluster's router, written by `votingctl cluster up`.\n\
             router_id = \"router\"\nlisten_addr = {grpc:?}\nhttp_listen_addr = {http:?}\n\
             create_on_push = true\nreplication_factor = {}\n\n\
             [etcd]\nendpoints = [{endpoints_toml}]\nlease_ttl_secs = {LEASE_TTL_SECS}\n",
            n.min(3)
        ),
    )?;
    env.push(("ROUTER_ADDR".into(), grpc.clone()));
    env.push(("ROUTER_HTTP".into(), format!("http://{http}")));
    env.push(("ROUTER_CONFIG".into(), config.display().to_string()));
    members.push(Member {
        name: "router".into(),
        kind: Kind::Router,
        program: router,
        args: vec!["--config".into(), config.display().to_string()],
        env: vec![("RUST_LOG".into(), "info".into())],
        ready: Ready::Listening {
            addrs: vec![grpc, http],
        },
    });
    Ok(Layout {
        dir: dir.to_owned(),
        members,
        env,
    })
}

/// Writes `cluster.env`: `KEY=value` lines a shell can source.
fn write_env(layout: &Layout) -> anyhow::Result<()> {
    let mut text = format!(
        "# refvote local cluster, written by `votingctl cluster up`. Source it: . {}\n",
        layout.dir.join(ENV_FILE).display()
    );
    for (k, v) in &layout.env {
        writeln!(text, "{k}={}", shell_quote(v))?;
    }
    let path = layout.dir.join(ENV_FILE);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// `v` as one shell word: bare when it is plain, else in quotes.
fn shell_quote(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:,@+=".contains(c));
    if plain {
        v.to_owned()
    } else if !v.contains(['"', '\\', '$', '`']) {
        format!("\"{v}\"")
    } else {
        format!("'{}'", v.replace('\'', r"'\''"))
    }
}

/// Reads a `cluster.env` back (for tests and tools): its keys and unquoted values.
pub fn read_env(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let path = dir.join(ENV_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("{}: {line:?} is not KEY=value", path.display()))?;
        let v = if let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            inner.to_owned()
        } else if let Some(inner) = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            inner.replace(r"'\''", "'")
        } else {
            v.to_owned()
        };
        out.push((k.to_owned(), v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_are_shell_words() {
        assert_eq!(shell_quote("127.0.0.1:5"), "127.0.0.1:5");
        assert_eq!(shell_quote("node1 node2"), "\"node1 node2\"");
        assert_eq!(shell_quote("it's $x"), r"'it'\''s $x'");
        assert_eq!(shell_quote(""), "\"\"");
    }

    #[test]
    fn a_pid_counts_only_while_alive_and_naming_the_dir() {
        // A member with a helper of its own, in its own process group, as spawn() does.
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30; :", "/tmp/refvote-x/node1/votingd.toml"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(alive(pid));
        // Right after fork the child still shows the test's command line, until exec.
        let until = Instant::now() + Duration::from_secs(5);
        while !cmdline_names(pid, Path::new("/tmp/refvote-x")) && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        assert!(cmdline_names(pid, Path::new("/tmp/refvote-x")));
        assert!(!cmdline_names(pid, Path::new("/tmp/refvote")));
        assert!(!cmdline_names(pid, Path::new("/tmp/refvote-x/node")));
        // The whole group goes: nothing of it is left behind.
        signal(pid, rustix::process::Signal::KILL);
        // Until it is reaped it is a zombie, which does not count as alive.
        let until = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        assert!(!alive(pid));
        child.wait().unwrap();
        assert!(!alive(u32::MAX));
    }
}
