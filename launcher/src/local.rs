//! `votingctl cluster`: a whole cluster on this machine, for trying refvote and for
//! demos of failures (DESIGN.md §7). `up` lays the cluster out in its directory
//! ([`create`]: etcd from PATH, N nodes, one router, each with its config written by
//! [`crate::config`]), records how each member is started in `cluster.json`, starts
//! them in order and waits until each is healthy, and writes `cluster.env` and a pid
//! file per process; `down`, `stop` and `start` act on the members by their pid files.
//!
//! The processes run in their own process groups and outlive votingctl; nothing but
//! the pid files (and `cluster.json`) ties them to the directory. A pid is only
//! signalled while its command line still names the directory, so a pid reused by an
//! unrelated process is never touched.

use std::fmt::Write as _;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::config::{NodeSpec, RouterSpec};
use crate::etcd::EtcdPlan;
use crate::host::{find_binary, free_ports, on_path};
use crate::member::{Kind, Member};
use crate::process::{self, Signal, alive};
use crate::ready;

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
        (alive(pid) && process::cmdline_names(pid, &self.dir)).then_some(pid)
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
                process::signal_group(pid, Signal::TERM);
                // A paused process keeps SIGTERM pending until it runs again.
                process::signal_group(pid, Signal::CONT);
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
                process::signal_group(pid, Signal::KILL);
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

fn spawn(layout: &Layout, m: &Member) -> anyhow::Result<Child> {
    let child = process::spawn_logged(
        &m.name,
        m.command(),
        &layout.log_file(&m.name),
        "votingctl cluster",
        // Its own process group: a Ctrl-C meant for votingctl or a script does not
        // reach it, and it outlives votingctl.
        true,
    )?;
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
            process::log_tail(&log, 15)
        )
    };
    loop {
        if let Some(status) = child.try_wait()? {
            let _ = std::fs::remove_file(layout.pid_file(&m.name));
            return Err(failed(format!("exited at start-up ({status})")));
        }
        let last = match ready::check(&m.ready) {
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
    let (m, n) = (opts.etcd_members, opts.nodes);
    let mut ports = free_ports(ip, 2 * m + n + 2)?.into_iter();
    let mut members = Vec::new();
    let mut env: Vec<(String, String)> = vec![("CLUSTER_DIR".into(), dir.display().to_string())];

    // etcd
    let etcd_names: Vec<String> = if m == 1 {
        vec!["etcd".into()]
    } else {
        (1..=m).map(|i| format!("etcd{i}")).collect()
    };
    let etcd_ports: Vec<u16> = ports.by_ref().take(2 * m).collect();
    let plan = EtcdPlan::new(
        ip,
        &etcd_names,
        &etcd_ports,
        |name| dir.join(name).join("data"),
        format!("refvote-local-{}", uuid::Uuid::new_v4()),
    );
    for (i, member) in plan.members.iter().enumerate() {
        std::fs::create_dir_all(dir.join(&member.name))?;
        members.push(plan.member(i, &etcd));
    }
    let endpoints = plan.endpoints();
    env.push(("ETCD_ENDPOINTS".into(), endpoints.join(",")));
    env.push(("ETCD_MEMBERS".into(), etcd_names.join(" ")));

    // Nodes
    let node_names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
    env.push(("NODES".into(), node_names.join(" ")));
    for name in &node_names {
        let spec = NodeSpec {
            name: name.clone(),
            home: dir.join(name),
            listen: (ip, ports.next().expect("enough ports")).into(),
            etcd: endpoints.clone(),
            lease_ttl_secs: LEASE_TTL_SECS,
            hook: hook.clone(),
        };
        spec.write(
            &spec.config(),
            "A local cluster's node, written by `votingctl cluster up`.",
        )?;
        let upper = name.to_uppercase();
        env.push((format!("{upper}_ADDR"), spec.listen.to_string()));
        env.push((
            format!("{upper}_CONFIG"),
            spec.config_file().display().to_string(),
        ));
        env.push((
            format!("{upper}_STORAGE"),
            spec.storage().display().to_string(),
        ));
        members.push(spec.member(&votingd));
    }

    // Router
    let spec = RouterSpec {
        name: "router".into(),
        home: dir.join("router"),
        listen: (ip, ports.next().expect("enough ports")).into(),
        http: Some((ip, ports.next().expect("enough ports")).into()),
        etcd: endpoints,
        lease_ttl_secs: LEASE_TTL_SECS,
    };
    let mut config = spec.config();
    config.create_on_push = true;
    config.replication_factor = n.min(3);
    spec.write(
        &config,
        "A local cluster's router, written by `votingctl cluster up`.",
    )?;
    env.push(("ROUTER_ADDR".into(), spec.listen.to_string()));
    env.push((
        "ROUTER_HTTP".into(),
        format!("http://{}", spec.http.expect("set above")),
    ));
    env.push((
        "ROUTER_CONFIG".into(),
        spec.config_file().display().to_string(),
    ));
    members.push(spec.member(&router));
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
pub(crate) fn shell_quote(v: &str) -> String {
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
