//! What one run of custom hooks is made of, shared by the finder ([`super`]) and the
//! process runner (`run`): which hook, its input, where its output goes, how it ended
//! and why a run failed.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Output kept per stream for the refusal (the pusher got all of it live).
pub const CAPTURE_LIMIT: usize = 64 * 1024;

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

/// One run: which hooks, for which repository, with what input.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    pub kind: HookKind,
    pub repo_path: &'a Path,
    /// `update`: ref, old, new. Empty otherwise.
    pub args: Vec<String>,
    /// The changes text (`pre-receive`, `post-receive`); empty for `update`.
    pub stdin: &'a [u8],
    /// From [`hook_env`](crate::custom::hook_env).
    pub env: Vec<(OsString, OsString)>,
}
