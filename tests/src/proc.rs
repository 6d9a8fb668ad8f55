//! Child processes for the cluster harness: random loopback addresses, free ports,
//! a [`Proc`] that logs to a file and is killed by pid when dropped, and polling
//! helpers ([`wait_until`], [`wait_for`]) so tests never synchronise with bare sleeps.
//! Starting, signalling and log files are the launcher's (`refvote_launcher::process`),
//! as for `votingctl cluster`; what is the harness's own is that every process is a
//! child of the test and dies with it.
//!
//! Every test process picks its own address in 127.0.0.0/8 ([`loopback_ip`]), so test
//! binaries running in parallel do not race each other for the same ports.

use std::fmt;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use refvote_launcher::process::{self, Signal};

pub use refvote_launcher::free_ports;
pub use refvote_launcher::process::log_tail;

/// How often [`wait_until`], [`wait_for`] and [`Proc::terminate`] poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A random address 127.a.b.c with a in 1..=254 and c in 1..=254, never 127.0.0.1.
pub fn loopback_ip() -> Ipv4Addr {
    let r = uuid::Uuid::new_v4();
    let b = r.as_bytes();
    // Map the random bytes onto the allowed ranges; a in 1..=254 already excludes 127.0.0.1.
    let a = 1 + b[0] % 254;
    let c = 1 + b[2] % 254;
    Ipv4Addr::new(127, a, b[1], c)
}

/// A port on `ip` that was free a moment ago: binds `ip:0`, reads the port, drops the socket.
pub fn free_port(ip: Ipv4Addr) -> anyhow::Result<u16> {
    Ok(free_ports(ip, 1)?[0])
}

/// Whether `/proc/<pid>` exists (a live or zombie process; Linux only).
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A child process whose stdout and stderr go to `<log_dir>/<name>.log`.
///
/// Dropping it sends SIGKILL and reaps the child, so a failing test never leaves
/// processes behind (unless the test process itself is killed).
pub struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .field("log_path", &self.log_path)
            .finish()
    }
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout+stderr appended to
    /// `<log_dir>/<name>.log` (appending, so a restarted process keeps the earlier log).
    pub fn spawn(name: &str, cmd: Command, log_dir: &Path) -> anyhow::Result<Proc> {
        let log_path = log_dir.join(format!("{name}.log"));
        let child = process::spawn_logged(name, cmd, &log_path, "harness", false)?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log_path,
        })
    }

    /// The name given to [`Proc::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's pid (it may have exited; see [`Proc::is_running`]).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file holding the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit status if the child has exited (reaping it), `None` while it runs.
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for {} (pid {})", self.name, self.pid()))
    }

    /// Whether the child has not exited yet (a stopped child counts as running).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `sig` unless the child was already reaped (then its pid may belong to
    /// someone else). Returns whether the signal was sent.
    fn signal(&mut self, sig: Signal) -> anyhow::Result<bool> {
        if self.try_status()?.is_some() {
            return Ok(false);
        }
        // Not reaped yet, so the pid is still ours (at worst a zombie).
        process::signal(self.pid(), sig)
            .with_context(|| format!("kill({}, {sig:?}) for {}", self.pid(), self.name))?;
        Ok(true)
    }

    /// Polls until the child exits or `timeout` passes; `None` on timeout.
    fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL_INTERVAL.min(deadline - now));
        }
    }

    /// SIGTERM (plus SIGCONT, in case it is paused), wait up to `timeout`, then SIGKILL
    /// and wait. Blocks the calling thread. Returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if self.signal(Signal::TERM)? {
            // A stopped process keeps SIGTERM pending until it is continued.
            self.signal(Signal::CONT)?;
        }
        if let Some(status) = self.wait_timeout(timeout)? {
            return Ok(status);
        }
        self.kill()
    }

    /// SIGKILL and wait. Returns the exit status.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::KILL)?;
        self.child
            .wait()
            .with_context(|| format!("waiting for {} (pid {})", self.name, self.pid()))
    }

    /// SIGSTOP: the process freezes (its sockets stay open but nothing answers).
    pub fn pause(&mut self) -> anyhow::Result<()> {
        if !self.signal(Signal::STOP)? {
            bail!("cannot pause {}: it has exited", self.name);
        }
        Ok(())
    }

    /// SIGCONT: undo [`Proc::pause`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if !self.signal(Signal::CONT)? {
            bail!("cannot resume {}: it has exited", self.name);
        }
        Ok(())
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path, n)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Best effort: nothing useful to do with an error while dropping.
        let _ = self.kill();
    }
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `true`; fails after `timeout`
/// with an error naming `what`. Each call of `f` is cut off at the deadline.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, timeout, || {
        let fut = f();
        async move {
            if fut.await {
                Ok(())
            } else {
                bail!("condition is false")
            }
        }
    })
    .await
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Ok`, and returns that value;
/// fails after `timeout` with an error naming `what` and the last error `f` returned.
/// Each call of `f` is cut off at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last_err = match tokio::time::timeout_at(deadline, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("attempt still running at the deadline"),
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(last_err.context(format!(
                "timed out after {:?} ({attempts} attempts) waiting for {what}",
                now - start
            )));
        }
        tokio::time::sleep_until((now + POLL_INTERVAL).min(deadline)).await;
    }
}
