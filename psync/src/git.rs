//! The one way partition sync runs git.
//!
//! git runs with the operator's own configuration (credential helpers and CA settings
//! for the source and target remotes live there), but never prompts (timers have no
//! terminal), with a C locale, in its own process group with a deadline: on timeout or
//! when the caller goes away the whole group is killed, so no `git-remote-http` or
//! `index-pack` outlives the run. stderr is read concurrently and its end kept for the
//! error message; stdout is either collected (small outputs: ref lists) or handed out
//! as a stream (packs), never both.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

/// stderr kept for error messages: the end, where git says what failed.
const STDERR_KEEP: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot start {bin} (is git installed?)")]
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
    #[error("git {command} did not finish within {secs} s and was killed")]
    Timeout { command: String, secs: u64 },
    #[error("git {command}: {source}")]
    Io {
        command: String,
        #[source]
        source: io::Error,
    },
}

/// How git is run.
#[derive(Debug, Clone)]
pub struct Git {
    pub bin: PathBuf,
    pub timeout: Duration,
    /// An `Authorization` header for every HTTP request of a run (a refvote router
    /// with `[auth]`), made fresh for each run.
    pub authorization: Option<Authorization>,
}

impl Default for Git {
    fn default() -> Git {
        Git {
            bin: "git".into(),
            timeout: Duration::from_secs(3600),
            authorization: None,
        }
    }
}

/// Makes the value of an `Authorization` header (`Bearer v2.…`); called once per git
/// run, so time-limited tokens stay fresh. Never printed.
#[derive(Clone)]
pub struct Authorization(pub std::sync::Arc<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for Authorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorization(..)")
    }
}

/// A git run whose stdout is read as a stream.
pub struct Running {
    command: String,
    child: Child,
    pub stdout: ChildStdout,
    stderr: JoinHandle<String>,
    stdin: Option<JoinHandle<io::Result<()>>>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Git {
    fn command<I, S>(&self, git_dir: Option<&Path>, args: I) -> (Command, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.bin);
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        // The subcommand, for messages: the first word that is not an option or the
        // value of `-c`.
        let mut name = String::new();
        let mut skip = false;
        for a in &args {
            let a = a.to_string_lossy();
            if skip {
                skip = false;
            } else if a == "-c" {
                skip = true;
            } else if !a.starts_with('-') {
                name = a.into_owned();
                break;
            }
        }
        if let Some(dir) = git_dir {
            cmd.arg("--git-dir").arg(dir);
        }
        // Through the environment, not `-c`: the header is a credential, and a
        // process's arguments are visible to every user of the host.
        if let Some(auth) = &self.authorization {
            cmd.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env(
                    "GIT_CONFIG_VALUE_0",
                    format!("Authorization: {}", (auth.0)()),
                );
        }
        cmd.args(&args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env_remove("GIT_INDEX_FILE")
            .env_remove("GIT_OBJECT_DIRECTORY")
            .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        (cmd, name)
    }

    /// Starts git; its stdout is the caller's to read, `stdin` is written by a task.
    pub fn spawn<I, S>(
        &self,
        git_dir: Option<&Path>,
        args: I,
        stdin: Option<Vec<u8>>,
    ) -> Result<Running, GitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (mut cmd, command) = self.command(git_dir, args);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().map_err(|source| GitError::Spawn {
            bin: self.bin.display().to_string(),
            source,
        })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut err_pipe = child.stderr.take().expect("stderr is piped");
        let stderr = tokio::spawn(async move { keep_tail(&mut err_pipe).await });
        let stdin = match (stdin, child.stdin.take()) {
            (Some(data), Some(mut pipe)) => Some(tokio::spawn(async move {
                pipe.write_all(&data).await?;
                pipe.shutdown().await
            })),
            _ => None,
        };
        Ok(Running {
            command,
            child,
            stdout,
            stderr,
            stdin,
            deadline: tokio::time::Instant::now() + self.timeout,
            timeout: self.timeout,
        })
    }

    /// Runs git to the end and returns its stdout.
    pub async fn output<I, S>(
        &self,
        git_dir: Option<&Path>,
        args: I,
        stdin: Option<Vec<u8>>,
    ) -> Result<String, GitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut run = self.spawn(git_dir, args, stdin)?;
        let mut out = Vec::new();
        let read = tokio::time::timeout_at(run.deadline, run.stdout.read_to_end(&mut out)).await;
        match read {
            Err(_) => {
                run.kill();
                return Err(GitError::Timeout {
                    command: run.command.clone(),
                    secs: run.timeout.as_secs(),
                });
            }
            Ok(Err(source)) => {
                return Err(GitError::Io {
                    command: run.command.clone(),
                    source,
                });
            }
            Ok(Ok(_)) => {}
        }
        run.wait().await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Runs git to the end, ignoring its stdout.
    pub async fn run<I, S>(&self, git_dir: Option<&Path>, args: I) -> Result<(), GitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.output(git_dir, args, None).await.map(|_| ())
    }
}

impl Running {
    /// Waits for git to exit (stdout must have been read to its end, or dropped).
    pub async fn wait(mut self) -> Result<(), GitError> {
        let status = match tokio::time::timeout_at(self.deadline, self.child.wait()).await {
            Err(_) => {
                self.kill();
                return Err(GitError::Timeout {
                    command: self.command.clone(),
                    secs: self.timeout.as_secs(),
                });
            }
            Ok(Err(source)) => {
                return Err(GitError::Io {
                    command: self.command.clone(),
                    source,
                });
            }
            Ok(Ok(status)) => status,
        };
        let stdin_result = match self.stdin.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        };
        let stderr = (&mut self.stderr).await.unwrap_or_default();
        if !status.success() {
            return Err(GitError::Failed {
                command: self.command.clone(),
                status: status.to_string(),
                stderr: stderr.trim().to_owned(),
            });
        }
        // git succeeded but did not take all of its input: a broken pipe means it
        // decided it needed no more, which is fine; anything else is not.
        match stdin_result {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(GitError::Io {
                command: self.command.clone(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Kills git's whole process group.
    pub fn kill(&mut self) {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }

    pub fn command(&self) -> &str {
        &self.command
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

async fn keep_tail(pipe: &mut (impl AsyncRead + Unpin)) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * STDERR_KEEP {
                    kept.drain(..kept.len() - STDERR_KEEP);
                }
            }
        }
    }
    if kept.len() > STDERR_KEEP {
        kept.drain(..kept.len() - STDERR_KEEP);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_say_what_git_said() {
        let git = Git::default();
        let dir = tempfile::tempdir().unwrap();
        let err = git
            .run(Some(&dir.path().join("missing")), ["rev-parse", "HEAD"])
            .await
            .unwrap_err();
        assert!(matches!(err, GitError::Failed { .. }), "{err}");
        assert!(err.to_string().contains("rev-parse"), "{err}");
        let out = git.output(None, ["--version"], None).await.unwrap();
        assert!(out.starts_with("git version"), "{out}");
    }

    #[tokio::test]
    async fn the_authorization_header_reaches_git_through_its_environment() {
        let git = Git {
            authorization: Some(Authorization(std::sync::Arc::new(|| "Bearer t".into()))),
            ..Git::default()
        };
        let out = git
            .output(None, ["config", "--get", "http.extraHeader"], None)
            .await
            .unwrap();
        assert_eq!(out.trim(), "Authorization: Bearer t");
        assert_eq!(
            format!("{:?}", git.authorization),
            "Some(Authorization(..))"
        );
    }

    #[tokio::test]
    async fn a_run_past_its_deadline_is_killed() {
        let git = Git {
            timeout: Duration::from_millis(300),
            ..Git::default()
        };
        let started = std::time::Instant::now();
        let err = git
            .output(None, ["-c", "alias.w=!sleep 5", "w"], None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, GitError::Timeout { ref command, .. } if command == "w"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
