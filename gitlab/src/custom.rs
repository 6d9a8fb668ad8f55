//! Custom server hooks, laid out, found, fed and judged as Gitaly does it.
//!
//! For hook `<name>` (`pre-receive`, `update`, `post-receive`) these run, in order:
//! 1. `<repository>/custom_hooks/<name>`
//! 2. `<repository>/custom_hooks/<name>.d/*`, sorted by file name
//! 3. `<custom_hooks_dir>/<name>.d/*`, sorted by file name
//!
//! A file counts only if it is executable by us, is not a directory and does not end
//! in `~`. Each runs in the repository's directory with the push's changes on stdin
//! (`update`: none, the ref and its old and new value as arguments) and an environment
//! made from scratch ([`hook_env`]); its stdout and stderr go to the pusher as they
//! come. The first hook that fails stops the rest: its output and exit status are the
//! refusal. All hooks of one run share one deadline; at the deadline the running hook's
//! whole process group is killed, and dropping the run kills it too.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::context::HookContext;
use crate::settings::HooksSettings;

/// Output kept per stream for the refusal (the pusher got all of it live).
pub const CAPTURE_LIMIT: usize = 64 * 1024;
/// How long a hook that exited may keep its pipes open (a daemonised grandchild)
/// before we stop reading them.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookKind {
    PreReceive,
    Update,
    PostReceive,
}

impl HookKind {
    /// git's name for it.
    pub fn name(self) -> &'static str {
        match self {
            HookKind::PreReceive => "pre-receive",
            HookKind::Update => "update",
            HookKind::PostReceive => "post-receive",
        }
    }
}

/// Where hook output goes while it runs: to the pusher. Called from the runner's task;
/// it must not block.
pub trait OutputSink: Send {
    fn stdout(&mut self, bytes: &[u8]);
    fn stderr(&mut self, bytes: &[u8]);
}

/// A sink that keeps everything (tests, or a caller that relays afterwards).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collect {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl OutputSink for Collect {
    fn stdout(&mut self, bytes: &[u8]) {
        self.stdout.extend_from_slice(bytes);
    }
    fn stderr(&mut self, bytes: &[u8]) {
        self.stderr.extend_from_slice(bytes);
    }
}

/// How a hook ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HookExit {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for HookExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HookExit::Code(c) => write!(f, "exit status {c}"),
            HookExit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// A run of custom hooks that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CustomHookError {
    /// Listing the hook directories failed (other than their absence).
    #[error("creating custom hooks executor: {dir}: {source}")]
    Find {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("error executing {hook:?}: {source}")]
    Spawn {
        hook: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The hook ran and said no.
    #[error("error executing {hook:?}: {exit}")]
    Failed {
        kind: HookKind,
        hook: PathBuf,
        exit: HookExit,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
    #[error("error executing {hook:?}: still running after {after:?}, killed (hooks.timeout_secs)")]
    TimedOut {
        kind: HookKind,
        hook: PathBuf,
        after: Duration,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
}

impl CustomHookError {
    /// The exit status git should see from the hook that wraps these custom hooks:
    /// the failing hook's own code, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            CustomHookError::Failed {
                exit: HookExit::Code(c),
                ..
            } if *c != 0 => *c,
            _ => 1,
        }
    }

    /// The failing hook's captured output (at most [`CAPTURE_LIMIT`] each).
    pub fn output(&self) -> (&[u8], &[u8]) {
        match self {
            CustomHookError::Failed { stdout, stderr, .. }
            | CustomHookError::TimedOut { stdout, stderr, .. } => (stdout, stderr),
            _ => (&[], &[]),
        }
    }

    /// The message an operation (`User*` RPC) reports, as Gitaly builds it: the
    /// hook's stderr if it wrote any, else its stdout, else this error's text. The
    /// hook's words are kept as they are (Rails shows text starting `GitLab:` or
    /// `GL-HOOK-ERR:` verbatim).
    pub fn message(&self) -> String {
        let (stdout, stderr) = self.output();
        for stream in [stderr, stdout] {
            if !stream.trim_ascii().is_empty() {
                return String::from_utf8_lossy(stream).into_owned();
            }
        }
        self.to_string()
    }
}

/// The custom hooks of this node.
#[derive(Debug, Clone)]
pub struct CustomHooks {
    global_dir: Option<PathBuf>,
    timeout: Duration,
}

/// One run: which hooks, for which repository, with what input.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    pub kind: HookKind,
    pub repo_path: &'a Path,
    /// `update`: ref, old, new. Empty otherwise.
    pub args: Vec<String>,
    /// The changes text (`pre-receive`, `post-receive`); empty for `update`.
    pub stdin: &'a [u8],
    /// From [`hook_env`].
    pub env: Vec<(OsString, OsString)>,
}

/// `path` is a hook Gitaly would run.
fn is_valid_hook(path: &Path) -> bool {
    if path.as_os_str().as_bytes().ends_with(b"~") {
        return false;
    }
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok(),
        _ => false,
    }
}

fn hooks_in(dir: &Path) -> Result<Vec<PathBuf>, CustomHookError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CustomHookError::Find {
                dir: dir.to_owned(),
                source,
            });
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CustomHookError::Find {
            dir: dir.to_owned(),
            source,
        })?;
        names.push(entry.file_name());
    }
    names.sort();
    Ok(names
        .into_iter()
        .map(|n| dir.join(n))
        .filter(|p| is_valid_hook(p))
        .collect())
}

impl CustomHooks {
    pub fn new(settings: &HooksSettings) -> CustomHooks {
        CustomHooks {
            global_dir: settings.custom_hooks_dir.clone(),
            timeout: settings.timeout(),
        }
    }

    /// The hooks that would run for `kind` in the repository at `repo_path`, in order.
    pub fn find(&self, repo_path: &Path, kind: HookKind) -> Result<Vec<PathBuf>, CustomHookError> {
        let name = kind.name();
        let own = repo_path.join("custom_hooks");
        let mut hooks = Vec::new();
        let single = own.join(name);
        if is_valid_hook(&single) {
            hooks.push(single);
        }
        hooks.extend(hooks_in(&own.join(format!("{name}.d")))?);
        if let Some(global) = &self.global_dir {
            hooks.extend(hooks_in(&global.join(format!("{name}.d")))?);
        }
        Ok(hooks)
    }

    /// Runs every hook of `run.kind` in order, streaming output into `sink`; the first
    /// failure ends the run. No hooks: `Ok`.
    pub async fn run(
        &self,
        run: &Invocation<'_>,
        sink: &mut dyn OutputSink,
    ) -> Result<(), CustomHookError> {
        let hooks = self.find(run.repo_path, run.kind)?;
        let deadline = Instant::now() + self.timeout;
        for hook in hooks {
            run_one(&hook, run, deadline, self.timeout, sink).await?;
        }
        Ok(())
    }
}

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

async fn run_one(
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

/// Variables a custom hook inherits from the node's environment (Gitaly's list).
const INHERITED: &[&str] = &[
    "HOME",
    "PATH",
    "LD_LIBRARY_PATH",
    "TZ",
    "GIT_TRACE",
    "GIT_TRACE_PACK_ACCESS",
    "GIT_TRACE_PACKET",
    "GIT_TRACE_PERFORMANCE",
    "GIT_TRACE_SETUP",
    "GIT_EXEC_PATH",
    "all_proxy",
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "no_proxy",
    "NO_PROXY",
];

/// The environment of a custom hook, as Gitaly builds it (later entries win):
/// the inherited variables above, the push options (`GIT_PUSH_OPTION_COUNT`,
/// `GIT_PUSH_OPTION_<n>`), the quarantine (`GIT_OBJECT_DIRECTORY`,
/// `GIT_ALTERNATE_OBJECT_DIRECTORIES`, absolute), `PATH` with the directory of the git
/// the node runs in front, then `GIT_DIR`, `GL_REPOSITORY`, `GL_PROJECT_PATH`, `GL_ID`,
/// `GL_USERNAME`, `GL_PROTOCOL`.
///
/// One addition of ours: with a quarantine, `GIT_QUARANTINE_PATH` too, as git itself
/// sets it for hooks, so git refuses ref updates a hook would make while the vote on
/// this one is open (they would land on one replica only).
pub fn hook_env(
    context: &HookContext,
    repo_path: &Path,
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    git_binary: &Path,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = inherited
        .into_iter()
        .filter(|(k, _)| INHERITED.iter().any(|name| OsStr::new(name) == k))
        .collect();
    let mut set = |k: &str, v: OsString| env.push((k.into(), v));
    if !context.push_options.is_empty() {
        set(
            "GIT_PUSH_OPTION_COUNT",
            context.push_options.len().to_string().into(),
        );
        for (i, option) in context.push_options.iter().enumerate() {
            set(&format!("GIT_PUSH_OPTION_{i}"), option.into());
        }
    }
    if let Some(dirs) = &context.object_directories {
        let (objects, alternates) = dirs.absolute(repo_path);
        set("GIT_OBJECT_DIRECTORY", objects.clone().into());
        set("GIT_ALTERNATE_OBJECT_DIRECTORIES", alternates.into());
        set("GIT_QUARANTINE_PATH", objects.into());
    }
    let git_dir = git_binary.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = git_dir {
        let current = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let mut path = dir.as_os_str().to_owned();
        path.push(":");
        path.push(current);
        env.push(("PATH".into(), path));
    }
    let mut set = |k: &str, v: &str| env.push((k.into(), v.into()));
    set("GIT_DIR", &repo_path.to_string_lossy());
    set("GL_REPOSITORY", &context.gl_repository);
    set("GL_PROJECT_PATH", &context.gl_project_path);
    set("GL_ID", &context.gl_id);
    set("GL_USERNAME", &context.gl_username);
    set("GL_PROTOCOL", context.protocol.as_str());
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{GlId, ObjectDirectories, Protocol};
    use std::os::unix::fs::PermissionsExt;

    fn executable(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub(crate) fn context() -> HookContext {
        HookContext {
            gl_id: "user-3".into(),
            identity: GlId::User("3".into()),
            gl_username: "jane".into(),
            gl_repository: "project-3".into(),
            gl_project_path: "g/p".into(),
            relative_path: "g/p.git".into(),
            protocol: Protocol::Ssh,
            git_protocol: String::new(),
            git_config_options: Vec::new(),
            push_options: Vec::new(),
            request_id: "r".into(),
            object_directories: None,
            user: None,
        }
    }

    #[test]
    fn finds_hooks_in_gitalys_order() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo.git");
        let global = dir.path().join("global");
        let own = repo.join("custom_hooks");
        executable(&own.join("pre-receive"), "#!/bin/sh\n");
        executable(&own.join("pre-receive.d/20-b"), "#!/bin/sh\n");
        executable(&own.join("pre-receive.d/10-a"), "#!/bin/sh\n");
        executable(&own.join("pre-receive.d/30-backup~"), "#!/bin/sh\n");
        std::fs::write(own.join("pre-receive.d/15-not-executable"), "").unwrap();
        std::fs::create_dir_all(own.join("pre-receive.d/12-dir")).unwrap();
        executable(&global.join("pre-receive.d/00-global"), "#!/bin/sh\n");
        executable(&global.join("update.d/x"), "#!/bin/sh\n");
        let hooks = CustomHooks::new(&HooksSettings {
            custom_hooks_dir: Some(global.clone()),
            ..Default::default()
        });
        assert_eq!(
            hooks.find(&repo, HookKind::PreReceive).unwrap(),
            vec![
                own.join("pre-receive"),
                own.join("pre-receive.d/10-a"),
                own.join("pre-receive.d/20-b"),
                global.join("pre-receive.d/00-global"),
            ]
        );
        assert_eq!(
            hooks.find(&repo, HookKind::Update).unwrap(),
            vec![global.join("update.d/x")]
        );
        assert!(hooks.find(&repo, HookKind::PostReceive).unwrap().is_empty());
        // Without a global directory, only the repository's own.
        let own_only = CustomHooks::new(&HooksSettings::default());
        assert_eq!(own_only.find(&repo, HookKind::PreReceive).unwrap().len(), 3);
        // A hooks "directory" that is a file is an error, as in Gitaly.
        std::fs::write(own.join("post-receive.d"), "").unwrap();
        assert!(matches!(
            hooks.find(&repo, HookKind::PostReceive),
            Err(CustomHookError::Find { .. })
        ));
    }

    #[test]
    fn environment_as_gitaly_builds_it() {
        let mut c = context();
        c.push_options = vec!["ci.skip".into(), "mr.create".into()];
        c.object_directories = Some(ObjectDirectories {
            object_directory: "objects/incoming-x".into(),
            alternate_object_directories: vec!["objects".into()],
        });
        let inherited = [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/git"),
            ("SECRET_TOKEN", "leak"),
            ("GIT_TRACE", "1"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = hook_env(
            &c,
            Path::new("/srv/g/p.git"),
            inherited,
            Path::new("/opt/git/bin/git"),
        );
        let pairs: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string_lossy().into(), v.to_string_lossy().into()))
            .collect();
        let get = |k: &str| {
            pairs
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("SECRET_TOKEN"), None);
        assert_eq!(get("HOME"), Some("/home/git"));
        assert_eq!(get("GIT_TRACE"), Some("1"));
        assert_eq!(get("PATH"), Some("/opt/git/bin:/usr/bin"));
        assert_eq!(get("GIT_PUSH_OPTION_COUNT"), Some("2"));
        assert_eq!(get("GIT_PUSH_OPTION_0"), Some("ci.skip"));
        assert_eq!(get("GIT_PUSH_OPTION_1"), Some("mr.create"));
        assert_eq!(
            get("GIT_OBJECT_DIRECTORY"),
            Some("/srv/g/p.git/objects/incoming-x")
        );
        assert_eq!(
            get("GIT_ALTERNATE_OBJECT_DIRECTORIES"),
            Some("/srv/g/p.git/objects")
        );
        assert_eq!(
            get("GIT_QUARANTINE_PATH"),
            Some("/srv/g/p.git/objects/incoming-x")
        );
        assert_eq!(get("GIT_DIR"), Some("/srv/g/p.git"));
        assert_eq!(get("GL_REPOSITORY"), Some("project-3"));
        assert_eq!(get("GL_PROJECT_PATH"), Some("g/p"));
        assert_eq!(get("GL_ID"), Some("user-3"));
        assert_eq!(get("GL_USERNAME"), Some("jane"));
        assert_eq!(get("GL_PROTOCOL"), Some("ssh"));
        // A bare `git` adds nothing to PATH; no push options, no quarantine: none set.
        let env = hook_env(&context(), Path::new("/r"), [], Path::new("git"));
        assert!(env.iter().all(|(k, _)| k != "PATH"
            && k != "GIT_PUSH_OPTION_COUNT"
            && k != "GIT_OBJECT_DIRECTORY"));
    }

    #[test]
    fn refusal_messages_prefer_stderr() {
        let failed = |stdout: &[u8], stderr: &[u8]| CustomHookError::Failed {
            kind: HookKind::PreReceive,
            hook: "/h".into(),
            exit: HookExit::Code(3),
            stdout: stdout.to_vec(),
            stderr: stderr.to_vec(),
        };
        assert_eq!(
            failed(b"out", b"GL-HOOK-ERR: no\n").message(),
            "GL-HOOK-ERR: no\n"
        );
        assert_eq!(failed(b"out\n", b" \n").message(), "out\n");
        assert_eq!(
            failed(b"", b"").message(),
            "error executing \"/h\": exit status 3"
        );
        assert_eq!(failed(b"", b"").exit_code(), 3);
    }
}
