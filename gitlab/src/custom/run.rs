//! One custom hook process: spawned in its own process group with the run's
//! environment, stdin fed from a task, stdout and stderr read concurrently into the
//! sink and a bounded capture, bounded by the run's deadline. The group is killed at the
//! deadline, when the run is dropped, or when a hook exits leaving a child that holds
//! its pipes.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::hook::{CAPTURE_LIMIT, CustomHookError, HookExit, Invocation, OutputSink};

/// How long a hook that exited may keep its pipes open (a daemonised grandchild)
/// before we stop reading them.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Kills the hook's process group when the run ends early (timeout or the future
/// dropped). Disarmed once the hook has exited and been reaped.
struct GroupGuard(Option<rustix::process::Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pid) = self.0.take() {
            // The group may be gone already (ESRCH); nothing else can fail here.
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Output of one stream: everything to the sink, the first [`CAPTURE_LIMIT`] bytes
/// kept.
struct Capture {
    kept: Vec<u8>,
    open: bool,
}

impl Capture {
    fn new() -> Capture {
        Capture {
            kept: Vec::new(),
            open: true,
        }
    }
    fn keep(&mut self, bytes: &[u8]) {
        let room = CAPTURE_LIMIT.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

async fn read_some(pipe: &mut Option<impl AsyncRead + Unpin>, buf: &mut [u8]) -> io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn run_one(
    hook: &Path,
    run: &Invocation<'_>,
    deadline: Instant,
    timeout: Duration,
    sink: &mut dyn OutputSink,
) -> Result<(), CustomHookError> {
    let mut child = tokio::process::Command::new(hook)
        .args(&run.args)
        .current_dir(run.repo_path)
        .env_clear()
        .envs(run.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CustomHookError::Spawn {
            hook: hook.to_owned(),
            source,
        })?;
    let mut guard = GroupGuard(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw),
    );
    // stdin in its own task: a hook that does not read it must not block us, and a
    // hook that exits without reading it is fine (EPIPE ignored, as in Go).
    let stdin = child.stdin.take().map(|mut pipe| {
        let bytes = run.stdin.to_vec();
        tokio::spawn(async move {
            let _ = pipe.write_all(&bytes).await;
        })
    });
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (mut out, mut err) = (Capture::new(), Capture::new());
    let (mut out_buf, mut err_buf) = (vec![0u8; 8192], vec![0u8; 8192]);
    let mut exit = None;
    let mut drain_until = deadline;
    let timed_out = loop {
        if exit.is_some() && !out.open && !err.open {
            break false;
        }
        tokio::select! {
            n = read_some(&mut stdout, &mut out_buf), if out.open => match n {
                Ok(n) if n > 0 => {
                    sink.stdout(&out_buf[..n]);
                    out.keep(&out_buf[..n]);
                }
                _ => { out.open = false; stdout = None; }
            },
            n = read_some(&mut stderr, &mut err_buf), if err.open => match n {
                Ok(n) if n > 0 => {
                    sink.stderr(&err_buf[..n]);
                    err.keep(&err_buf[..n]);
                }
                _ => { err.open = false; stderr = None; }
            },
            status = child.wait(), if exit.is_none() => {
                let status = status.map_err(|source| CustomHookError::Spawn {
                    hook: hook.to_owned(),
                    source,
                })?;
                exit = Some(match status.code() {
                    Some(c) => HookExit::Code(c),
                    None => HookExit::Signal(status.signal().unwrap_or(0)),
                });
                drain_until = deadline.min(Instant::now() + DRAIN_GRACE);
            },
            _ = tokio::time::sleep_until(drain_until) => {
                if exit.is_none() {
                    break true;
                }
                tracing::warn!(hook = %hook.display(), "custom hook exited but its output pipes stay open; no longer reading them");
                break false;
            }
        }
    };
    if let Some(task) = stdin {
        task.abort();
    }
    if timed_out {
        guard.kill();
        let _ = child.start_kill();
        // Reap it (SIGKILL cannot be ignored), but never wait unbounded.
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        return Err(CustomHookError::TimedOut {
            kind: run.kind,
            hook: hook.to_owned(),
            after: timeout,
            stdout: out.kept,
            stderr: err.kept,
        });
    }
    // Reaped: the pid may be reused, so the group must no longer be signalled —
    // except that a grandchild still holding our pipes belongs to it; kill it then.
    if out.open || err.open {
        guard.kill();
    } else {
        guard.0 = None;
    }
    match exit.expect("the loop ends with an exit unless it timed out") {
        HookExit::Code(0) => Ok(()),
        exit => Err(CustomHookError::Failed {
            kind: run.kind,
            hook: hook.to_owned(),
            exit,
            stdout: out.kept,
            stderr: err.kept,
        }),
    }
}
