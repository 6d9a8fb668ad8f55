//! GitLab's side of a call on this node (DESIGN.md §8): the checks a push or an
//! operation by a GitLab user must pass, once per transaction, and post-receive once
//! after it was acknowledged.
//!
//! The router gates a call that carries a GitLab user: its transaction designates one
//! voter ([`refvote_proto::contract::DESIGNATED_METADATA`]). On every voter the call
//! is registered here ([`GitlabSide::prepare`], [`GitlabSide::register`]) and git runs
//! with the gated hooks directory, where the hook binary is also git's `pre-receive`,
//! `update` and `post-receive` ([`receive`]):
//!
//! - on the designated voter, `pre-receive` runs GitLab's checks while the push's
//!   objects are in quarantine (`/allowed`, custom pre-receive hooks, `/pre_receive`,
//!   then the custom update hook of every ref) and stores the verdict, create-only;
//! - on the others it waits for that verdict (fencing a designated voter that can give
//!   none any more), and every replica's hooks answer from the one stored verdict
//!   ([`checked`]): same refusal, same output, same refs skipped;
//! - `post-receive` records which refs git updated here; once the router has
//!   acknowledged the write it asks one promoted voter to run GitLab's post-receive
//!   ([`post`]), claimed in etcd so it runs once.
//!
//! Operations (`User*`) do the same from the node's code ([`operation`]), with their
//! one ref update, and answer Gitaly's structured errors.
//!
//! It does not vote (the vote rule that needs the verdict is `refvote_cluster`'s), and
//! it calls GitLab only through `refvote_gitlab`.

pub mod carried;
pub mod checked;
pub mod operation;
pub mod post;
pub mod receive;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refvote_cluster::Store;
use refvote_gitlab::{Change, Changes, Collect, GitlabHooks, HookContext, Refusal, RetryPolicy};
use refvote_proto::contract;
use tonic::Status;
use tonic::metadata::MetadataMap;

use self::checked::Checked;
use crate::error::NodeError;
use crate::git::Command;

/// labkit's correlation id, which GitLab's clients send with every call.
const CORRELATION_METADATA: &str = "x-gitlab-correlation-id";
/// A registered call is forgotten after this long (its post-receive never came: the
/// write was refused, or not acknowledged).
const CALL_TTL: Duration = Duration::from_secs(3600);

/// How this node runs GitLab's side.
pub struct GitlabConfig {
    pub hooks: GitlabHooks,
    /// `[gitlab] url` is set: the internal API is called (else custom hooks only).
    pub api: bool,
    /// Longest the designated voter's checks may take; then it denies. The others
    /// wait a little longer for the verdict.
    pub verdict_timeout: Duration,
    /// Bounded retries of `/post_receive`.
    pub retry: RetryPolicy,
    /// The hooks directory of gated runs: the hook binary under all four names.
    pub hooks_dir: PathBuf,
}

/// GitLab's side of this node: its configuration and the gated calls it runs.
pub struct GitlabSide {
    config: GitlabConfig,
    store: Store,
    node: String,
    calls: Mutex<HashMap<String, Arc<GatedCall>>>,
}

/// A gated call before its transaction is joined: who the pusher is, and whether
/// this node runs the checks.
pub struct Prepared {
    designated: bool,
    context: HookContext,
}

/// One gated call on this node, kept until its post-receive ran (or [`CALL_TTL`]).
pub struct GatedCall {
    pub tx: String,
    /// This node runs GitLab's checks for it.
    pub designated: bool,
    context: HookContext,
    repo_path: PathBuf,
    /// The verdict, once this node has it.
    checked: Mutex<Option<Arc<Checked>>>,
    /// What this node's git updated (post-receive's stdin) and the push options.
    committed: Mutex<Option<(String, Vec<String>)>>,
    registered: Instant,
}

impl GatedCall {
    fn checked(&self) -> Option<Arc<Checked>> {
        self.checked.lock().expect("poisoned").clone()
    }

    fn set_checked(&self, checked: Arc<Checked>) {
        *self.checked.lock().expect("poisoned") = Some(checked);
    }

    /// Records what this node's git updated: the post-receive changes.
    pub fn set_committed(&self, changes: String, push_options: Vec<String>) {
        *self.committed.lock().expect("poisoned") = Some((changes, push_options));
    }
}

impl GitlabSide {
    pub fn new(config: GitlabConfig, store: Store, node: String) -> GitlabSide {
        GitlabSide {
            config,
            store,
            node,
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this node calls GitLab's internal API.
    pub fn api(&self) -> bool {
        self.config.api
    }

    /// The hooks directory of gated runs.
    pub fn hooks_dir(&self) -> &Path {
        &self.config.hooks_dir
    }

    /// Reads whether the call with `metadata` is gated and, if so, builds its context
    /// with `context` (given the correlation id). Before the transaction is joined, so a
    /// malformed call costs the other voters nothing. A node that calls GitLab refuses
    /// a write that is not gated, as Gitaly refuses a push without a GitLab user:
    /// `has_user` says whether the call names one.
    pub fn prepare(
        &self,
        metadata: &MetadataMap,
        has_user: bool,
        context: impl FnOnce(String) -> Result<HookContext, refvote_gitlab::context::ContextError>,
    ) -> Result<Option<Prepared>, Status> {
        let designated = metadata
            .get(contract::DESIGNATED_METADATA)
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let Some(designated) = designated else {
            if self.config.api {
                return Err(NodeError::FailedPrecondition(if has_user {
                    "this node runs GitLab's checks, and the call names a GitLab user but was not gated by them: send it through a refvote router".to_owned()
                } else {
                    "empty GlId: this node runs GitLab's checks, so every push must name its GitLab user (gl_id)".to_owned()
                })
                .into());
            }
            return Ok(None);
        };
        let Some(tx) = metadata
            .get(contract::TX_METADATA)
            .and_then(|v| v.to_str().ok())
        else {
            return Err(NodeError::invalid(format!(
                "metadata {} needs {} beside it",
                contract::DESIGNATED_METADATA,
                contract::TX_METADATA
            ))
            .into());
        };
        let correlation = metadata
            .get(CORRELATION_METADATA)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .unwrap_or(tx)
            .to_owned();
        let context = context(correlation).map_err(|e| NodeError::invalid(e.to_string()))?;
        Ok(Some(Prepared {
            designated: designated == self.node,
            context,
        }))
    }

    /// Registers the prepared call in transaction `tx` on the repository at
    /// `repo_path`.
    pub fn register(&self, prepared: Prepared, tx: &str, repo_path: &Path) -> Arc<GatedCall> {
        let call = Arc::new(GatedCall {
            tx: tx.to_owned(),
            designated: prepared.designated,
            context: prepared.context,
            repo_path: repo_path.to_owned(),
            checked: Mutex::new(None),
            committed: Mutex::new(None),
            registered: Instant::now(),
        });
        let mut calls = self.calls.lock().expect("poisoned");
        calls.retain(|_, c| c.registered.elapsed() < CALL_TTL);
        calls.insert(tx.to_owned(), call.clone());
        call
    }

    fn call(&self, tx: &str) -> Option<Arc<GatedCall>> {
        self.calls.lock().expect("poisoned").get(tx).cloned()
    }

    fn forget(&self, tx: &str) {
        self.calls.lock().expect("poisoned").remove(tx);
    }

    /// Makes `cmd` (a receive-pack) run in the gated hooks directory, with a hook
    /// deadline beyond the verdict's wait.
    pub fn gated_command(&self, cmd: Command) -> Command {
        let deadline = self.wait_for_verdict() + Duration::from_secs(30);
        cmd.hooks(&self.config.hooks_dir).env(
            contract::ENV_HOOK_DEADLINE_MS,
            deadline.as_millis().to_string(),
        )
    }

    /// How long a voter that does not run the checks waits for their verdict.
    fn wait_for_verdict(&self) -> Duration {
        self.config.verdict_timeout + Duration::from_secs(10)
    }

    /// The verdict of `call` on `stdin` (the changes, as git or the operation gives
    /// them): on the designated voter, GitLab's checks run and their verdict is stored
    /// (or the one stored first is taken); on the others, the stored one once there.
    /// `Err`: no verdict could be had; the caller refuses on its own.
    async fn verdict(
        &self,
        call: &GatedCall,
        stdin: &[u8],
        context: HookContext,
    ) -> Result<Arc<Checked>, String> {
        if let Some(checked) = call.checked() {
            return Ok(checked);
        }
        let record = if call.designated {
            let checked = self.check(call, stdin, context).await;
            self.store
                .put_verdict(&call.tx, &self.node, &checked.record(&self.node))
                .await
                .map_err(|e| {
                    format!("refvote: update rejected: cannot record GitLab's verdict in etcd: {e}")
                })?
        } else {
            self.store
                .await_verdict(&call.tx, &self.node, self.wait_for_verdict())
                .await
                .map_err(|e| {
                    format!("refvote: update rejected: no verdict from GitLab's checks: {e}")
                })?
        };
        let checked = Arc::new(Checked::from_record(&record));
        call.set_checked(checked.clone());
        Ok(checked)
    }

    /// GitLab's checks of `stdin` on the designated voter, bounded by the verdict
    /// timeout (then they deny).
    async fn check(&self, call: &GatedCall, stdin: &[u8], context: HookContext) -> Checked {
        let text = String::from_utf8_lossy(stdin).into_owned();
        let refused = |refusal: Refusal, out: Collect| Checked {
            verdict: refvote_gitlab::Verdict::Deny { refusal },
            refused_refs: Default::default(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            changes: text.clone(),
        };
        let changes = match Changes::parse(stdin) {
            Ok(c) => c,
            Err(e) => {
                let message = format!("refvote: update rejected: malformed ref updates: {e}");
                return refused(Refusal::Internal { message }, Collect::default());
            }
        };
        let hooks = &self.config.hooks;
        let repo = &call.repo_path;
        let run = async {
            let mut out = Collect::default();
            let verdict = hooks.pre_receive(&context, repo, &changes, &mut out).await;
            let mut refused_refs = std::collections::BTreeMap::new();
            if verdict.is_ok() {
                for change in changes.list() {
                    if let Err(r) = hooks.update(&context, repo, change, &mut out).await {
                        refused_refs.insert(change.reference.clone(), r);
                    }
                }
            }
            (verdict, refused_refs, out)
        };
        let timeout = self.config.verdict_timeout;
        match tokio::time::timeout(timeout, run).await {
            Ok((Ok(()), refused_refs, out)) => Checked {
                verdict: refvote_gitlab::Verdict::Allow,
                refused_refs,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                changes: text,
            },
            Ok((Err(refusal), _, out)) => {
                tracing::info!(tx = %call.tx, refusal = %refusal.hook_stderr(), "GitLab's checks refused the update");
                refused(refusal, out)
            }
            Err(_) => {
                tracing::warn!(tx = %call.tx, ?timeout, "GitLab's checks did not finish in time; refusing the update");
                let message = format!(
                    "refvote: update rejected: GitLab's checks did not finish within {} s (vote.verdict_timeout_ms)",
                    timeout.as_secs()
                );
                refused(Refusal::Internal { message }, Collect::default())
            }
        }
    }
}

impl crate::tx::CarryPostReceive for GitlabSide {
    fn carried(&self, tx: &str) -> serde_json::Value {
        let Some(call) = self.call(tx) else {
            return serde_json::Value::Null;
        };
        let committed = call.committed.lock().expect("poisoned").clone();
        match committed {
            Some((changes, push_options)) => {
                serde_json::to_value(carried::Carried::of(&call.context, &changes, &push_options))
                    .unwrap_or(serde_json::Value::Null)
            }
            None => serde_json::Value::Null,
        }
    }
}

/// The one change line of an operation's ref update.
pub fn change_line(reference: &str, old: &str, new: &str) -> Change {
    Change {
        old: old.to_owned(),
        new: new.to_owned(),
        reference: reference.to_owned(),
    }
}
