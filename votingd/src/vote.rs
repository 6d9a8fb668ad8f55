//! The vote service: answers the hook over votingd's Unix socket. Each connection is
//! one hook call and runs in its own task, so votes of concurrent transactions never
//! wait behind one another; the etcd side is in `refvote_cluster::tx`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refvote_cluster::error::Error as ClusterError;
use refvote_cluster::records::{TxRecord, VoteRecord};
use refvote_cluster::{Store, faults};
use refvote_proto::hook::{
    self, Decision, Phase, Request, Response, Vote, error::Code, request, response,
};
use refvote_telemetry::metrics::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// A hook has this long to send its request once connected.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-transaction local state is dropped after this long without a call.
const IDLE_TX: Duration = Duration::from_secs(3600);

/// Counters since start, shown by `votingctl status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub commits: AtomicU64,
    pub aborts: AtomicU64,
    pub lost: AtomicU64,
    pub timeouts: AtomicU64,
    pub errors: AtomicU64,
    pub confirms: AtomicU64,
    pub rejected_requests: AtomicU64,
    pub votes_waiting: AtomicU64,
    /// From a `prepared` vote's arrival to its decision, whatever the outcome.
    pub vote_seconds: Histogram,
}

/// What this votingd remembers about a transaction between hook calls.
struct TxLocal {
    /// Learnt from the first vote's read.
    record: Option<Arc<TxRecord>>,
    /// key base → votes cast with it so far (the occurrence counter of the vote key).
    occurrences: HashMap<String, u32>,
    /// Keys decided commit with our hash, waiting for `committed` or `aborted`.
    pending: Vec<Pending>,
    /// Votes of this transaction waiting for a decision right now.
    voting: u32,
    /// Keys git applied whose confirmation could not be written yet.
    unconfirmed: Vec<String>,
    touched: Instant,
}

struct Pending {
    key_base: String,
    key: String,
    hash: String,
}

pub struct VoteService {
    node: String,
    store: Store,
    vote_timeout: Duration,
    txs: Mutex<HashMap<String, TxLocal>>,
    pub counters: Counters,
}

/// An error answer: a code and a message for the pusher.
type Refusal = (Code, String);

impl VoteService {
    pub fn new(node: String, store: Store, vote_timeout: Duration) -> VoteService {
        VoteService {
            node,
            store,
            vote_timeout,
            txs: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        }
    }

    /// Transactions this node is voting in or still has to confirm.
    pub fn open_transactions(&self) -> Vec<String> {
        let txs = self.txs.lock().expect("poisoned");
        txs.iter()
            .filter(|(_, t)| !t.pending.is_empty() || !t.unconfirmed.is_empty() || t.voting > 0)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Forgets transactions idle for an hour.
    pub fn sweep(&self) {
        self.txs
            .lock()
            .expect("poisoned")
            .retain(|_, t| t.touched.elapsed() < IDLE_TX);
    }

    pub async fn vote(&self, v: Vote) -> Response {
        let result = match self.validate(&v) {
            Ok(phase) => match phase {
                Phase::Prepared => self.prepared(&v).await,
                Phase::Committed => self.committed(&v).await,
                Phase::Aborted => self.aborted(&v).await,
                Phase::Unspecified => unreachable!("validate refuses it"),
            },
            Err(r) => Err(r),
        };
        match result {
            Ok(decision) => Response {
                kind: Some(response::Kind::Decision(decision)),
            },
            Err((code, message)) => {
                self.counters
                    .rejected_requests
                    .fetch_add(1, Ordering::Relaxed);
                error(code, message)
            }
        }
    }

    fn validate(&self, v: &Vote) -> Result<Phase, Refusal> {
        let phase = v.check()?;
        if v.voter != self.node {
            return Err((
                Code::FailedPrecondition,
                format!(
                    "this votingd votes as {:?}, not as {:?}",
                    self.node, v.voter
                ),
            ));
        }
        Ok(phase)
    }

    async fn prepared(&self, v: &Vote) -> Result<Decision, Refusal> {
        let key = {
            let mut txs = self.txs.lock().expect("poisoned");
            let t = txs.entry(v.transaction.clone()).or_insert_with(|| TxLocal {
                record: None,
                occurrences: HashMap::new(),
                pending: Vec::new(),
                voting: 0,
                unconfirmed: Vec::new(),
                touched: Instant::now(),
            });
            t.touched = Instant::now();
            t.voting += 1;
            let n = t.occurrences.entry(v.key_base.clone()).or_default();
            let key = format!("{}.{n}", v.key_base);
            *n += 1;
            key
        };
        let hash = hex::encode(&v.hash);
        let vote = VoteRecord {
            hash: hash.clone(),
            ref_count: v.ref_count,
            first_ref: v.first_ref.clone(),
        };
        self.counters.votes_waiting.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self
            .store
            .cast_vote(&v.transaction, &self.node, &key, &vote, self.vote_timeout)
            .await;
        self.counters.votes_waiting.fetch_sub(1, Ordering::Relaxed);
        self.counters
            .vote_seconds
            .observe_duration(started.elapsed());
        if result.is_ok() {
            faults::reach(faults::AFTER_DECISION).await;
        }
        if let Some(t) = self.txs.lock().expect("poisoned").get_mut(&v.transaction) {
            t.voting -= 1;
            if let (None, Ok((_, record))) = (&t.record, &result) {
                t.record = Some(Arc::new(record.clone()));
            }
        }
        let span = tracing::info_span!("vote", tx = %v.transaction, key, first_ref = %v.first_ref);
        let _enter = span.enter();
        match result {
            Ok((d, _)) if d.hash.as_deref() == Some(hash.as_str()) => {
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                let mut txs = self.txs.lock().expect("poisoned");
                if let Some(t) = txs.get_mut(&v.transaction) {
                    t.pending.push(Pending {
                        key_base: v.key_base.clone(),
                        key,
                        hash,
                    });
                }
                tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "commit");
                Ok(Decision {
                    commit: true,
                    message: String::new(),
                })
            }
            Ok((d, record)) if d.is_commit() => {
                // The majority agreed on another value: this replica's refs differ.
                // Mark it outdated before the hook exits, so no read goes to it.
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                let reason = format!(
                    "lost the vote on {} in transaction {}",
                    v.first_ref, v.transaction
                );
                if let Err(e) = self
                    .store
                    .mark_outdated(&record.repo, &self.node, &reason)
                    .await
                {
                    tracing::warn!(error = %e, "could not mark the replica outdated; finalize will");
                }
                tracing::warn!(repo = %record.repo, "this replica disagreed with the majority; marked outdated");
                Ok(Decision {
                    commit: false,
                    message: format!(
                        "refvote: update rejected: this replica's refs differ from the majority \
                         ({} of {} replicas agreed on another value); it is marked outdated",
                        d.agreed, d.assigned
                    ),
                })
            }
            Ok((d, _)) => {
                self.counters.aborts.fetch_add(1, Ordering::Relaxed);
                tracing::info!(reason = %d.reason, "abort");
                Ok(Decision {
                    commit: false,
                    message: format!("refvote: update rejected: {}", d.reason),
                })
            }
            Err(
                e @ (ClusterError::UnknownTx(_)
                | ClusterError::NotAVoter { .. }
                | ClusterError::NotStarted { .. }
                | ClusterError::VoterDone { .. }),
            ) => Err(refusal(e)),
            Err(e) => {
                match &e {
                    ClusterError::NoDecision(_) => {
                        self.counters.timeouts.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => self.counters.errors.fetch_add(1, Ordering::Relaxed),
                };
                tracing::warn!(error = %e, "vote failed; aborting");
                Ok(Decision {
                    commit: false,
                    message: format!("refvote: update rejected: {e}"),
                })
            }
        }
    }

    fn take_pending(&self, v: &Vote) -> Option<(Arc<TxRecord>, String)> {
        let hash = hex::encode(&v.hash);
        let mut txs = self.txs.lock().expect("poisoned");
        let t = txs.get_mut(&v.transaction)?;
        t.touched = Instant::now();
        let i = t
            .pending
            .iter()
            .position(|p| p.key_base == v.key_base && p.hash == hash)?;
        Some((t.record.clone()?, t.pending.remove(i).key))
    }

    async fn committed(&self, v: &Vote) -> Result<Decision, Refusal> {
        let Some((_, key)) = self.take_pending(v) else {
            return Err((
                Code::FailedPrecondition,
                format!(
                    "no update of transaction {} was decided commit with this content",
                    v.transaction
                ),
            ));
        };
        faults::reach(faults::BEFORE_CONFIRM).await;
        if let Err(e) = self.store.confirm(&v.transaction, &key, &self.node).await {
            // git applied it: keep it, so this node confirms it before it reports done.
            if let Some(t) = self.txs.lock().expect("poisoned").get_mut(&v.transaction) {
                t.unconfirmed.push(key);
            }
            return Err(refusal(e));
        }
        self.counters.confirms.fetch_add(1, Ordering::Relaxed);
        Ok(Decision {
            commit: true,
            message: String::new(),
        })
    }

    /// Before this node reports itself done in `tx`: writes the confirmations that
    /// failed earlier, and marks the replica outdated if git was told to commit an
    /// update and never said whether it did (it died in between). Finalize reads "done
    /// without a confirmation" as "did not apply", so this must succeed first.
    pub async fn settle(&self, tx: &str) -> Result<(), ClusterError> {
        let (record, unconfirmed, unsure) = {
            let mut txs = self.txs.lock().expect("poisoned");
            let Some(t) = txs.get_mut(tx) else {
                return Ok(());
            };
            let unsure: Vec<String> = t.pending.drain(..).map(|p| p.key).collect();
            (t.record.clone(), std::mem::take(&mut t.unconfirmed), unsure)
        };
        let mut left = unconfirmed.into_iter();
        while let Some(key) = left.next() {
            if let Err(e) = self.store.confirm(tx, &key, &self.node).await {
                let mut txs = self.txs.lock().expect("poisoned");
                if let Some(t) = txs.get_mut(tx) {
                    t.unconfirmed.push(key);
                    t.unconfirmed.extend(left);
                }
                return Err(e);
            }
            self.counters.confirms.fetch_add(1, Ordering::Relaxed);
        }
        if let (Some(record), false) = (record, unsure.is_empty()) {
            let reason = format!(
                "git stopped between committing and confirming an update of transaction {tx}"
            );
            tracing::warn!(tx, keys = ?unsure, "{reason}");
            if let Err(e) = self
                .store
                .mark_outdated(&record.repo, &self.node, &reason)
                .await
            {
                let mut txs = self.txs.lock().expect("poisoned");
                if let Some(t) = txs.get_mut(tx) {
                    t.pending.extend(unsure.into_iter().map(|key| Pending {
                        key_base: String::new(),
                        key,
                        hash: String::new(),
                    }));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    async fn aborted(&self, v: &Vote) -> Result<Decision, Refusal> {
        if let Some((record, key)) = self.take_pending(v) {
            // The replicas decided to commit this update and git dropped it here.
            let reason = format!(
                "git aborted update {key} of transaction {} after it was decided",
                v.transaction
            );
            tracing::warn!(tx = %v.transaction, key, "git aborted a committed update");
            self.store
                .mark_outdated(&record.repo, &self.node, &reason)
                .await
                .map_err(refusal)?;
        }
        Ok(Decision {
            commit: true,
            message: String::new(),
        })
    }
}

/// The node service settles this node's confirmations through the vote service before
/// it reports itself done.
impl refvote_node::tx::SettleVotes for VoteService {
    fn settle<'a>(
        &'a self,
        tx: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), ClusterError>> + Send + 'a>> {
        Box::pin(VoteService::settle(self, tx))
    }
}

fn error(code: Code, message: String) -> Response {
    Response {
        kind: Some(response::Kind::Error(hook::Error {
            code: code as i32,
            message,
        })),
    }
}

/// Maps a cluster error to the code and message the hook shows.
fn refusal(e: ClusterError) -> Refusal {
    let code = match &e {
        ClusterError::UnknownTx(_) => Code::NotFound,
        ClusterError::NotAVoter { .. }
        | ClusterError::NotStarted { .. }
        | ClusterError::VoterDone { .. }
        | ClusterError::Abandoned(_) => Code::FailedPrecondition,
        ClusterError::Etcd(_) | ClusterError::Timeout(_) => Code::Unavailable,
        _ => Code::Internal,
    };
    (code, e.to_string())
}

/// Answers a status query; the daemon provides it.
pub type StatusFn = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>> + Send + Sync,
>;

/// Accepts hook connections until the task is dropped.
pub async fn serve(listener: UnixListener, service: Arc<VoteService>, status: StatusFn) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept on the vote socket failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = service.clone();
        let status = status.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &service, &status).await {
                tracing::debug!(error = %e, "hook connection ended with an error");
            }
        });
    }
}

async fn connection(
    mut stream: UnixStream,
    service: &VoteService,
    status: &StatusFn,
) -> std::io::Result<()> {
    let request = tokio::time::timeout(REQUEST_READ_TIMEOUT, read_request(&mut stream)).await;
    let response = match request {
        Err(_) => error(Code::InvalidArgument, "no request within 10 s".into()),
        Ok(Err(message)) => {
            service
                .counters
                .rejected_requests
                .fetch_add(1, Ordering::Relaxed);
            error(Code::InvalidArgument, message)
        }
        Ok(Ok(request)) => match request.kind {
            Some(request::Kind::Vote(v)) => service.vote(v).await,
            Some(request::Kind::Status(_)) => Response {
                kind: Some(response::Kind::StatusJson(status().await)),
            },
            None => error(Code::InvalidArgument, "empty request".into()),
        },
    };
    stream.write_all(&hook::encode_frame(&response)).await?;
    stream.shutdown().await
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    let len = hook::frame_len(header).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    hook::decode_request(&body)
}
