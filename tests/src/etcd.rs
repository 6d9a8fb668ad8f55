//! A real etcd cluster (1, 3 or 5 members) for tests: every member on one random
//! loopback address ([`loopback_ip`]) with free ports, data dirs and logs under a temp
//! dir the [`Etcd`] owns, and every member killed by pid when the [`Etcd`] is dropped.
//!
//! The members' flags are the launcher's (`refvote_launcher::etcd`, as for `votingctl
//! cluster`), with `--heartbeat-interval 50 --election-timeout 500` so elections take
//! well under a second. [`Etcd::restart`] reuses the member's data dir, ports and the
//! original `--initial-cluster-state new` flags: with an existing data dir etcd 3.4
//! ignores the initial-cluster flags and rejoins from its WAL.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use etcd_client::{Client, ConnectOptions};
use refvote_cluster::settings::EtcdSettings;
use refvote_cluster::{Store, StoreConfig};
use refvote_launcher::etcd::{EtcdPlan, EtcdServerTls};

use crate::proc::{Proc, free_ports, log_tail, loopback_ip, wait_for};
use crate::tls::TestCa;

/// How long [`Etcd::start`] waits for every member to serve a linearizable read.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Etcd::stop`] waits after SIGTERM before it sends SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of each member's log included in error messages.
const LOG_TAIL_LINES: usize = 15;
/// The key the health probes read (it need not exist).
const PROBE_KEY: &str = "refvote-harness-probe";

struct Member {
    name: String,
    proc: Option<Proc>,
}

/// A running etcd cluster. See the module docs.
pub struct Etcd {
    plan: EtcdPlan,
    /// Serve clients over TLS with certificates from this CA (peers stay plaintext).
    tls: Option<EtcdTlsFiles>,
    members: Vec<Member>,
    log_dir: PathBuf,
    // Declared last so it is removed after the members are killed (Drop kills them first anyway).
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Etcd {
    /// Starts a cluster of `members` (1, 3 or 5) and waits until a linearizable read
    /// succeeds through every member (at most [`START_TIMEOUT`]). Retries with new
    /// ports if a port was taken between choosing and binding it.
    pub async fn start(members: usize) -> anyhow::Result<Etcd> {
        Etcd::start_with(members, None).await
    }

    /// [`Etcd::start`] with clients served over TLS only, with certificates from `ca`,
    /// and client certificates required (`--client-cert-auth`).
    pub async fn start_tls(members: usize, ca: &TestCa) -> anyhow::Result<Etcd> {
        Etcd::start_with(members, Some(ca)).await
    }

    async fn start_with(members: usize, ca: Option<&TestCa>) -> anyhow::Result<Etcd> {
        if !matches!(members, 1 | 3 | 5) {
            bail!("an etcd cluster for tests has 1, 3 or 5 members, not {members}");
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut etcd = Etcd::spawn_all(members, ca)?;
            match etcd.wait_healthy(START_TIMEOUT).await {
                Ok(()) => return Ok(etcd),
                Err(e) if attempt < 3 && etcd.any_log_contains("address already in use") => {
                    eprintln!("etcd harness: port collision, retrying with new ports: {e:#}");
                    drop(etcd);
                }
                Err(e) => {
                    let e = e.context(format!(
                        "starting a {members}-member etcd at {}",
                        etcd.endpoints().join(",")
                    ));
                    // Include logs; `wait_healthy` only included them for exited members.
                    return Err(anyhow::anyhow!("{e:#}\n{}", etcd.log_tails(LOG_TAIL_LINES)));
                }
            }
        }
    }

    fn spawn_all(n: usize, ca: Option<&TestCa>) -> anyhow::Result<Etcd> {
        let ip = loopback_ip();
        let tls = match ca {
            Some(ca) => {
                let (cert, key) = ca.issue(&format!("etcd-{ip}"), ip.into())?;
                let (client_cert, client_key) =
                    ca.issue(&format!("etcd-client-{ip}"), ip.into())?;
                Some(EtcdTlsFiles {
                    ca: ca.cert.clone(),
                    cert,
                    key,
                    client_cert,
                    client_key,
                })
            }
            None => None,
        };
        let dir = tempfile::Builder::new()
            .prefix("refvote-etcd-")
            .tempdir()
            .context("creating etcd temp dir")?;
        let names: Vec<String> = (1..=n).map(|i| format!("m{i}")).collect();
        let mut plan = EtcdPlan::new(
            ip,
            &names,
            &free_ports(ip, 2 * n)?,
            |name| dir.path().join(name),
            format!("refvote-test-{}", uuid::Uuid::new_v4()),
        );
        plan.timing = Some((50, 500));
        plan.tls = tls.as_ref().map(|t| EtcdServerTls {
            cert: t.cert.clone(),
            key: t.key.clone(),
            ca: t.ca.clone(),
        });
        let members = names
            .into_iter()
            .map(|name| Member { name, proc: None })
            .collect();
        let mut etcd = Etcd {
            plan,
            tls,
            members,
            log_dir: dir.path().join("logs"),
            dir,
        };
        for i in 0..n {
            etcd.spawn_member(i)?;
        }
        Ok(etcd)
    }

    /// The TLS files clients use (`None` for a plaintext cluster).
    pub fn tls(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref()
    }

    fn spawn_member(&mut self, i: usize) -> anyhow::Result<()> {
        let cmd = self.plan.member(i, Path::new("etcd")).command();
        let proc = Proc::spawn(&self.members[i].name, cmd, &self.log_dir)?;
        self.members[i].proc = Some(proc);
        Ok(())
    }

    fn member(&self, i: usize) -> anyhow::Result<&Member> {
        self.members
            .get(i)
            .with_context(|| format!("no etcd member {i} (have {})", self.members.len()))
    }

    fn member_mut(&mut self, i: usize) -> anyhow::Result<&mut Member> {
        let n = self.members.len();
        self.members
            .get_mut(i)
            .with_context(|| format!("no etcd member {i} (have {n})"))
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The loopback address every member listens on.
    pub fn ip(&self) -> Ipv4Addr {
        self.plan.ip
    }

    /// `http://ip:port` of every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.plan.endpoints()
    }

    /// `http://ip:port` (`https://` with TLS) of member `i`'s client URL. Panics if
    /// `i` is out of range.
    pub fn endpoint(&self, i: usize) -> String {
        self.plan.endpoint(i)
    }

    /// `http://ip:port` of member `i`'s peer URL. Panics if `i` is out of range.
    pub fn peer_url(&self, i: usize) -> String {
        self.plan.peer_url(i)
    }

    /// Member `i`'s etcd `--name` (`m1`, `m2`, ...). Panics if `i` is out of range.
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// Member `i`'s data dir. Panics if `i` is out of range.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.plan.members[i].data_dir
    }

    /// The pid of member `i` if it has a process that has not been reaped.
    pub fn pid(&mut self, i: usize) -> Option<u32> {
        let p = self.members.get_mut(i)?.proc.as_mut()?;
        p.is_running().then(|| p.pid())
    }

    /// Every pid ever given to the current processes of the members (running or not).
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.proc.as_ref().map(Proc::pid))
            .collect()
    }

    /// Whether member `i`'s process is running (a paused one counts as running).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members
            .get_mut(i)
            .and_then(|m| m.proc.as_mut())
            .is_some_and(Proc::is_running)
    }

    /// SIGTERM member `i` and wait for it to exit (etcd can take over a second),
    /// SIGKILL after [`STOP_TIMEOUT`]. Blocks the calling thread. No-op if not running.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(p) = self.member_mut(i)?.proc.as_mut() {
            p.terminate(STOP_TIMEOUT)?;
        }
        Ok(())
    }

    /// SIGKILL member `i` and reap it. No-op if not running.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(p) = self.member_mut(i)?.proc.as_mut() {
            p.kill()?;
        }
        Ok(())
    }

    /// Starts member `i` again with the same data dir, ports and flags, stopping it
    /// first (SIGTERM) if it still runs. Does not wait; use [`Etcd::wait_healthy`].
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop(i)?;
        self.spawn_member(i)
    }

    /// SIGSTOP member `i`: it keeps its sockets but answers nothing.
    pub fn pause(&mut self, i: usize) -> anyhow::Result<()> {
        self.running_proc(i)?.pause()
    }

    /// SIGCONT member `i`.
    pub fn resume(&mut self, i: usize) -> anyhow::Result<()> {
        self.running_proc(i)?.resume()
    }

    fn running_proc(&mut self, i: usize) -> anyhow::Result<&mut Proc> {
        let m = self.member_mut(i)?;
        if !m.proc.as_mut().is_some_and(Proc::is_running) {
            bail!("etcd member {} is not running", m.name);
        }
        Ok(m.proc.as_mut().expect("checked above"))
    }

    /// Waits until a linearizable read succeeds through every running member (so a
    /// quorum exists and each running member has caught up with it). Fails early if a
    /// member that should be running exits; errors include that member's log tail.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let running: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.is_running(i))
            .collect();
        if running.is_empty() {
            bail!("no etcd member is running");
        }
        self.wait_members_healthy(&running, timeout).await
    }

    /// Waits until a linearizable read succeeds through member `i`.
    pub async fn wait_member_healthy(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        self.member(i)?;
        self.wait_members_healthy(&[i], timeout).await
    }

    async fn wait_members_healthy(
        &mut self,
        members: &[usize],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<(usize, Client)> = Vec::new();
        for &i in members {
            pending.push((i, self.member_client(i).await?));
        }
        let mut last_err = anyhow::anyhow!("no attempt made");
        loop {
            for &(i, _) in &pending {
                let m = &mut self.members[i];
                let exited = match m.proc.as_mut() {
                    Some(p) => p.try_status()?,
                    None => bail!("etcd member {} was never started", m.name),
                };
                if let Some(status) = exited {
                    let m = &self.members[i];
                    bail!(
                        "etcd member {} exited ({status}) while waiting for it to be healthy; log tail:\n{}",
                        m.name,
                        log_tail(
                            &self.log_dir.join(format!("{}.log", m.name)),
                            LOG_TAIL_LINES
                        )
                    );
                }
            }
            let mut still = Vec::new();
            for (i, mut client) in pending {
                let left = deadline.saturating_duration_since(Instant::now());
                let probe = tokio::time::timeout(left.min(Duration::from_secs(1)), async {
                    client.get(PROBE_KEY, None).await
                })
                .await;
                match probe {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        last_err = anyhow::Error::new(e).context(self.endpoint(i));
                        still.push((i, client));
                    }
                    Err(_) => {
                        last_err = anyhow::anyhow!("{}: read timed out", self.endpoint(i));
                        still.push((i, client));
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let names: Vec<&str> = pending.iter().map(|(i, _)| self.name(*i)).collect();
                return Err(last_err.context(format!(
                    "etcd members {names:?} not serving linearizable reads after {timeout:?}"
                )));
            }
            tokio::time::sleep(crate::proc::POLL_INTERVAL).await;
        }
    }

    /// A client for every endpoint (etcd-client balances across them), with a 1 s
    /// connect timeout and a 2 s per-request timeout.
    pub async fn client(&self) -> anyhow::Result<Client> {
        connect(&self.endpoints()).await
    }

    /// refvote's view of this etcd (the default prefix, a 2 s request timeout), as the
    /// router and votingd connect.
    pub async fn store(&self) -> anyhow::Result<Store> {
        Ok(Store::connect(&StoreConfig {
            endpoints: self.endpoints(),
            prefix: "/refvote/".into(),
            request_timeout: Duration::from_secs(2),
            tls: None,
        })
        .await?)
    }

    /// A client for member `i` only, with the same timeouts as [`Etcd::client`].
    pub async fn member_client(&self, i: usize) -> anyhow::Result<Client> {
        self.member(i)?;
        connect_with(&[self.endpoint(i)], self.tls.as_ref()).await
    }

    /// Polls until a linearizable read succeeds through `endpoint`, giving up after
    /// `timeout`. For callers that hold only an endpoint, not a `&mut Etcd`.
    pub async fn probe(endpoint: &str, timeout: Duration) -> anyhow::Result<()> {
        let ep = [endpoint.to_owned()];
        wait_for(
            &format!("a linearizable read via {endpoint}"),
            timeout,
            || async {
                let mut c = connect(&ep).await?;
                c.get(PROBE_KEY, None).await?;
                Ok(())
            },
        )
        .await
    }

    /// The last `n` lines of member `i`'s log (all its runs, in order).
    pub fn log_tail(&self, i: usize, n: usize) -> String {
        log_tail(&self.log_path(i), n)
    }

    /// Member `i`'s log file.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.log_dir.join(format!("{}.log", self.members[i].name))
    }

    /// The last `n` lines of every member's log, each under a header.
    pub fn log_tails(&self, n: usize) -> String {
        (0..self.members.len())
            .map(|i| format!("--- {} log tail ---\n{}", self.name(i), self.log_tail(i, n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn any_log_contains(&self, needle: &str) -> bool {
        (0..self.members.len())
            .any(|i| std::fs::read_to_string(self.log_path(i)).is_ok_and(|s| s.contains(needle)))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // SIGKILL (and reap) every member before the temp dir is removed.
        for m in &mut self.members {
            if let Some(mut p) = m.proc.take() {
                let _ = p.kill();
            }
        }
    }
}

async fn connect(endpoints: &[String]) -> anyhow::Result<Client> {
    connect_with(endpoints, None).await
}

async fn connect_with(endpoints: &[String], tls: Option<&EtcdTlsFiles>) -> anyhow::Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    if let Some(t) = tls {
        opts = opts.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&t.ca)?))
                .identity(etcd_client::Identity::from_pem(
                    std::fs::read(&t.client_cert)?,
                    std::fs::read(&t.client_key)?,
                )),
        );
    }
    Client::connect(endpoints, Some(opts))
        .await
        .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))
}

/// PEM files of a TLS etcd cluster: the CA, the members' certificate, and a client
/// certificate it accepts.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTlsFiles {
    /// Sets the `[etcd]` keys that make a router or node reach this cluster over TLS.
    pub fn apply(&self, etcd: &mut EtcdSettings) {
        etcd.ca_path = Some(self.ca.clone());
        etcd.certificate_path = Some(self.client_cert.clone());
        etcd.key_path = Some(self.client_key.clone());
    }
}
