//! The one way the node service runs git. The bottom layer of the node: it imports
//! nothing else of this crate and knows nothing of transactions or of the node's error
//! type ([`GitError`] is its own). A caller says what a write needs as plain
//! values (the hook's environment, a [`KillPolicy`], an exit callback); `tx` turns a
//! transaction into them.
//!
//! Every run gets a clean environment (no system or global config, C locale, no
//! terminal prompts), its own process group, a timeout, stderr read concurrently into a
//! bounded buffer, and stdin/stdout streamed through bounded channels, so a 1 GiB pack
//! is never held in memory: when the client reads slowly, git blocks on its pipe.
//!
//! A supervisor task owns each child, so what happens on cancellation does not depend
//! on who drops what. When the caller goes away (the RPC is cancelled, its future or
//! response stream dropped, or the client's request stream breaks):
//! - by default ([`KillPolicy::Kill`]) it is stopped at once: SIGKILL to git's whole
//!   process group;
//! - a write inside a refvote transaction ([`KillPolicy::LetFinish`]) is never killed,
//!   because its hook may already have voted (DESIGN.md §2.6): stdin is closed, so git
//!   either fails on the truncated input or finishes what the other replicas also
//!   finish. On timeout it gets SIGTERM, which git turns into removing its lock files.
//!
//! Writes run with the durability and no-maintenance settings DESIGN.md §2 asks for and
//! with `core.hooksPath` forced to the node's hooks, so no repository config can skip
//! the vote.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

/// Bytes a client streams into git's stdin.
pub type Input = Pin<Box<dyn Stream<Item = Result<Vec<u8>, Status>> + Send>>;

/// What stopping a run (its caller went away, or its time is up) does to git.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KillPolicy {
    /// SIGKILL to git's process group at once.
    #[default]
    Kill,
    /// Never killed: its stdin is closed, and on timeout it gets SIGTERM. For a write
    /// whose hook may have voted.
    LetFinish,
}

/// Called once git has exited, with whether it succeeded and, if not, why: also when
/// the caller went away (a write left to finish may have committed).
pub type OnExit = Box<dyn FnOnce(bool, String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Size of one stdout read, and so of one response message (Gitaly also uses 32 KiB).
const CHUNK: usize = 32 * 1024;
/// stdout chunks buffered between git and the RPC: the backpressure window.
const CHUNKS_IN_FLIGHT: usize = 4;
/// stderr kept for error messages (the end of it, where git says what failed).
const STDERR_KEEP: usize = 8 * 1024;

/// Config every write runs with. The hooks path is added from the node's config.
const WRITE_CONFIG: &[&str] = &[
    "core.fsync=objects,reference,derived-metadata",
    "core.fsyncMethod=fsync",
    "receive.autogc=false",
    "gc.auto=0",
    "maintenance.auto=false",
    // Racing writes to one ref (DESIGN.md §9): the older transaction's git waits here
    // for the lock a younger one holds on this replica until that one is aborted,
    // instead of failing after git's default 100 ms.
    "core.filesRefLockTimeout=3000",
];

/// `-c` options a request may pass (`git_config_options`), by key prefix, lowercase.
/// Anything else could run commands or skip the vote (e.g. `core.hooksPath`).
const ALLOWED_REQUEST_CONFIG: &[&str] = &[
    "uploadpack.allowfilter",
    "uploadpack.allowanysha1inwant",
    "uploadpack.allowtipsha1inwant",
    "uploadpack.allowreachablesha1inwant",
    "uploadpack.hiderefs",
    "receive.hiderefs",
    "transfer.hiderefs",
    "receive.maxinputsize",
];

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot start {bin} (set git.bin_path)")]
    Spawn {
        bin: String,
        #[source]
        source: io::Error,
    },
    #[error("git {command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("git {command} did not finish within {after:?} (git.timeout_secs)")]
    Timeout { command: String, after: Duration },
    #[error("git {command} was stopped: the call was cancelled")]
    Cancelled { command: String },
    #[error("git {command}: the request stream failed")]
    Input {
        command: String,
        #[source]
        source: Status,
    },
    #[error("git {command} wrote more than {limit} bytes")]
    TooLarge { command: String, limit: usize },
    #[error("git {command}: reading its output")]
    Io {
        command: String,
        #[source]
        source: io::Error,
    },
    /// The request asked for a git option this node does not allow.
    #[error("{0}")]
    Refused(String),
}

impl GitError {
    pub(super) fn code(&self) -> Code {
        match self {
            GitError::Spawn { .. } | GitError::Failed { .. } | GitError::Io { .. } => {
                Code::Internal
            }
            GitError::Timeout { .. } => Code::DeadlineExceeded,
            GitError::Cancelled { .. } => Code::Cancelled,
            GitError::Input { source, .. } => source.code(),
            GitError::TooLarge { .. } => Code::ResourceExhausted,
            GitError::Refused(_) => Code::InvalidArgument,
        }
    }
}

/// How the node runs git; cheap to clone.
#[derive(Debug, Clone)]
pub struct Git {
    bin: PathBuf,
    timeout: Duration,
    hooks_dir: PathBuf,
    path_env: OsString,
}

impl Git {
    pub fn new(bin: PathBuf, timeout: Duration, hooks_dir: PathBuf) -> Git {
        Git {
            bin,
            timeout,
            hooks_dir,
            path_env: std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        }
    }

    pub fn hooks_dir(&self) -> &Path {
        &self.hooks_dir
    }

    /// A git command: `git [-c ...] [--git-dir=...] <args>`.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Command {
            git: self.clone(),
            git_dir: None,
            config: Vec::new(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            write: None,
            hooks: None,
            internal_config: Vec::new(),
            kill: KillPolicy::Kill,
            on_exit: None,
            input: None,
            stream_stderr: false,
            hold: None,
        }
    }

    /// How long one run may take (`git.timeout_secs`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `git [-c <config>...] --git-dir=<git_dir> <args>` as a bare child process with
    /// the clean environment every run gets (plus `env`), its own process group, piped
    /// stdin and stdout, stderr discarded, killed when dropped. For a caller that keeps
    /// the process and speaks to it itself (the read engine's long-lived
    /// `cat-file --batch-command`): no supervisor, no timeout, no streaming here.
    pub fn long_lived(
        &self,
        git_dir: &Path,
        config: &[String],
        env: &[(String, String)],
        args: &[&str],
    ) -> tokio::process::Command {
        let mut cmd = self.clean();
        for c in config {
            cmd.arg("-c").arg(c);
        }
        let mut flag = OsString::from("--git-dir=");
        flag.push(git_dir);
        cmd.arg(flag)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }

    /// The git binary with a clean environment: no system or global config, C locale,
    /// no terminal prompts, only PATH kept.
    fn clean(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", &self.path_env)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LANG", "C")
            .env("LC_ALL", "C");
        cmd
    }

    /// `git version`'s version number, e.g. "2.47.3".
    pub async fn version(&self) -> Result<String, GitError> {
        let (out, _) = self.command(["version"]).spawn()?.output(4096).await?;
        let text = String::from_utf8_lossy(&out);
        Ok(text
            .trim()
            .strip_prefix("git version ")
            .unwrap_or(text.trim())
            .to_owned())
    }
}

/// One git invocation being put together; [`Command::spawn`] starts it.
pub struct Command {
    git: Git,
    git_dir: Option<PathBuf>,
    config: Vec<String>,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    /// For a write: the hook's environment.
    write: Option<Vec<(String, String)>>,
    /// For a write: a hooks directory in place of the node's own.
    hooks: Option<PathBuf>,
    /// `-c` options of the node's own, after every other.
    internal_config: Vec<String>,
    kill: KillPolicy,
    on_exit: Option<OnExit>,
    input: Option<Input>,
    stream_stderr: bool,
    hold: Option<Box<dyn Send + Sync>>,
}

/// A repository as a request names it: its directory, and the environment that points
/// git at the object directories the request names (a push's quarantine). Implemented
/// by the storage's resolved path; here so that running git needs nothing of storages.
pub trait ObjectEnv {
    fn git_dir(&self) -> &Path;
    fn object_env(&self) -> Vec<(String, String)>;
}

impl Command {
    pub fn git_dir(mut self, dir: &Path) -> Command {
        self.git_dir = Some(dir.to_owned());
        self
    }

    /// A read of `repo`: its directory, and the object directories the request names
    /// (a push's quarantine, as Rails names it while GitLab checks a push), so git sees
    /// the quarantined objects beside the repository's own.
    pub fn repo(self, repo: &impl ObjectEnv) -> Command {
        self.git_dir(repo.git_dir()).envs(repo.object_env())
    }

    /// The repository given with [`Command::git_dir`], if any.
    pub fn repository(&self) -> Option<&Path> {
        self.git_dir.as_deref()
    }

    /// The git this command runs with.
    pub fn git(&self) -> &Git {
        &self.git
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Command {
        self.args.push(arg.into());
        self
    }

    /// Adds a request's `git_config_options` ("key=value"), refusing keys outside
    /// [`ALLOWED_REQUEST_CONFIG`].
    pub fn request_config(mut self, options: &[String]) -> Result<Command, GitError> {
        for o in options {
            let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k);
            let lower = key.to_ascii_lowercase();
            if !ALLOWED_REQUEST_CONFIG.iter().any(|p| lower.starts_with(p))
                || key.contains(char::is_whitespace)
            {
                return Err(GitError::Refused(format!(
                    "git config option {key:?} is not allowed on this node (allowed: {})",
                    ALLOWED_REQUEST_CONFIG.join(", ")
                )));
            }
            self.config.push(o.clone());
        }
        Ok(self)
    }

    /// Passes the client's Git-Protocol header (e.g. "version=2") to git.
    pub fn protocol(mut self, git_protocol: &str) -> Result<Command, GitError> {
        match git_protocol {
            "" => {}
            "version=0" | "version=1" | "version=2" => {
                self.env.push(("GIT_PROTOCOL".into(), git_protocol.into()));
            }
            other => {
                return Err(GitError::Refused(format!(
                    "git_protocol {other:?} is not supported; use \"version=2\" or leave it empty"
                )));
            }
        }
        Ok(self)
    }

    /// Sets one environment variable for git (e.g. `GIT_INDEX_FILE` for a private index).
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Command {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Sets several environment variables for git.
    pub fn envs(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Command {
        self.env.extend(vars);
        self
    }

    /// Makes this a write: durability and no-maintenance config, the node's hooks, and
    /// `hook_env` for the hook; `kill` says what stopping it does.
    pub fn write(mut self, hook_env: Vec<(String, String)>, kill: KillPolicy) -> Command {
        self.write = Some(hook_env);
        self.kill = kill;
        self
    }

    /// For a write: runs the hooks in `dir` instead of the node's own (a transaction
    /// GitLab's checks gate uses a directory with git's receive hooks too).
    pub fn hooks(mut self, dir: &Path) -> Command {
        self.hooks = Some(dir.to_owned());
        self
    }

    /// A `-c key=value` the node itself sets (never a request's), applied last.
    pub fn internal_config(mut self, option: &str) -> Command {
        self.internal_config.push(option.to_owned());
        self
    }

    /// Calls `f` once git has exited (see [`OnExit`]).
    pub fn on_exit(mut self, f: OnExit) -> Command {
        self.on_exit = Some(f);
        self
    }

    /// Streams `input` into git's stdin (otherwise stdin is /dev/null).
    pub fn stdin(mut self, input: Input) -> Command {
        self.input = Some(input);
        self
    }

    /// Streams stderr to the caller too ([`Run::next_output`]), for protocols that
    /// carry it to the client (SSH). The last [`STDERR_KEEP`] bytes still go into
    /// [`Exit::stderr`].
    pub fn stream_stderr(mut self) -> Command {
        self.stream_stderr = true;
        self
    }

    /// Keeps `guard` (e.g. the repository's lock) alive until git has exited, also when
    /// the caller went away and a write is left to finish.
    pub fn hold(mut self, guard: impl Send + Sync + 'static) -> Command {
        self.hold = Some(Box::new(guard));
        self
    }

    /// Runs git to its end ([`Command::spawn`], then [`Run::wait`]), as
    /// `std::process::Command::status` does: its exit, not judged.
    pub async fn status(self) -> Result<Exit, GitError> {
        self.spawn()?.wait().await
    }

    /// Runs git to its end and returns its stdout, at most `limit` bytes, and its exit
    /// ([`Command::spawn`], then [`Run::output`]).
    pub async fn output(self, limit: usize) -> Result<(Vec<u8>, Exit), GitError> {
        self.spawn()?.output(limit).await
    }

    /// Starts git under a supervisor task.
    pub fn spawn(self) -> Result<Run, GitError> {
        let Command {
            git,
            git_dir,
            config,
            args,
            env,
            write,
            hooks,
            internal_config,
            kill,
            on_exit,
            input,
            stream_stderr,
            hold,
        } = self;
        let name = args
            .first()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cmd = git.clean();
        for c in &config {
            cmd.arg("-c").arg(c);
        }
        if let Some(hook_env) = write {
            // After the request's options: for git, the last -c of a key wins.
            for c in WRITE_CONFIG {
                cmd.arg("-c").arg(c);
            }
            let mut path = OsString::from("core.hooksPath=");
            path.push(hooks.as_deref().unwrap_or(&git.hooks_dir));
            cmd.arg("-c").arg(path);
            cmd.envs(hook_env);
        }
        for c in &internal_config {
            cmd.arg("-c").arg(c);
        }
        if let Some(dir) = &git_dir {
            let mut flag = OsString::from("--git-dir=");
            flag.push(dir);
            cmd.arg(flag);
        }
        cmd.args(&args)
            .envs(env)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a stop reaches the children git starts (pack-objects,
            // index-pack, the hook) too.
            .process_group(0)
            // Backstop only: the supervisor normally reaps the child itself.
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| GitError::Spawn {
            bin: git.bin.display().to_string(),
            source,
        })?;
        let (out_tx, out_rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let (err_tx, err_rx) = if stream_stderr {
            let (t, r) = mpsc::channel(CHUNKS_IN_FLIGHT);
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let (exit_tx, exit_rx) = oneshot::channel();
        let (cancel_tx, cancel_rx) = oneshot::channel();
        tokio::spawn(supervise(
            child,
            Supervision {
                command: name.clone(),
                input,
                out_tx,
                err_tx,
                exit_tx,
                cancel_rx,
                graceful: kill == KillPolicy::LetFinish,
                timeout: git.timeout,
                on_exit,
                hold,
            },
        ));
        Ok(Run {
            command: name,
            stdout: out_rx,
            stdout_done: false,
            stderr: err_rx,
            exit: exit_rx,
            _cancel: cancel_tx,
        })
    }
}

/// How a git process ended.
#[derive(Debug)]
pub struct Exit {
    command: String,
    pub status: ExitStatus,
    /// The last [`STDERR_KEEP`] bytes of stderr.
    pub stderr: String,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Turns a non-zero exit into an error carrying stderr.
    pub fn check(self) -> Result<Exit, GitError> {
        if self.success() {
            Ok(self)
        } else {
            Err(self.into_error())
        }
    }

    /// For commands that answer a question with their exit status (`--verify
    /// --quiet`, `--is-ancestor`, `symbolic-ref --quiet`): 0 is yes, 1 is no, anything
    /// else is git failing.
    pub fn answer(self) -> Result<bool, GitError> {
        match self.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(self.into_error()),
        }
    }

    pub fn into_error(self) -> GitError {
        GitError::Failed {
            command: self.command,
            status: self.status.to_string(),
            stderr: self.stderr.trim().to_owned(),
        }
    }
}

/// A chunk of git's output, by pipe.
#[derive(Debug)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// A running git. Dropping it cancels the run (see the module comment).
pub struct Run {
    command: String,
    stdout: mpsc::Receiver<io::Result<Vec<u8>>>,
    stdout_done: bool,
    /// Only with [`Command::stream_stderr`].
    stderr: Option<mpsc::Receiver<Vec<u8>>>,
    exit: oneshot::Receiver<Result<Exit, GitError>>,
    _cancel: oneshot::Sender<()>,
}

impl Run {
    /// The next chunk of stdout; `None` at its end.
    pub async fn chunk(&mut self) -> Option<Result<Vec<u8>, GitError>> {
        let chunk = self.stdout.recv().await?;
        Some(chunk.map_err(|source| GitError::Io {
            command: self.command.clone(),
            source,
        }))
    }

    /// The next chunk of stdout or (with [`Command::stream_stderr`]) stderr, whichever
    /// git writes first; `None` once both have ended. Both are read concurrently, so git
    /// never blocks on one pipe while the caller waits for the other.
    pub async fn next_output(&mut self) -> Option<Result<Output, GitError>> {
        loop {
            let stderr_open = self.stderr.is_some();
            tokio::select! {
                chunk = self.stdout.recv(), if !self.stdout_done => match chunk {
                    Some(Ok(data)) => return Some(Ok(Output::Stdout(data))),
                    Some(Err(source)) => {
                        return Some(Err(GitError::Io {
                            command: self.command.clone(),
                            source,
                        }));
                    }
                    None => self.stdout_done = true,
                },
                chunk = async { self.stderr.as_mut().expect("guarded").recv().await }, if stderr_open => {
                    match chunk {
                        Some(data) => return Some(Ok(Output::Stderr(data))),
                        None => self.stderr = None,
                    }
                }
                else => return None,
            }
        }
    }

    /// Waits for git to exit, discarding stdout not read yet. The exit status is not
    /// judged here: see [`Exit::check`].
    pub async fn wait(mut self) -> Result<Exit, GitError> {
        // Unread stderr is only kept as the tail from here on.
        self.stderr = None;
        while self.stdout.recv().await.is_some() {}
        match (&mut self.exit).await {
            Ok(result) => result,
            // The supervisor always reports; only a runtime shutdown gets here.
            Err(_) => Err(GitError::Cancelled {
                command: self.command.clone(),
            }),
        }
    }

    /// All of stdout (at most `limit` bytes, else git is stopped) and how git exited.
    /// For small answers only; stream anything that grows with the repository.
    pub async fn output(mut self, limit: usize) -> Result<(Vec<u8>, Exit), GitError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.chunk().await {
            out.extend_from_slice(&chunk?);
            if out.len() > limit {
                return Err(GitError::TooLarge {
                    command: self.command.clone(),
                    limit,
                });
            }
        }
        let exit = self.wait().await?;
        Ok((out, exit))
    }
}

struct Supervision {
    command: String,
    input: Option<Input>,
    out_tx: mpsc::Sender<io::Result<Vec<u8>>>,
    err_tx: Option<mpsc::Sender<Vec<u8>>>,
    exit_tx: oneshot::Sender<Result<Exit, GitError>>,
    cancel_rx: oneshot::Receiver<()>,
    graceful: bool,
    timeout: Duration,
    on_exit: Option<OnExit>,
    hold: Option<Box<dyn Send + Sync>>,
}

/// Why the supervisor stopped git before it exited on its own.
enum Stopped {
    Cancelled,
    Timeout,
    Input(Status),
}

async fn supervise(mut child: Child, s: Supervision) {
    let Supervision {
        command,
        input,
        out_tx,
        err_tx,
        exit_tx,
        mut cancel_rx,
        graceful,
        timeout,
        on_exit,
        hold,
    } = s;
    let pid = child.id();
    let stderr = child
        .stderr
        .take()
        .map(|e| tokio::spawn(keep_tail(e, err_tx)));
    let stdout = child.stdout.take().map(|o| tokio::spawn(pump(o, out_tx)));
    let mut feeding = match (child.stdin.take(), input) {
        (Some(w), Some(i)) => Some(tokio::spawn(feed(w, i))),
        _ => None,
    };
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut stopped: Option<Stopped> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = &mut cancel_rx, if stopped.is_none() => {
                stopped = Some(Stopped::Cancelled);
                stop(pid, &mut feeding, graceful);
            }
            fed = async { feeding.as_mut().expect("guarded").await }, if feeding.is_some() => {
                feeding = None;
                if let Ok(Err(Feed::Client(status))) = fed
                    && stopped.is_none()
                {
                    stopped = Some(Stopped::Input(status));
                    stop(pid, &mut feeding, graceful);
                }
            }
            _ = &mut deadline, if !matches!(stopped, Some(Stopped::Timeout)) => {
                stopped = Some(Stopped::Timeout);
                if let Some(f) = feeding.take() {
                    f.abort();
                }
                signal_group(pid, if graceful { Signal::TERM } else { Signal::KILL });
            }
        }
    };
    if let Some(f) = feeding {
        f.abort();
    }
    if let Some(t) = stdout {
        let _ = t.await;
    }
    let stderr = match stderr {
        Some(t) => t.await.unwrap_or_default(),
        None => String::new(),
    };
    // git is gone: whatever it held may be taken now.
    drop(hold);
    let result = match (status, stopped) {
        (Err(source), _) => Err(GitError::Io {
            command: command.clone(),
            source,
        }),
        (Ok(status), None) => Ok(Exit {
            command: command.clone(),
            status,
            stderr,
        }),
        (Ok(_), Some(Stopped::Cancelled)) => Err(GitError::Cancelled {
            command: command.clone(),
        }),
        (Ok(_), Some(Stopped::Timeout)) => Err(GitError::Timeout {
            command: command.clone(),
            after: timeout,
        }),
        (Ok(_), Some(Stopped::Input(source))) => Err(GitError::Input {
            command: command.clone(),
            source,
        }),
    };
    if let Some(on_exit) = on_exit {
        // What git really did decides, also when the caller is gone: a write that was
        // left to finish may have committed.
        let (ok, detail) = match &result {
            Ok(exit) if exit.success() => (true, String::new()),
            Ok(exit) => (false, format!("git {command}: {}", exit.stderr.trim())),
            Err(e) => (false, e.to_string()),
        };
        on_exit(ok, detail).await;
    }
    let _ = exit_tx.send(result);
}

/// Stops git: SIGKILL to its group, or with [`KillPolicy::LetFinish`] only the end of
/// its input (see the module comment).
fn stop(
    pid: Option<u32>,
    feeding: &mut Option<tokio::task::JoinHandle<Result<(), Feed>>>,
    graceful: bool,
) {
    if let Some(f) = feeding.take() {
        f.abort(); // drops git's stdin: it reads EOF
    }
    if !graceful {
        signal_group(pid, Signal::KILL);
    }
}

use rustix::process::Signal;

/// Signals git's process group. Only called before the leader is reaped, so its pid
/// (the group id) cannot have been reused.
fn signal_group(pid: Option<u32>, sig: Signal) {
    let Some(pid) = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = rustix::process::kill_process_group(pid, sig)
        && e != rustix::io::Errno::SRCH
    {
        tracing::warn!(pid = pid.as_raw_nonzero().get(), error = %e, "cannot signal git's process group");
    }
}

enum Feed {
    /// The client's request stream failed (disconnect, malformed message).
    Client(Status),
    /// git stopped reading (it exited or closed stdin); its exit status tells why.
    Closed,
}

async fn feed(mut stdin: ChildStdin, mut input: Input) -> Result<(), Feed> {
    while let Some(item) = input.next().await {
        let data = item.map_err(Feed::Client)?;
        if stdin.write_all(&data).await.is_err() {
            return Err(Feed::Closed);
        }
    }
    let _ = stdin.shutdown().await;
    Ok(())
}

/// Copies stdout into the channel. If the reader is gone it keeps draining, so a
/// write left to finish never blocks on a full pipe.
async fn pump(mut out: impl AsyncRead + Unpin, tx: mpsc::Sender<io::Result<Vec<u8>>>) {
    let mut reader_gone = false;
    loop {
        let mut buf = vec![0u8; CHUNK];
        match out.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if !reader_gone && tx.send(Ok(buf)).await.is_err() {
                    reader_gone = true;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

/// Reads stderr to its end, keeping the last [`STDERR_KEEP`] bytes, and passing every
/// chunk on to `forward` while its reader is there (then it just keeps draining).
async fn keep_tail(
    mut err: impl AsyncRead + Unpin,
    mut forward: Option<mpsc::Sender<Vec<u8>>>,
) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = err.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if let Some(tx) = &forward
            && tx.send(buf[..n].to_vec()).await.is_err()
        {
            forward = None;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * STDERR_KEEP {
            kept.drain(..kept.len() - STDERR_KEEP);
        }
    }
    if kept.len() > STDERR_KEEP {
        kept.drain(..kept.len() - STDERR_KEEP);
    }
    String::from_utf8_lossy(&kept).into_owned()
}
