//! GitLab's three hooks, as Gitaly's hook manager runs them on its primary:
//!
//! - **pre-receive**: `/allowed` with the changes; then the custom `pre-receive`
//!   hooks; then `/pre_receive` (GitLab's reference counter). The first refusal ends
//!   it. (That is Gitaly's order: custom hooks run before the counter goes up.)
//! - **update**: the custom `update` hooks, once per ref, ref and values as
//!   arguments.
//! - **post-receive**: `/post_receive`, its messages printed on the pusher's stdout;
//!   then, if GitLab counted the push out, the custom `post-receive` hooks.
//!
//! The outcome of pre-receive and update is a [`Verdict`]: allow, or a [`Refusal`]
//! that says what the pusher sees and what an operation's structured error carries.
//! A verdict is plain data (serde), so it can be recorded and replayed on replicas
//! that did not run the hooks themselves.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Client};
use crate::changes::{Change, Changes};
use crate::context::HookContext;
use crate::custom::{CustomHookError, CustomHooks, HookKind, Invocation, OutputSink, hook_env};
use crate::messages;

/// Why an update may not happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Refusal {
    /// GitLab's access check refused, or could not be asked (Gitaly reports both
    /// alike). Operations answer `AccessCheckError` with these fields.
    AccessCheck {
        /// GitLab's message (or Gitaly's text for the failure), without `GitLab: `.
        message: String,
        /// The `gl_id`.
        user_id: String,
        protocol: String,
        changes: String,
    },
    /// A custom hook failed. Its output reached the pusher while it ran; operations
    /// answer `CustomHookError` with it. Output is kept up to
    /// [`crate::custom::CAPTURE_LIMIT`] per stream, as (lossy) UTF-8.
    CustomHook {
        hook: HookKind,
        exit_code: i32,
        stdout: String,
        stderr: String,
        /// Gitaly's message for an operation: stderr, else stdout, else the error.
        message: String,
        /// Said on stderr after the hook's own output (e.g. that it timed out).
        note: Option<String>,
    },
    /// Something on our side or GitLab's failed before a verdict was reached.
    Internal { message: String },
}

impl Refusal {
    /// What the git hook that ran this writes on stderr (git shows it to the pusher
    /// after `remote: `), beyond custom hook output already streamed.
    pub fn hook_stderr(&self) -> String {
        match self {
            Refusal::AccessCheck { message, .. } => format!("GitLab: {message}"),
            Refusal::CustomHook { note, .. } => note.clone().unwrap_or_default(),
            Refusal::Internal { message } => message.clone(),
        }
    }

    /// What a replica that did not run the hooks shows the pusher for this refusal:
    /// as [`Refusal::hook_stderr`], with a custom hook's captured output in front.
    pub fn replayed_stderr(&self) -> String {
        match self {
            Refusal::CustomHook {
                stdout,
                stderr,
                note,
                ..
            } => {
                let mut text = format!("{stdout}{stderr}");
                if let Some(note) = note {
                    text.push_str(note);
                }
                text
            }
            other => other.hook_stderr(),
        }
    }

    /// The exit status of the git hook: a custom hook's own, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            Refusal::CustomHook { exit_code, .. } => *exit_code,
            _ => 1,
        }
    }

    fn custom(e: CustomHookError) -> Refusal {
        let message = e.message();
        let exit_code = e.exit_code();
        let note = matches!(e, CustomHookError::TimedOut { .. }).then(|| format!("{e}\n"));
        match e {
            CustomHookError::Failed {
                kind,
                stdout,
                stderr,
                ..
            }
            | CustomHookError::TimedOut {
                kind,
                stdout,
                stderr,
                ..
            } => Refusal::CustomHook {
                hook: kind,
                exit_code,
                stdout: String::from_utf8_lossy(&stdout).into_owned(),
                stderr: String::from_utf8_lossy(&stderr).into_owned(),
                message,
                note,
            },
            other => Refusal::Internal {
                message: format!("executing custom hooks: {other}"),
            },
        }
    }
}

/// The outcome of the checks of one update: what gets recorded for the transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny { refusal: Refusal },
}

impl Verdict {
    pub fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow)
    }
}

impl From<Result<(), Refusal>> for Verdict {
    fn from(r: Result<(), Refusal>) -> Verdict {
        match r {
            Ok(()) => Verdict::Allow,
            Err(refusal) => Verdict::Deny { refusal },
        }
    }
}

/// Errors of Gitaly's client that happen while posting (status, transport) read
/// "http post to gitlab api <endpoint> endpoint: …" in Gitaly's messages.
fn posting(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::Status { .. }
            | ApiError::Unreachable { .. }
            | ApiError::Timeout { .. }
            | ApiError::Request { .. }
    )
}

fn post_text(e: &ApiError) -> String {
    if posting(e) {
        format!(
            "http post to gitlab api {} endpoint: {}",
            e.call().path(),
            e.gitaly_text()
        )
    } else {
        e.gitaly_text()
    }
}

/// Why `post-receive` did not complete. The push stands either way.
#[derive(Debug, thiserror::Error)]
pub enum PostReceiveError {
    #[error("GitLab: {}", post_text(.0))]
    Api(#[source] ApiError),
    /// GitLab did not count the push out (`reference_counter_decreased` false);
    /// custom post-receive hooks were not run, as in Gitaly.
    #[error("GitLab did not decrease the reference counter; custom post-receive hooks not run")]
    NotDecreased,
    #[error("error writing messages to stream: {0}")]
    Messages(#[source] messages::InvalidMessageType),
    #[error(transparent)]
    CustomHook(CustomHookError),
}

impl PostReceiveError {
    /// Safe to call again: GitLab cannot have run its post-receive work — no
    /// connection was made, a gateway in front of Rails answered 502, 503 or 504, or
    /// Rails' rate limiter answered 429 (Rack::Attack throttles before the endpoint
    /// runs). A timeout, a broken connection or a 500 may have run it already;
    /// repeating it would start pipelines twice, so those are not retried (Gitaly
    /// never retries at all).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            PostReceiveError::Api(
                ApiError::Unreachable { connect: true, .. }
                    | ApiError::Status {
                        status: 429 | 502..=504,
                        ..
                    }
            )
        )
    }

    /// What Gitaly's post-receive hook writes on stderr for this failure, which git
    /// shows the pusher after `remote: ` (`internal/gitaly/hook/postreceive.go` and
    /// `internal/gitaly/service/hook/post_receive.go`): the error's text for a failed
    /// call or a message of unknown type; nothing when GitLab did not count the push
    /// out (Gitaly's error is empty) or a custom hook failed (only its exit status is
    /// passed on; its own output was streamed).
    pub fn pusher_text(&self) -> Option<String> {
        match self {
            PostReceiveError::Api(_) | PostReceiveError::Messages(_) => Some(self.to_string()),
            PostReceiveError::NotDecreased | PostReceiveError::CustomHook(_) => None,
        }
    }

    /// The wait GitLab asked for before another call (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PostReceiveError::Api(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// What a completed post-receive produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostReceiveOutcome {
    /// GitLab's messages as printed (already given to the sink's stdout).
    pub messages: String,
}

/// Bounded retries of `/post_receive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Calls in all, at least 1.
    pub attempts: u32,
    /// Wait before the second call; doubled before each further one. A longer
    /// `Retry-After` of GitLab's is waited instead.
    pub backoff: Duration,
    /// Longest wait before one call: a `Retry-After` beyond it ends the retries
    /// (waiting less than GitLab asked would only be throttled again).
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    /// Three calls, 1 s then 2 s apart, waiting at most 15 s for a `Retry-After`
    /// (gitlab-shell's go-retryablehttp settings: two retries, 1 s to 15 s).
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            backoff: Duration::from_secs(1),
            max_wait: Duration::from_secs(15),
        }
    }
}

impl RetryPolicy {
    /// The wait before call `attempt + 1` after `error` ended call `attempt` (from 1),
    /// or `None` when no further call is made.
    pub fn next_wait(&self, attempt: u32, error: &PostReceiveError) -> Option<Duration> {
        if !error.is_transient() || attempt >= self.attempts.max(1) {
            return None;
        }
        let backoff = self
            .backoff
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(self.max_wait);
        match error.retry_after() {
            Some(asked) if asked > self.max_wait => None,
            Some(asked) => Some(asked.max(backoff)),
            None => Some(backoff),
        }
    }
}

/// GitLab's hooks for one node: the internal API (if a GitLab is configured) and
/// the custom hooks.
#[derive(Debug, Clone)]
pub struct GitlabHooks {
    api: Option<Client>,
    custom: CustomHooks,
    git_binary: PathBuf,
    inherited_env: Vec<(OsString, OsString)>,
}

impl GitlabHooks {
    /// `api: None` runs the custom hooks only (no GitLab configured). `git_binary` is
    /// the git the node runs; custom hooks find it first in `PATH`. Custom hooks
    /// inherit the allowed variables of this process's environment.
    pub fn new(api: Option<Client>, custom: CustomHooks, git_binary: PathBuf) -> GitlabHooks {
        GitlabHooks {
            api,
            custom,
            git_binary,
            inherited_env: std::env::vars_os().collect(),
        }
    }

    /// Replaces the environment custom hooks inherit from (tests, or a node that
    /// forwards the git hook's own environment).
    pub fn with_inherited_env(mut self, env: Vec<(OsString, OsString)>) -> GitlabHooks {
        self.inherited_env = env;
        self
    }

    pub fn api(&self) -> Option<&Client> {
        self.api.as_ref()
    }

    fn invocation<'a>(
        &self,
        kind: HookKind,
        context: &HookContext,
        repo_path: &'a Path,
        args: Vec<String>,
        stdin: &'a [u8],
    ) -> Invocation<'a> {
        Invocation {
            kind,
            repo_path,
            args,
            stdin,
            env: hook_env(
                context,
                repo_path,
                self.inherited_env.iter().cloned(),
                &self.git_binary,
            ),
        }
    }

    /// The pre-receive checks of `changes` into the repository at `repo_path`
    /// (absolute, as on disk). Custom hook output streams into `sink`.
    pub async fn pre_receive(
        &self,
        context: &HookContext,
        repo_path: &Path,
        changes: &Changes,
        sink: &mut dyn OutputSink,
    ) -> Result<(), Refusal> {
        let access_check = |message: String| Refusal::AccessCheck {
            message,
            user_id: context.gl_id.clone(),
            protocol: context.protocol.as_str().to_owned(),
            changes: changes.as_str().to_owned(),
        };
        if let Some(api) = &self.api {
            match api.allowed(context, repo_path, changes).await {
                Ok(answer) if answer.status => {}
                Ok(answer) => return Err(access_check(answer.message.unwrap_or_default())),
                // Gitaly refuses with the error's text whatever it was — a denial,
                // a 429, a 5xx, an outage — and does not call again (crate::wire).
                Err(e) => {
                    if e.is_throttled() {
                        tracing::warn!(error = %e, retry_after_s = e.retry_after().map(|d| d.as_secs()), correlation_id = %context.request_id, "GitLab throttled the access check; refusing the update");
                    } else if !e.is_refusal() {
                        tracing::warn!(error = %e, correlation_id = %context.request_id, "GitLab's access check failed; refusing the update");
                    }
                    return Err(access_check(e.gitaly_text()));
                }
            }
        }
        let run = self.invocation(
            HookKind::PreReceive,
            context,
            repo_path,
            Vec::new(),
            changes.as_str().as_bytes(),
        );
        self.custom.run(&run, sink).await.map_err(Refusal::custom)?;
        if let Some(api) = &self.api {
            match api
                .pre_receive(&context.request_id, &context.gl_repository)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Refusal::Internal {
                        message: "GitLab did not accept the push: /pre_receive did not increase the reference counter".into(),
                    });
                }
                Err(e) => {
                    return Err(Refusal::Internal {
                        message: format!("calling pre_receive endpoint: {}", post_text(&e)),
                    });
                }
            }
        }
        Ok(())
    }

    /// The custom `update` hooks for one ref.
    pub async fn update(
        &self,
        context: &HookContext,
        repo_path: &Path,
        change: &Change,
        sink: &mut dyn OutputSink,
    ) -> Result<(), Refusal> {
        let args = change.update_hook_args().map(str::to_owned).to_vec();
        // Gitaly gives update hooks no push options.
        let mut context = context.clone();
        context.push_options.clear();
        let run = self.invocation(HookKind::Update, &context, repo_path, args, &[]);
        self.custom.run(&run, sink).await.map_err(Refusal::custom)
    }

    /// Post-receive for committed `changes`, one attempt. GitLab's messages go to the
    /// sink's stdout, then the custom hooks run.
    pub async fn post_receive(
        &self,
        context: &HookContext,
        repo_path: &Path,
        changes: &Changes,
        sink: &mut dyn OutputSink,
    ) -> Result<PostReceiveOutcome, PostReceiveError> {
        let mut printed = String::new();
        if let Some(api) = &self.api {
            let answer = api
                .post_receive(
                    &context.request_id,
                    &context.gl_repository,
                    &context.gl_id,
                    changes,
                    &context.push_options,
                )
                .await
                .map_err(PostReceiveError::Api)?;
            match answer.rendered() {
                Ok(text) => {
                    sink.stdout(text.as_bytes());
                    printed = text;
                }
                Err((text, e)) => {
                    sink.stdout(text.as_bytes());
                    return Err(PostReceiveError::Messages(e));
                }
            }
            if !answer.reference_counter_decreased {
                return Err(PostReceiveError::NotDecreased);
            }
        }
        let run = self.invocation(
            HookKind::PostReceive,
            context,
            repo_path,
            Vec::new(),
            changes.as_str().as_bytes(),
        );
        self.custom
            .run(&run, sink)
            .await
            .map_err(PostReceiveError::CustomHook)?;
        Ok(PostReceiveOutcome { messages: printed })
    }

    /// [`GitlabHooks::post_receive`], repeated on transient failures within `policy`.
    /// Returns the last result and how many calls were made. Each failure is logged;
    /// the last one's [`PostReceiveError::pusher_text`] goes to the sink's stderr.
    pub async fn post_receive_with_retries(
        &self,
        context: &HookContext,
        repo_path: &Path,
        changes: &Changes,
        sink: &mut dyn OutputSink,
        policy: RetryPolicy,
    ) -> (Result<PostReceiveOutcome, PostReceiveError>, u32) {
        let mut attempt = 1;
        loop {
            let result = self.post_receive(context, repo_path, changes, sink).await;
            match &result {
                Err(e) => match policy.next_wait(attempt, e) {
                    Some(wait) => {
                        tracing::warn!(error = %e, attempt, wait_ms = wait.as_millis() as u64, correlation_id = %context.request_id, "post-receive failed; retrying");
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                    }
                    None => {
                        tracing::error!(error = %e, attempt, correlation_id = %context.request_id, "post-receive failed; the push stands");
                        if let Some(text) = e.pusher_text() {
                            sink.stderr(format!("{text}\n").as_bytes());
                        }
                        return (result, attempt);
                    }
                },
                Ok(_) => return (result, attempt),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_texts() {
        let r = Refusal::AccessCheck {
            message: "You are not allowed to push code to this project.".into(),
            user_id: "user-1".into(),
            protocol: "http".into(),
            changes: "c\n".into(),
        };
        assert_eq!(
            r.hook_stderr(),
            "GitLab: You are not allowed to push code to this project."
        );
        assert_eq!(r.replayed_stderr(), r.hook_stderr());
        assert_eq!(r.exit_code(), 1);
        let c = Refusal::custom(CustomHookError::Failed {
            kind: HookKind::PreReceive,
            hook: "/h".into(),
            exit: crate::custom::HookExit::Code(7),
            stdout: b"checking\n".to_vec(),
            stderr: b"GL-HOOK-ERR: nope\n".to_vec(),
        });
        assert_eq!(c.exit_code(), 7);
        assert_eq!(c.hook_stderr(), "");
        assert_eq!(c.replayed_stderr(), "checking\nGL-HOOK-ERR: nope\n");
        let Refusal::CustomHook { message, .. } = &c else {
            panic!("{c:?}")
        };
        assert_eq!(message, "GL-HOOK-ERR: nope\n");
    }

    #[test]
    fn verdicts_serialize_for_the_record() {
        let deny = Verdict::Deny {
            refusal: Refusal::Internal {
                message: "x".into(),
            },
        };
        let json = serde_json::to_string(&deny).unwrap();
        assert_eq!(
            json,
            r#"{"verdict":"deny","refusal":{"kind":"internal","message":"x"}}"#
        );
        assert_eq!(serde_json::from_str::<Verdict>(&json).unwrap(), deny);
        assert_eq!(
            serde_json::to_string(&Verdict::Allow).unwrap(),
            r#"{"verdict":"allow"}"#
        );
    }

    #[test]
    fn retries_wait_for_the_backoff_or_retry_after_within_the_bound() {
        let policy = RetryPolicy {
            attempts: 4,
            backoff: Duration::from_secs(1),
            max_wait: Duration::from_secs(15),
        };
        let status = |status, retry_after: Option<u64>| {
            PostReceiveError::Api(ApiError::Status {
                call: crate::api::Call::PostReceive,
                status,
                message: None,
                retry_after: retry_after.map(Duration::from_secs),
            })
        };
        let secs = |s| Some(Duration::from_secs(s));
        // Doubling backoff, attempts bounded.
        assert_eq!(policy.next_wait(1, &status(503, None)), secs(1));
        assert_eq!(policy.next_wait(2, &status(429, None)), secs(2));
        assert_eq!(policy.next_wait(3, &status(502, None)), secs(4));
        assert_eq!(policy.next_wait(4, &status(502, None)), None);
        // Retry-After when longer than the backoff; beyond the bound, no retry.
        assert_eq!(policy.next_wait(1, &status(429, Some(7))), secs(7));
        assert_eq!(policy.next_wait(3, &status(503, Some(0))), secs(4));
        assert_eq!(policy.next_wait(1, &status(429, Some(16))), None);
        // What GitLab may have acted on is never repeated.
        assert_eq!(policy.next_wait(1, &status(500, None)), None);
        assert_eq!(policy.next_wait(1, &status(501, Some(1))), None);
        assert_eq!(policy.next_wait(1, &status(401, None)), None);
        assert_eq!(policy.next_wait(1, &PostReceiveError::NotDecreased), None);
        let broken = PostReceiveError::Api(ApiError::Unreachable {
            call: crate::api::Call::PostReceive,
            detail: "connection reset".into(),
            connect: false,
        });
        assert_eq!(policy.next_wait(1, &broken), None);
        // The backoff never exceeds the bound either.
        let long = RetryPolicy {
            attempts: 40,
            ..policy
        };
        assert_eq!(long.next_wait(30, &status(503, None)), secs(15));
    }

    #[test]
    fn post_text_as_gitaly_words_it() {
        let e = ApiError::Unreachable {
            call: crate::api::Call::PreReceive,
            detail: "connection refused".into(),
            connect: true,
        };
        assert_eq!(
            post_text(&e),
            "http post to gitlab api /pre_receive endpoint: Internal API unreachable"
        );
        let e = ApiError::UnexpectedStatus {
            call: crate::api::Call::PreReceive,
            status: 201,
        };
        assert_eq!(post_text(&e), "pre-receive call failed with status: 201");
        assert_eq!(
            PostReceiveError::Api(ApiError::Status {
                call: crate::api::Call::PostReceive,
                status: 500,
                message: None,
                retry_after: None,
            })
            .to_string(),
            "GitLab: http post to gitlab api /post_receive endpoint: Internal API error (500)"
        );
        let failed = PostReceiveError::Api(ApiError::Status {
            call: crate::api::Call::PostReceive,
            status: 429,
            message: Some("Retry later".into()),
            retry_after: Some(Duration::from_secs(60)),
        });
        assert_eq!(
            failed.pusher_text().as_deref(),
            Some("GitLab: http post to gitlab api /post_receive endpoint: Retry later")
        );
        assert_eq!(
            PostReceiveError::Messages(crate::messages::InvalidMessageType("shout".into()))
                .pusher_text()
                .as_deref(),
            Some("error writing messages to stream: invalid message type: shout")
        );
        assert_eq!(PostReceiveError::NotDecreased.pusher_text(), None);
    }
}
