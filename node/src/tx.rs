//! Which refvote transaction, if any, a mutator runs in.
//!
//! The router names the transaction in request metadata: key [`TX_METADATA`]
//! (`refvote-transaction`, defined in `refvote_proto::contract`), value the
//! transaction id. The node votes as itself (its
//! `node_name`); the router has already rewritten the storage name for this node.
//!
//! With the key present the node records itself started ([`Store::start_voter`]) before
//! git runs, gives git's hook the transaction, and records itself done
//! ([`Store::done`]) once the work is over, also when the call was cancelled. Without
//! it the write is untracked, or refused when `vote.require_transaction` is set. Runs
//! votingd starts on its own (repair, maintenance) are [`WriteContext::Maintenance`].
//!
//! The git runner knows nothing of this: [`WriteIn`] hands it a write's context as
//! plain values (the hook's environment, a kill policy, an exit callback).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use refvote_cluster::Store;
use refvote_proto::contract;
use tonic::Status;
use tonic::metadata::MetadataMap;

use super::error::NodeError;
use super::git::{Command, Git, KillPolicy};

pub use refvote_proto::contract::TX_METADATA;

/// Settles this node's part in a transaction's votes before it reports done: votingd's
/// vote service, which writes the confirmations it still owes (and marks the replica
/// outdated where git stopped between committing and confirming). Finalize reads
/// "done without a confirmation" as "did not apply", so this must succeed first.
pub trait SettleVotes: Send + Sync {
    fn settle<'a>(
        &'a self,
        tx: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), refvote_cluster::Error>> + Send + 'a>>;
}

/// What a voter's successful `done` carries for GitLab's post-receive of its
/// transaction ([`refvote_cluster::records::DoneRecord::post_receive`]): the node's
/// GitLab side, which knows what this node's git updated and who pushed.
pub trait CarryPostReceive: Send + Sync {
    /// Null unless `tx` is a gated call of this node that committed something.
    fn carried(&self, tx: &str) -> serde_json::Value;
}

/// What the node needs to join transactions.
#[derive(Clone)]
pub struct TxSettings {
    pub store: Store,
    pub node: String,
    pub vote_socket: PathBuf,
    pub require_transaction: bool,
    /// The vote service, which must settle this node's confirmations before it
    /// reports done.
    pub votes: Arc<dyn SettleVotes>,
    /// What a successful `done` carries for GitLab's post-receive (none: nothing).
    pub post_receive: Option<Arc<dyn CarryPostReceive>>,
}

/// How a write is accounted for.
#[derive(Clone)]
pub enum WriteContext {
    /// Voted on inside a refvote transaction.
    Transaction(Arc<Voter>),
    /// No transaction; allowed because the node does not require one.
    Untracked,
    /// A run votingd started itself; the hook lets it pass.
    Maintenance,
}

/// Makes git commands writes of a [`WriteContext`].
pub trait WriteIn {
    /// Makes this a write in `ctx`: its hook environment, and inside a transaction git
    /// is never killed. A command that names its repository (`git_dir`, set before)
    /// also names it for the checksum recorded with `done` (see
    /// [`WriteContext::checksum_repository`]).
    fn write_in(self, ctx: &WriteContext) -> Command;
    /// Records the transaction's voter done with git's exit status when git exits, even
    /// if the call was cancelled. For RPCs whose work is this one git run.
    fn finish_transaction_on_exit(self, ctx: &WriteContext) -> Command;
}

impl WriteIn for Command {
    fn write_in(self, ctx: &WriteContext) -> Command {
        if let Some(repo) = self.repository() {
            ctx.checksum_repository(self.git(), repo);
        }
        let kill = if ctx.in_transaction() {
            KillPolicy::LetFinish
        } else {
            KillPolicy::Kill
        };
        self.write(ctx.env(), kill)
    }

    fn finish_transaction_on_exit(self, ctx: &WriteContext) -> Command {
        if !ctx.in_transaction() {
            return self;
        }
        let ctx = ctx.clone();
        self.on_exit(Box::new(move |ok, detail| {
            Box::pin(async move { ctx.finish(ok, &detail).await })
        }))
    }
}

/// This node's part in one transaction. Dropping it without [`Voter::finish`] (a
/// cancelled call) still records the voter done, as failed, so nobody waits for it.
pub struct Voter {
    settings: TxSettings,
    tx: String,
    finished: AtomicBool,
    /// The repository whose checksum goes beside a successful `done`.
    checksum_of: OnceLock<(Git, PathBuf)>,
}

impl WriteContext {
    /// Reads the transaction from `metadata` and joins it, or applies the node's policy
    /// for writes without one.
    pub async fn from_metadata(
        settings: &TxSettings,
        metadata: &MetadataMap,
    ) -> Result<WriteContext, NodeError> {
        let Some(value) = metadata.get(TX_METADATA) else {
            if settings.require_transaction {
                return Err(NodeError::TransactionRequired);
            }
            return Ok(WriteContext::Untracked);
        };
        let tx = value
            .to_str()
            .ok()
            .filter(|t| contract::is_transaction_id(t))
            .ok_or_else(|| {
                NodeError::invalid(format!(
                    "metadata {TX_METADATA} must be a transaction id (letters, digits, '-', '_')"
                ))
            })?
            .to_owned();
        // The guard exists before the join: if this call is dropped while the join's
        // etcd request is in flight (the router died and reset the stream), the guard
        // still reports this voter done, as failed. Without it the voter would count as
        // started forever and every finalize of the transaction would wait for it.
        let voter = Arc::new(Voter {
            settings: settings.clone(),
            tx: tx.clone(),
            finished: AtomicBool::new(false),
            checksum_of: OnceLock::new(),
        });
        if let Err(source) = settings.store.start_voter(&tx, &settings.node).await {
            // A refusal means this node never started: nothing to report. An etcd
            // error may hide a join that landed: the guard reports it done.
            if !matches!(
                source,
                refvote_cluster::Error::Etcd(_) | refvote_cluster::Error::Timeout(_)
            ) {
                voter.finished.store(true, Ordering::SeqCst);
            }
            return Err(NodeError::Transaction { tx, source });
        }
        tracing::debug!(%tx, node = %settings.node, "joined transaction");
        Ok(WriteContext::Transaction(voter))
    }

    /// The environment git's hook reads.
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            WriteContext::Transaction(v) => {
                contract::transaction_env(&v.tx, &v.settings.node, &v.settings.vote_socket)
            }
            WriteContext::Untracked => Vec::new(),
            WriteContext::Maintenance => contract::maintenance_env(),
        }
    }

    /// Names the repository this write changes: when the node's work succeeds, the
    /// replica's checksum after it is recorded with `done`, so finalize can keep it
    /// for the new generation (DESIGN.md §4, `votingctl verify`). The first call wins.
    pub fn checksum_repository(&self, git: &Git, repo: &Path) {
        if let WriteContext::Transaction(v) = self {
            let _ = v.checksum_of.set((git.clone(), repo.to_owned()));
        }
    }

    /// The transaction this write votes in, if any.
    pub fn transaction(&self) -> Option<&str> {
        match self {
            WriteContext::Transaction(v) => Some(&v.tx),
            WriteContext::Untracked | WriteContext::Maintenance => None,
        }
    }

    /// Whether git must be left to finish on cancel (its hook may have voted).
    pub fn in_transaction(&self) -> bool {
        matches!(self, WriteContext::Transaction(_))
    }

    /// Records the outcome of this node's work (only inside a transaction; once).
    pub async fn finish(&self, ok: bool, detail: &str) {
        if let WriteContext::Transaction(v) = self {
            v.finish(ok, detail).await;
        }
    }

    /// Records `result` as the outcome of this node's work ([`WriteContext::finish`],
    /// a failure with its [`FailureDetail`]) and hands it back: the last step of every
    /// write handler whose work is more than one git run.
    pub async fn settle<T, E: FailureDetail>(&self, result: Result<T, E>) -> Result<T, E> {
        let detail = match &result {
            Ok(_) => String::new(),
            Err(e) => e.failure_detail(),
        };
        self.finish(result.is_ok(), &detail).await;
        result
    }
}

/// What a failed write records as the detail of its `done`.
pub trait FailureDetail {
    fn failure_detail(&self) -> String;
}

impl FailureDetail for Status {
    fn failure_detail(&self) -> String {
        self.message().to_owned()
    }
}

impl FailureDetail for NodeError {
    fn failure_detail(&self) -> String {
        self.to_string()
    }
}

impl Voter {
    pub fn tx(&self) -> &str {
        &self.tx
    }

    pub async fn finish(&self, ok: bool, detail: &str) {
        if self.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut checksum = String::new();
        if ok && let Some((git, repo)) = self.checksum_of.get() {
            // Best effort: a missing checksum only means finalize records none.
            match super::repository::checksum::calculate(git, repo).await {
                Ok(c) => checksum = c,
                Err(e) => {
                    tracing::warn!(tx = %self.tx, error = %e, "cannot compute the checksum after a write")
                }
            }
        }
        let carried = match (&self.settings.post_receive, ok) {
            (Some(c), true) => c.carried(&self.tx),
            _ => serde_json::Value::Null,
        };
        record_done(&self.settings, &self.tx, ok, detail, &checksum, carried).await;
    }
}

impl Drop for Voter {
    fn drop(&mut self) {
        if self.finished.load(Ordering::SeqCst) {
            return;
        }
        let settings = self.settings.clone();
        let tx = std::mem::take(&mut self.tx);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                record_done(
                    &settings,
                    &tx,
                    false,
                    "the call ended before the node finished",
                    "",
                    serde_json::Value::Null,
                )
                .await;
            });
        }
    }
}

/// How long a node keeps trying to report itself done while etcd cannot take it.
const DONE_RETRY: Duration = Duration::from_secs(15 * 60);

/// Reports this voter done, after settling what it applied (see
/// [`SettleVotes`]). One attempt inline; if etcd cannot take it, retries in the
/// background: a voter that never reports done holds up every later finalize of the
/// repository until its node loses its lease.
async fn record_done(
    settings: &TxSettings,
    tx: &str,
    ok: bool,
    detail: &str,
    checksum: &str,
    carried: serde_json::Value,
) {
    if report(settings, tx, ok, detail, checksum, &carried)
        .await
        .is_ok()
    {
        return;
    }
    let (settings, tx, detail, checksum) = (
        settings.clone(),
        tx.to_owned(),
        detail.to_owned(),
        checksum.to_owned(),
    );
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + DONE_RETRY;
        let mut backoff = Duration::from_millis(100);
        loop {
            // Woken when etcd answers again: finalize waits for this report, so a
            // back-off grown during an etcd outage would hold the push up after it.
            settings.store.pause(backoff).await;
            match report(&settings, &tx, ok, &detail, &checksum, &carried).await {
                Ok(()) => return,
                Err(()) if tokio::time::Instant::now() >= deadline => {
                    tracing::error!(%tx, "gave up reporting this voter done");
                    return;
                }
                Err(_) => backoff = (backoff * 2).min(Duration::from_secs(1)),
            }
        }
    });
}

async fn report(
    settings: &TxSettings,
    tx: &str,
    ok: bool,
    detail: &str,
    checksum: &str,
    carried: &serde_json::Value,
) -> Result<(), ()> {
    let result = match settings.votes.settle(tx).await {
        Ok(()) => {
            settings
                .store
                .done_carrying(tx, &settings.node, ok, detail, checksum, carried.clone())
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            tracing::debug!(%tx, ok, "voter done");
            Ok(())
        }
        // Finalized meanwhile: it already counted this voter as failed.
        Err(refvote_cluster::Error::UnknownTx(_)) => Ok(()),
        Err(e) => {
            tracing::warn!(%tx, error = %e, "cannot record this voter done yet");
            Err(())
        }
    }
}
