//! The router's one catch-all handler: classify the call from the [`Registry`], read
//! the target repository from the first request frame, pick replicas from etcd, and
//! forward raw frames both ways. Nothing here knows a Gitaly message type.
//!
//! Accessors go to one up-to-date replica on a live node, retried on another when a
//! replica says it cannot serve; those that carry a sidechannel (the fetch RPCs of
//! gitlab-shell and workhorse) have it proxied ([`crate::sidechannel`]); one that reads
//! a push's quarantine goes to the voter running that push's GitLab checks
//! ([`crate::gitlab`]). Mutators run as a voted transaction on every voter (DESIGN.md
//! §2), answered only after finalize; one by a GitLab user is gated by GitLab's checks
//! (DESIGN.md §8) and, once acknowledged, gets post-receive's output in its answer.
//! Maintenance calls go to every up-to-date replica without a transaction.
//! Storage-scoped accessors (FindRemoteRepository) go to any live node, the storage
//! name rewritten for it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use refvote_cluster::records::{NodeRecord, PendingPostReceive, TxRecord};
use refvote_cluster::repository::RepoView;
use refvote_cluster::tx::Begin;
use refvote_cluster::{RepoId, Store};
use tokio::sync::watch;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::{Code, Extensions, Request, Response, Status, Streaming};

use crate::codec::BytesCodec;
use crate::fanout::{LegResult, LegSpec, fan_out};
use crate::frame;
use crate::gitlab::{self, PostReceive, Quarantine};
use crate::interactive::Session;
use crate::limit::{Class, LimitSettings, Limiter};
use crate::outcome::{answer, non_voters, respond_with};
use crate::pool::{NodeChannel, Pool};
use crate::reads::{ReadError, ReadStats, Reads};
use crate::registry::{Method, OpKind, Registry};
use crate::respond::RouteError;
use crate::sidechannel::{self, Backchannels};

/// Frames back to the client: the node's, unchanged, ending with its status.
pub use crate::outcome::Frames;

/// Resolves with `drain_timeout_secs` once [`Forwarder::cut_calls`] was called (at once
/// if it was already).
async fn cut_signal(cut: &mut watch::Receiver<Option<Duration>>) -> Duration {
    let cut = cut.wait_for(Option::is_some).await.map(|timeout| *timeout);
    match cut {
        Ok(timeout) => timeout.unwrap_or_default(),
        // The forwarder is gone, so nobody can cut any more.
        Err(_) => std::future::pending().await,
    }
}

/// `frames`, ended by an UNAVAILABLE [`RouteError::DrainCut`] if the cut comes before
/// their end.
fn cut_frames(frames: Frames, cut: watch::Receiver<Option<Duration>>, write: bool) -> Frames {
    Box::pin(stream::unfold(
        Some((frames, cut)),
        move |state| async move {
            let (mut frames, mut cut) = state?;
            let next = tokio::select! {
                biased;
                next = frames.next() => Ok(next),
                timeout = cut_signal(&mut cut) => Err(timeout),
            };
            match next {
                Ok(next) => next.map(|frame| (frame, Some((frames, cut)))),
                Err(timeout) => {
                    let cut = RouteError::DrainCut {
                        secs: timeout.as_secs(),
                        write,
                    };
                    Some((Err(Status::from(cut)), None))
                }
            }
        },
    ))
}

/// Frames to a node.
type Outgoing = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// The request metadata key naming the transaction a node votes in (refvote's wire
/// contract, defined in `refvote_proto`).
pub use refvote_proto::contract::TX_METADATA;

/// How long finalize waits for the voters that answered to report done, and for their
/// pending confirmations in other open transactions of the repository (each ends as
/// soon as that voter confirms, reports done, or its node loses its lease).
const FINALIZE_WAIT: Duration = Duration::from_secs(30);
/// How long each background retry of a failed finalize waits for voters.
const LATE_FINALIZE_WAIT: Duration = Duration::from_secs(2);

pub struct Forwarder {
    registry: Registry,
    store: Store,
    pool: Pool,
    /// Round-robin position for spreading reads over a repository's replicas.
    turn: AtomicUsize,
    /// Creator of this router's transactions (its `router_id`).
    router_id: String,
    /// The router's etcd lease: its transactions are abandoned (and reaped) when it
    /// expires.
    lease: watch::Receiver<Option<i64>>,
    /// Replicas a repository created through this router gets.
    replication_factor: usize,
    /// How long a write waits for a repository's administrative lock.
    lock_wait: Duration,
    /// Where reads learn their replicas: the watched view and the shared confirm.
    reads: Reads,
    /// Backchannel connections to nodes, for calls that carry a sidechannel.
    backchannels: Backchannels,
    /// Concurrency limits on the costly calls (`[limits]`).
    limiter: Arc<Limiter>,
    /// Set (to `drain_timeout_secs`) when SIGTERM's drain ran out of time: every call
    /// still in flight then ends with UNAVAILABLE saying so ([`Forwarder::cut_calls`]).
    cut: watch::Sender<Option<Duration>>,
}

impl Forwarder {
    pub fn new(
        registry: Registry,
        store: Store,
        router_id: String,
        lease: watch::Receiver<Option<i64>>,
        replication_factor: usize,
        reads: Reads,
    ) -> Forwarder {
        Forwarder {
            reads,
            registry,
            store,
            pool: Pool::default(),
            turn: AtomicUsize::new(0),
            router_id,
            lease,
            replication_factor,
            lock_wait: Duration::from_secs(10),
            backchannels: Backchannels::new(None, None),
            limiter: Limiter::new(LimitSettings::default()),
            cut: watch::channel(None).0,
        }
    }

    /// Ends every call in flight, and any begun from now on, with UNAVAILABLE
    /// ([`RouteError::DrainCut`]): SIGTERM's drain calls this once `timeout`
    /// (`drain_timeout_secs`) ran out, so clients hear that the router is shutting down
    /// instead of a reset connection. A write cut this way is left to the reaper (the
    /// router's lease is revoked right after), which finalizes it like any abandoned
    /// transaction.
    pub fn cut_calls(&self, timeout: Duration) {
        self.cut.send_replace(Some(timeout));
    }

    /// Sheds costly calls over `limiter`'s limits (RESOURCE_EXHAUSTED).
    pub fn with_limiter(mut self, limiter: Arc<Limiter>) -> Forwarder {
        self.limiter = limiter;
        self
    }

    /// How sidechannel calls reach nodes (signed, and over TLS to `tls://` nodes).
    pub fn with_backchannels(mut self, backchannels: Backchannels) -> Forwarder {
        self.backchannels = backchannels;
        self
    }

    pub fn with_lock_wait(mut self, wait: Duration) -> Forwarder {
        self.lock_wait = wait;
        self
    }

    /// Begins a transaction (`gated` by GitLab's checks or not); while an administrative
    /// operation (a repair's catch-up, a replica being added) holds the repository's
    /// lock, waits up to `lock_wait` for it.
    async fn begin(
        &self,
        repo: &RepoId,
        begin: &Begin,
        gated: bool,
    ) -> refvote_cluster::Result<TxRecord> {
        let deadline = tokio::time::Instant::now() + self.lock_wait;
        let mut tick = Duration::from_millis(10);
        loop {
            let attempt = if gated {
                self.store.begin_gated(repo, begin).await
            } else {
                self.store.begin(repo, begin).await
            };
            match attempt {
                Err(refvote_cluster::Error::Locked(_))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep_until((tokio::time::Instant::now() + tick).min(deadline))
                        .await;
                    tick = (tick * 2).min(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    /// Signs every call to a node with `secret` (the `[auth]` token nodes check),
    /// in place of the token the client sent the router, and reaches `tls://` nodes
    /// with `tls`.
    pub fn secure_calls_to_nodes(
        mut self,
        secret: Option<Arc<refvote_auth::Secret>>,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Forwarder {
        self.pool = Pool::new(secret, tls);
        self
    }

    /// Why a caller holding only the read-only token may not call `path`: anything
    /// but an accessor (Gitaly's `op_type: ACCESSOR`), refvote's admin service included.
    pub fn read_only_refusal(&self, path: &str) -> Option<Status> {
        let kind = self.registry.get(path).and_then(|m| m.kind);
        if kind == Some(OpKind::Accessor) {
            return None;
        }
        let what = match kind {
            Some(OpKind::Mutator) => "a write (op_type MUTATOR)",
            Some(OpKind::Maintenance) => "maintenance (op_type MAINTENANCE)",
            _ => "not a read",
        };
        tracing::warn!(
            method = path,
            "read-only token refused a call that is not a read"
        );
        Some(Status::permission_denied(format!(
            "refvote-router refused {path}: it is {what} and the call's token is read-only \
             ([auth_read_only]); use the read-write token"
        )))
    }

    /// Serves one HTTP/2 request as a gRPC call of any kind.
    pub async fn handle(
        self: Arc<Self>,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let path = req.uri().path().to_owned();
        let Some(method) = self.registry.get(&path).cloned() else {
            return Status::from(RouteError::UnknownMethod(path)).into_http();
        };
        // Every call is handled as bidi streaming: unary and server-streaming calls are
        // streams of one request frame on the wire, so one code path serves all four.
        let mut grpc = tonic::server::Grpc::new(BytesCodec);
        let svc = tower::service_fn(move |call: Request<Streaming<Bytes>>| {
            let me = self.clone();
            let method = method.clone();
            async move {
                let write = method.kind == Some(OpKind::Mutator);
                let mut cut = me.cut.subscribe();
                // Either the answer (its frames watched for the cut too) or the cut.
                let answer = tokio::select! {
                    answer = me.call(&method, call) => answer,
                    timeout = cut_signal(&mut cut) => Err(RouteError::DrainCut {
                        secs: timeout.as_secs(),
                        write,
                    }),
                }
                .map_err(Status::from)?;
                Ok(answer.map(|frames| cut_frames(frames, cut, write)))
            }
        });
        grpc.streaming(svc, req).await
    }

    #[tracing::instrument(skip_all, fields(method = %method.path))]
    async fn call(
        self: &Arc<Self>,
        method: &Method,
        req: Request<Streaming<Bytes>>,
    ) -> Result<Response<Frames>, RouteError> {
        let not_yet = |why| RouteError::NotYet {
            method: method.path.clone(),
            why,
        };
        let kind = method
            .kind
            .ok_or_else(|| not_yet("the router answers this service itself, which is to come"))?;
        let (metadata, extensions, mut incoming) = req.into_parts();
        let sidechannel = match kind {
            OpKind::Accessor => sidechannel::caller(&method.path, &metadata, &extensions)
                .map_err(RouteError::Client)?,
            _ => None,
        };
        let first = incoming
            .message()
            .await
            .map_err(RouteError::Client)?
            .ok_or_else(|| RouteError::EmptyRequest(method.path.clone()))?;
        let target = match (&method.target, &method.storage) {
            (Some(target), _) => target.clone(),
            (None, Some(storage)) if kind == OpKind::Accessor => {
                return self
                    .storage_accessor(method, storage, metadata, first)
                    .await;
            }
            _ => return Err(not_yet("storage-scoped writes are not routed yet")),
        };
        let wanted = frame::repository(&first, &target).map_err(|source| RouteError::Frame {
            method: method.path.clone(),
            source,
        })?;
        // The client names the virtual storage; validating here keeps a traversal out
        // of etcd keys and away from every node.
        let repo = RepoId::new(&wanted.storage_name, &wanted.relative_path)?;
        tracing::debug!(%repo, ?kind, "routing");
        let quarantine = gitlab::quarantine(&wanted, &metadata);
        if kind != OpKind::Accessor && matches!(quarantine, Quarantine::Directory(_)) {
            return Err(RouteError::QuarantinedWrite(method.path.clone()));
        }
        // A costly call waits for its slots here and holds them until its answer ends
        // (the permit rides along in the answer stream).
        let permit = match Class::of(&method.path) {
            Some(class) => Some(
                self.limiter
                    .acquire(class, &repo.to_string())
                    .await
                    .map_err(RouteError::Limited)?,
            ),
            None => None,
        };
        let call = Call {
            method,
            target: &target,
            metadata,
            first,
            incoming: Some(incoming),
            sidechannel,
        };
        let answer = match kind {
            OpKind::Accessor => self.accessor(&repo, call, quarantine).await,
            OpKind::Mutator => self.mutator(&repo, call).await,
            OpKind::Maintenance => self.maintenance(&repo, call).await,
        }?;
        Ok(match permit {
            None => answer,
            Some(permit) => answer.map(|frames| -> Frames {
                Box::pin(frames.map(move |frame| {
                    let _held = &permit;
                    frame
                }))
            }),
        })
    }

    /// A write: one transaction, the call on every voter, the answer held back until
    /// finalize says whether the client may hear success (DESIGN.md §2 steps 1-7).
    async fn mutator(
        self: &Arc<Self>,
        repo: &RepoId,
        mut call: Call<'_>,
    ) -> Result<Response<Frames>, RouteError> {
        let lease = (*self.lease.borrow()).ok_or(RouteError::NoLease)?;
        // A write that creates objects gets its time once, here, so every replica
        // builds the same ones (and a bad zone is refused before anything begins).
        if let Some(stamp) = &call.method.stamp {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|e| RouteError::Internal(format!("the router's clock: {e}")))?
                .as_secs() as i64;
            if let Some(first) =
                crate::stamp::settle(&call.first, stamp, now).map_err(RouteError::Stamp)?
            {
                call.first = Bytes::from(first);
            }
        }
        // A creating call registers the repository first: placed, recorded create-only,
        // then created on every assigned node as a voted write like any other.
        let created = if creates_repository(&call.method.path) {
            Some(self.register(repo).await?)
        } else {
            None
        };
        let begin = Begin {
            creator: self.router_id.clone(),
            lease,
        };
        let gated = gitlab::gated(&call.method.path, &call.first);
        let tx = self.begin(repo, &begin, gated).await;
        if tx.is_ok() {
            refvote_cluster::faults::reach(refvote_cluster::faults::AFTER_BEGIN).await;
        }
        if let (Err(_), Some(rev)) = (&tx, created) {
            self.unregister(repo, rev).await;
        }
        let tx = tx.map_err(|e| match e {
            e @ (refvote_cluster::Error::NoQuorum { .. } | refvote_cluster::Error::Locked(_)) => {
                RouteError::NoVote {
                    repo: repo.clone(),
                    source: e,
                }
            }
            refvote_cluster::Error::UnknownRepo(r) => RouteError::NotRegistered(r),
            e @ refvote_cluster::Error::MixedGitlab { .. } => RouteError::Gitlab {
                repo: repo.clone(),
                source: e,
            },
            source => RouteError::Etcd {
                repo: repo.clone(),
                source,
            },
        })?;
        tracing::debug!(tx = %tx.id, voters = ?tx.voters, threshold = tx.threshold, "transaction created");
        // Addresses come from a fresh view; a voter whose node vanished meanwhile is
        // simply a failed voter.
        let view = self.view(repo).await.ok();
        let mut metadata = call.metadata.clone();
        let value = tonic::metadata::MetadataValue::try_from(tx.id.as_str())
            .map_err(|e| RouteError::Internal(format!("transaction id as metadata: {e}")))?;
        metadata.insert(TX_METADATA, value);
        if let Some(designated) = &tx.designated {
            let value = tonic::metadata::MetadataValue::try_from(designated.as_str())
                .map_err(|e| RouteError::Internal(format!("voter name as metadata: {e}")))?;
            metadata.insert(refvote_proto::contract::DESIGNATED_METADATA, value);
        }
        let mut legs = Vec::new();
        let mut unusable = Vec::new();
        for node in &tx.voters {
            let leg = match &view {
                Some(view) => self.prepare(view, node, &call),
                None => Err("the repository's records could not be read".into()),
            };
            match leg {
                Ok((channel, first)) => legs.push(LegSpec {
                    node: node.clone(),
                    channel,
                    first,
                    metadata: metadata.clone(),
                    tap: None,
                }),
                Err(why) => unusable.push((node.clone(), why)),
            }
        }
        // The assigned replicas nobody calls, for a refusal's reason.
        let mut absent = unusable.clone();
        if let Some(view) = &view {
            absent.extend(non_voters(&view.record.assigned, &tx.voters, |n| {
                view.live_nodes.contains_key(n)
            }));
        }
        let path = path_of(call.method)?;
        let method_path = call.method.path.clone();
        let rest = call.incoming.filter(|_| call.method.client_streaming);
        // An interactive push passes part of one voter's answer on before the outcome.
        let (mut session, early) = if crate::interactive::interactive(&method_path) {
            let (s, early) = Session::start(&mut legs, tx.designated.as_deref());
            (Some(s), Some(early))
        } else {
            (None, None)
        };
        // A two-phase write passes its voters' agreed proposal on early.
        let two_phase = crate::twophase::is_two_phase(&method_path);
        let (propose, proposal) = tokio::sync::oneshot::channel::<Bytes>();
        // The rest runs on its own task: a client that goes away must not leave the
        // transaction unfinalized (its voters would wait, and it would hold the
        // repository's pending-confirmation index until this router's lease lapsed).
        let me = self.clone();
        let task = tokio::spawn(async move {
            let _in_flight = crate::metrics::TRANSACTIONS_IN_FLIGHT.track();
            let store = me.store.clone();
            for (node, why) in &unusable {
                tracing::warn!(tx = %tx.id, node, why, "voter cannot be called");
                if let Err(e) = store.fail_voter(&tx.id, node, &me.router_id, why).await {
                    tracing::warn!(tx = %tx.id, node, error = %e, "cannot record the voter failed");
                }
            }
            // A voter whose call ended unanswered (its node died before its lease ran
            // out) is reported failed at once, as finalize would: the others' votes
            // settle without waiting for it (DESIGN.md §2 "a failed RPC settles a key").
            let report = |node: &str, why: &str| {
                let (store, tx_id, by) = (store.clone(), tx.id.clone(), me.router_id.clone());
                let (node, why) = (node.to_owned(), why.to_owned());
                tokio::spawn(async move {
                    if let Err(e) = store.fail_voter(&tx_id, &node, &by, &why).await {
                        tracing::warn!(tx = %tx_id, node, error = %e, "cannot record the voter failed yet");
                    }
                });
            };
            let gone = |n: &str| me.reads.node_gone(n);
            let mut results = if two_phase {
                let threshold = tx.threshold;
                crate::twophase::fan_out(path, legs, rest, threshold, propose, &gone, &report).await
            } else {
                drop(propose);
                let fan = fan_out(path, legs, rest, &gone, &report);
                match session.as_mut() {
                    Some(s) => s.relay(fan).await,
                    None => fan.await,
                }
            };
            if let Some(s) = &session {
                s.live_first(&mut results);
            }
            // Every voter that was not called or whose call failed: finalize reports
            // them failed (again, until it lands; create-only) so nobody waits for them.
            let failed: Vec<(String, String)> = unusable
                .iter()
                .cloned()
                .chain(
                    results
                        .iter()
                        .filter(|(_, r)| !r.succeeded())
                        .map(|(n, r)| (n.clone(), r.status_text())),
                )
                .collect();
            let outcome = me.finalize(&tx, lease, &failed).await;
            crate::metrics::finalized(&outcome);
            // GitLab's post-receive, once, for a gated write acknowledged as committed.
            let mut output = Vec::new();
            // Its pending marker was written with the outcome: if this router dies
            // before a voter ran it, another router's sweeper does (crate::sweep).
            if let Ok(o) = &outcome
                && PendingPostReceive::owed(&tx, o)
            {
                refvote_cluster::faults::reach(refvote_cluster::faults::BEFORE_POST_RECEIVE).await;
                let pending = PendingPostReceive::of(&tx, o, &me.router_id);
                match gitlab::run_post_receive(&me.pool, view.as_ref(), &pending, lease).await {
                    PostReceive::Ran(printed) => {
                        output = printed;
                        // The node deleted the marker; again here in case that failed.
                        let (store, id) = (store.clone(), tx.id.clone());
                        tokio::spawn(async move { crate::sweep::finish(&store, &id).await });
                    }
                    PostReceive::Nowhere => crate::sweep::finish(&store, &tx.id).await,
                    PostReceive::NotHere | PostReceive::Failed => {}
                }
            }
            if outcome.is_err() {
                // The client hears "outcome unknown"; the transaction must still end, or
                // it blocks repairs and locks of the repository for as long as this
                // router lives (the reaper only takes transactions whose router died).
                tokio::spawn(me.clone().finalize_later(tx.clone(), lease, failed));
            }
            if let Some(rev) = created {
                // A creation that committed nowhere leaves no registration behind, so
                // the client may simply retry it.
                if matches!(&outcome, Ok(o) if !o.acknowledged && !o.committed) {
                    me.unregister(&tx.repo, rev).await;
                }
                if let Ok(o) = &outcome
                    && o.acknowledged
                {
                    crate::nodes::record_creation_checksum(&store, &me.pool, &tx.repo, rev, o)
                        .await;
                }
            }
            let answer = answer(&tx, outcome, results, &absent, &method_path, &output);
            match session {
                Some(s) => s.finish(answer).await,
                None => answer,
            }
        });
        if let Some(mut early) = early
            && let Some(first) = early.recv().await
        {
            return Ok(crate::interactive::respond(first, early, task));
        }
        if two_phase && let Ok(sent) = proposal.await {
            let first = sent.clone();
            let rest = stream::once(async move {
                let settled = task
                    .await
                    .map_err(|e| RouteError::Internal(format!("the write's task failed: {e}")))
                    .and_then(|r| r);
                crate::twophase::rest_of_answer(sent, settled)
            })
            .flatten();
            let frames: Frames = Box::pin(stream::once(async move { Ok(first) }).chain(rest));
            return Ok(Response::new(frames));
        }
        task.await
            .map_err(|e| RouteError::Internal(format!("the write's task failed: {e}")))?
    }

    /// Places and registers a new repository; its record's create revision.
    async fn register(&self, repo: &RepoId) -> Result<i64, RouteError> {
        let etcd = |source| RouteError::Etcd {
            repo: repo.clone(),
            source,
        };
        let nodes = self
            .store
            .place(self.replication_factor)
            .await
            .map_err(|e| match e {
                e @ refvote_cluster::Error::TooFewNodes { .. } => RouteError::NoPlacement {
                    repo: repo.clone(),
                    source: e,
                },
                e => etcd(e),
            })?;
        match self.store.create_repository(repo, &nodes, "").await {
            Ok(_) => {}
            Err(refvote_cluster::Error::RepoExists(r)) => return Err(RouteError::AlreadyExists(r)),
            Err(e) => return Err(etcd(e)),
        }
        tracing::info!(%repo, ?nodes, "repository registered");
        let entry = self
            .store
            .get(&self.store.keys().repo(repo))
            .await
            .map_err(etcd)?
            .ok_or_else(|| RouteError::NotRegistered(repo.clone()))?;
        Ok(entry.create_revision)
    }

    /// Undoes [`Forwarder::register`] after a creation that changed nothing.
    async fn unregister(&self, repo: &RepoId, create_revision: i64) {
        match self
            .store
            .unregister_repository(repo, create_revision)
            .await
        {
            Ok(removed) => tracing::info!(%repo, removed, "failed creation: registration removed"),
            Err(e) => {
                tracing::warn!(%repo, error = %e, "cannot remove a failed creation's registration")
            }
        }
    }

    /// Retries finalizing `tx` in the background after a finalize that failed (etcd
    /// unreachable, no quorum), with back-off, until it succeeds, the transaction is
    /// gone (that finalize did land), or this router's lease changed (the reaper
    /// takes the transaction then). Bounded: about ten minutes.
    async fn finalize_later(
        self: Arc<Self>,
        tx: TxRecord,
        lease: i64,
        failed: Vec<(String, String)>,
    ) {
        let mut pause = Duration::from_millis(250);
        for attempt in 1..=600 {
            // Woken as soon as etcd answers again: a back-off grown during an etcd
            // outage must not keep the transaction open (and the repository's repairs
            // waiting) after etcd is back.
            self.store.pause(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            if self.lease.borrow().is_some_and(|now| now != lease) {
                tracing::info!(tx = %tx.id, "lease changed; the reaper finalizes the transaction");
                return;
            }
            self.report_failed(&tx, &failed).await;
            // A short wait per attempt: the loop itself waits, and a report that did
            // not land before this attempt is made again by the next one.
            match self
                .store
                .finalize(&tx.id, &self.router_id, lease, LATE_FINALIZE_WAIT)
                .await
            {
                Ok(o) => {
                    tracing::info!(tx = %tx.id, attempt, committed = o.committed, "finalized late");
                    return;
                }
                Err(refvote_cluster::Error::UnknownTx(_)) => return,
                Err(e) => tracing::debug!(tx = %tx.id, attempt, error = %e, "late finalize failed"),
            }
        }
        tracing::warn!(tx = %tx.id, "gave up finalizing; the transaction stays open until this router's lease ends");
    }

    /// Finalizes `tx`. A voter whose call failed (reset, refused, dropped as slow, or
    /// answered with an error) is reported done, as failed, first: from then on it can
    /// neither start nor vote (the store refuses both once `done` exists), so nobody
    /// waits for it; a node that was still running git keeps what it confirmed and is
    /// otherwise marked outdated and repaired. Then finalize waits at most
    /// [`FINALIZE_WAIT`] for the voters that answered to report done and for pending
    /// confirmations elsewhere.
    async fn finalize(
        &self,
        tx: &TxRecord,
        lease: i64,
        failed: &[(String, String)],
    ) -> Result<refvote_cluster::records::TxOutcome, refvote_cluster::Error> {
        refvote_cluster::faults::reach(refvote_cluster::faults::BEFORE_FINALIZE).await;
        if refvote_cluster::faults::fail(refvote_cluster::faults::FAIL_FINALIZE) {
            return Err(refvote_cluster::Error::Timeout(self.store.timeout()));
        }
        self.report_failed(tx, failed).await;
        self.store
            .finalize(&tx.id, &self.router_id, lease, FINALIZE_WAIT)
            .await
    }

    /// Reports each voter in `failed` (node, why) failed on its behalf. Create-only: a
    /// node that reported first keeps its own report, and a report that did not land
    /// (etcd unreachable) is simply made again by the next finalize attempt.
    async fn report_failed(&self, tx: &TxRecord, failed: &[(String, String)]) {
        let reports = failed.iter().map(|(node, why)| async move {
            tracing::info!(tx = %tx.id, node, why, "voter not called or its call failed; reporting it done (failed)");
            let r = self
                .store
                .fail_voter(&tx.id, node, &self.router_id, why)
                .await;
            (node, r)
        });
        for (node, r) in futures_util::future::join_all(reports).await {
            if let Err(e) = r {
                tracing::warn!(tx = %tx.id, node, error = %e, "cannot record the voter failed yet");
            }
        }
    }

    /// A storage-scoped read (FindRemoteRepository): it reads no repository, so any live
    /// node answers; the request's storage name becomes that node's storage. A node
    /// that cannot be reached is left for the next.
    async fn storage_accessor(
        &self,
        method: &Method,
        storage_field: &[u32],
        metadata: MetadataMap,
        first: Bytes,
    ) -> Result<Response<Frames>, RouteError> {
        let frame_error = |source| RouteError::Frame {
            method: method.path.clone(),
            source,
        };
        let storage = frame::string(&first, storage_field).map_err(frame_error)?;
        refvote_cluster::repo::validate_storage_name(&storage)?;
        let keys = self.store.keys();
        let (entries, _) =
            self.store.get_prefix(&keys.nodes()).await.map_err(|e| {
                RouteError::ReadUnconfirmed(format!("cannot list the live nodes: {e}"))
            })?;
        let mut nodes: Vec<NodeRecord> = entries
            .iter()
            .filter_map(|e| e.decode::<NodeRecord>().ok())
            .filter(|n| !n.address.is_empty() && !n.storages.is_empty())
            .collect();
        if nodes.is_empty() {
            return Err(RouteError::NoNode(format!(
                "no storage node holds its lease, so none can answer {}",
                method.path
            )));
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % nodes.len();
        nodes.rotate_left(start);
        let path = path_of(method)?;
        let mut failures = Vec::new();
        for node in &nodes {
            let channel = match self.pool.channel(&node.address) {
                Ok(c) => c,
                Err(why) => {
                    failures.push(format!("{}: {why}", node.name));
                    continue;
                }
            };
            let rewritten = frame::rewrite_string(&first, storage_field, &node.storages[0])
                .map_err(frame_error)?;
            let outgoing: Outgoing = Box::pin(stream::once(async { Bytes::from(rewritten) }));
            let request = Request::from_parts(metadata.clone(), Extensions::new(), outgoing);
            let mut client =
                tonic::client::Grpc::new(channel).max_decoding_message_size(usize::MAX);
            if let Err(e) = client.ready().await {
                failures.push(format!("{}: {e}", node.name));
                continue;
            }
            match client.streaming(request, path.clone(), BytesCodec).await {
                Ok(response) => {
                    let (metadata, frames, extensions) = response.into_parts();
                    let frames: Frames = Box::pin(frames);
                    return Ok(Response::from_parts(metadata, frames, extensions));
                }
                Err(status) if status.code() == Code::Unavailable => {
                    failures.push(format!("{}: {}", node.name, status.message()));
                }
                Err(status) => return Err(RouteError::Client(status)),
            }
        }
        Err(RouteError::NoNode(failures.join("; ")))
    }

    /// Maintenance: every up-to-date replica on a live node, no transaction (it changes
    /// no refs); the first success answers.
    async fn maintenance(
        &self,
        repo: &RepoId,
        call: Call<'_>,
    ) -> Result<Response<Frames>, RouteError> {
        let view = self.view(repo).await?;
        let mut legs = Vec::new();
        let mut failures = Vec::new();
        for node in view.up_to_date_live() {
            match self.prepare(&view, &node, &call) {
                Ok((channel, first)) => legs.push(LegSpec {
                    node,
                    channel,
                    first,
                    metadata: call.metadata.clone(),
                    tap: None,
                }),
                Err(why) => failures.push(format!("{node}: {why}")),
            }
        }
        if legs.is_empty() {
            return Err(RouteError::NoReplica {
                repo: repo.clone(),
                detail: if failures.is_empty() {
                    "none of its replicas is up to date on a live node".into()
                } else {
                    failures.join("; ")
                },
            });
        }
        let path = path_of(call.method)?;
        let rest = call.incoming.filter(|_| call.method.client_streaming);
        let results = fan_out(path, legs, rest, &|n| self.reads.node_gone(n), &|_, _| {}).await;
        let pick = results
            .iter()
            .position(|(_, r)| r.succeeded())
            .or_else(|| {
                results
                    .iter()
                    .position(|(_, r)| matches!(r, LegResult::Answered { .. }))
            })
            .unwrap_or(0);
        let (_, result) = results.into_iter().nth(pick).expect("at least one leg");
        respond_with(result)
    }

    /// The channel to `node` and the first frame rewritten for its storage.
    fn prepare(
        &self,
        view: &RepoView,
        node: &str,
        call: &Call<'_>,
    ) -> Result<(NodeChannel, Bytes), String> {
        let (record, _) = view.live_nodes.get(node).ok_or("not live")?;
        let storage = record.storages.first().ok_or("registers no storage")?;
        let channel = self.pool.channel(&record.address)?;
        let first = frame::rewrite_repository(&call.first, call.target, |r| {
            r.storage_name = storage.clone();
        })
        .map_err(|e| e.to_string())?;
        Ok((channel, Bytes::from(first)))
    }

    /// Reads the repository's records linearizably, so a read that starts after a write
    /// was acknowledged never goes to a replica that missed it (DESIGN.md "Reads").
    async fn view(&self, repo: &RepoId) -> Result<RepoView, RouteError> {
        match self.store.repo_view(repo).await {
            Ok(v) => Ok(v),
            Err(refvote_cluster::Error::UnknownRepo(r)) => Err(RouteError::NotRegistered(r)),
            Err(source) => Err(RouteError::Etcd {
                repo: repo.clone(),
                source,
            }),
        }
    }

    /// Counters of the read path.
    pub fn read_stats(&self) -> ReadStats {
        self.reads.stats()
    }

    /// The read path's view (its watched records feed the ops web's summaries).
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    async fn accessor(
        &self,
        repo: &RepoId,
        mut call: Call<'_>,
        quarantine: Quarantine,
    ) -> Result<Response<Frames>, RouteError> {
        let view = match self.reads.view(repo).await {
            Ok(view) => view,
            Err(ReadError::NotRegistered(r)) => return unregistered(call.method, r),
            Err(ReadError::Unconfirmed(why)) => return Err(RouteError::ReadUnconfirmed(why)),
        };
        if quarantine != Quarantine::None {
            let holders = self.quarantine_holders(repo, &view).await?;
            if !holders.is_empty() {
                return self.pinned(repo, &view, call, holders).await;
            }
            if let Quarantine::Directory(dir) = quarantine {
                return Err(RouteError::NoQuarantine {
                    repo: repo.clone(),
                    dir,
                });
            }
            // primary-only with no open push: any up-to-date replica has every write
            // acknowledged so far.
        }
        let mut replicas = view.up_to_date_live();
        if replicas.is_empty() {
            return Err(RouteError::NoReplica {
                repo: repo.clone(),
                detail: format!(
                    "none of its {} assigned replicas is up to date on a live node; \
                     repair brings them back, retry shortly",
                    view.record.assigned.len()
                ),
            });
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % replicas.len();
        replicas.rotate_left(start);
        // A client stream is consumed by the first attempt; only calls whose whole
        // request is the first frame can be sent again.
        let replayable = !call.method.client_streaming;
        let mut failures = Vec::new();
        for (i, node) in replicas.iter().enumerate() {
            let last = i + 1 == replicas.len() || !replayable;
            match self.attempt(&view, node, &mut call).await {
                Attempt::Answer(r) => return Ok(r),
                Attempt::Refused(status) if !last && retryable(status.code()) => {
                    tracing::info!(%repo, node, code = ?status.code(), message = status.message(), "replica refused a read; trying another");
                    failures.push(format!("{node}: {}", status.message()));
                }
                Attempt::Refused(status) | Attempt::Final(status) => {
                    return Err(RouteError::Client(status));
                }
                Attempt::Unusable(why) => failures.push(format!("{node}: {why}")),
            }
        }
        Err(RouteError::NoReplica {
            repo: repo.clone(),
            detail: failures.join("; "),
        })
    }

    /// The voters running GitLab's checks of `repo`'s open pushes: where reads of a
    /// push's quarantine go (one linearizable read of the open transactions).
    async fn quarantine_holders(
        &self,
        repo: &RepoId,
        view: &RepoView,
    ) -> Result<Vec<String>, RouteError> {
        let open = self
            .store
            .gated_open_transactions(repo)
            .await
            .map_err(|source| RouteError::Etcd {
                repo: repo.clone(),
                source,
            })?;
        Ok(gitlab::quarantine_holders(&open, view))
    }

    /// An accessor that must run on one of `holders` (in order): the next is tried
    /// when one does not hold the quarantine (NOT_FOUND) or cannot serve.
    async fn pinned(
        &self,
        repo: &RepoId,
        view: &RepoView,
        mut call: Call<'_>,
        holders: Vec<String>,
    ) -> Result<Response<Frames>, RouteError> {
        let replayable = !call.method.client_streaming;
        let mut failures = Vec::new();
        for (i, node) in holders.iter().enumerate() {
            let last = i + 1 == holders.len() || !replayable;
            match self.attempt(view, node, &mut call).await {
                Attempt::Answer(r) => return Ok(r),
                Attempt::Refused(status)
                    if !last && (retryable(status.code()) || status.code() == Code::NotFound) =>
                {
                    tracing::info!(%repo, node, code = ?status.code(), message = status.message(), "quarantine not on this replica; trying the next");
                    failures.push(format!("{node}: {}", status.message()));
                }
                Attempt::Refused(status) | Attempt::Final(status) => {
                    return Err(RouteError::Client(status));
                }
                Attempt::Unusable(why) => failures.push(format!("{node}: {why}")),
            }
        }
        Err(RouteError::NoReplica {
            repo: repo.clone(),
            detail: failures.join("; "),
        })
    }

    /// One try of an accessor on `node`. Nothing reaches the client until the node has
    /// sent its first response frame, so a refusal can still go to another replica.
    async fn attempt(&self, view: &RepoView, node: &str, call: &mut Call<'_>) -> Attempt {
        let Some((record, _)) = view.live_nodes.get(node) else {
            return Attempt::Unusable("not live".into());
        };
        // A node registers its storages; refvote places one replica per node, and the
        // node's first storage is where it keeps them. Several storages per node would
        // need the storage in the replica record.
        let Some(storage) = record.storages.first() else {
            return Attempt::Unusable("registers no storage".into());
        };
        let channel = match self.pool.channel(&record.address) {
            Ok(c) => c,
            Err(e) => return Attempt::Unusable(e),
        };
        let first = match frame::rewrite_repository(&call.first, call.target, |r| {
            r.storage_name = storage.clone();
        }) {
            Ok(f) => Bytes::from(f),
            Err(e) => return Attempt::Unusable(e.to_string()),
        };
        let path = match http::uri::PathAndQuery::try_from(call.method.path.as_str()) {
            Ok(p) => p,
            Err(e) => return Attempt::Unusable(e.to_string()),
        };
        if let Some(caller) = &call.sidechannel {
            // Unary: the first frame is the whole request.
            return match sidechannel::forward(
                &self.backchannels,
                &record.address,
                path,
                &call.metadata,
                caller,
                first,
            )
            .await
            {
                sidechannel::Outcome::Answer(r) => Attempt::Answer(r),
                sidechannel::Outcome::Refused(s) => Attempt::Refused(s),
                sidechannel::Outcome::Failed(s) => Attempt::Final(s),
            };
        }
        let outgoing: Outgoing = match call
            .incoming
            .take()
            .filter(|_| call.method.client_streaming)
        {
            Some(rest) => {
                Box::pin(stream::once(async { first }).chain(rest_of(rest, self.cut.subscribe())))
            }
            None => Box::pin(stream::once(async { first })),
        };
        let request = Request::from_parts(call.metadata.clone(), Extensions::new(), outgoing);
        let mut client = tonic::client::Grpc::new(channel)
            // The node already bounded what it sends; the router passes it on.
            .max_decoding_message_size(usize::MAX);
        if let Err(e) = client.ready().await {
            return Attempt::Refused(Status::unavailable(format!(
                "cannot reach node {node} at {}: {e}",
                record.address
            )));
        }
        let response = match client.streaming(request, path, BytesCodec).await {
            Ok(r) => r,
            Err(status) => return Attempt::Refused(status),
        };
        let (metadata, mut frames, extensions) = response.into_parts();
        let head: Frames = match frames.message().await {
            Ok(Some(first)) => Box::pin(stream::once(async { Ok(first) }).chain(frames)),
            // No frame at all: the node's status ends the call; trailers-only is how a
            // node answers an error, and a refusal may still be retried.
            Ok(None) => Box::pin(stream::empty()),
            Err(status) => return Attempt::Refused(status),
        };
        Attempt::Answer(Response::from_parts(metadata, head, extensions))
    }
}

/// A read of a repository etcd does not know, answered as Gitaly and Praefect answer
/// one that does not exist: `RepositoryExists` says `exists: false` (Praefect answers
/// it from its database the same way; Rails asks it before it creates or imports a
/// project or touches a wiki), every other read is NOT_FOUND, the code Gitaly's
/// repository validation gives (`HasLocalBranches`, `FindDefaultBranchName`,
/// `RepositorySize`, `ObjectFormat`...), which Rails reads as "no repository".
fn unregistered(method: &Method, repo: RepoId) -> Result<Response<Frames>, RouteError> {
    if method.path != "/gitaly.RepositoryService/RepositoryExists" {
        return Err(RouteError::NotRegistered(repo));
    }
    let absent = refvote_proto::gitaly::RepositoryExistsResponse { exists: false };
    let frame = Bytes::from(prost::Message::encode_to_vec(&absent));
    let frames: Frames = Box::pin(stream::once(async move { Ok(frame) }));
    Ok(Response::new(frames))
}

/// The calls that create their target repository.
fn creates_repository(path: &str) -> bool {
    matches!(
        path,
        "/gitaly.RepositoryService/CreateRepository"
            | "/gitaly.RepositoryService/CreateRepositoryFromBundle"
    )
}

fn path_of(method: &Method) -> Result<http::uri::PathAndQuery, RouteError> {
    http::uri::PathAndQuery::try_from(method.path.as_str())
        .map_err(|e| RouteError::Internal(format!("method path {}: {e}", method.path)))
}

/// What one call carries from replica to replica.
struct Call<'a> {
    method: &'a Method,
    target: &'a [u32],
    metadata: MetadataMap,
    first: Bytes,
    /// The rest of the client's stream, until an attempt takes it.
    incoming: Option<Streaming<Bytes>>,
    /// The caller's sidechannel, for a call that carries one.
    sidechannel: Option<sidechannel::Caller>,
}

enum Attempt {
    Answer(Response<Frames>),
    /// The node answered with an error status before any frame.
    Refused(Status),
    /// The call failed after it reached the client (a sidechannel in use): not retried.
    Final(Status),
    /// The replica could not be tried (bad registration).
    Unusable(String),
}

/// A replica that knows it is behind refuses with FAILED_PRECONDITION; an unreachable
/// node shows as UNAVAILABLE. Every other status is the answer.
fn retryable(code: Code) -> bool {
    matches!(code, Code::FailedPrecondition | Code::Unavailable)
}

/// The client's later frames, unchanged. If the client's stream breaks, the node's
/// stream is left open rather than ended: a clean end would let the node take a
/// truncated request as complete, while an open one is reset when the call is dropped.
/// The drain's cut ([`Forwarder::cut_calls`]) lets go of the client's stream the same
/// way, so a client that keeps its request open does not keep its connection (and the
/// router's exit) waiting once its call was cut.
fn rest_of(
    incoming: Streaming<Bytes>,
    cut: watch::Receiver<Option<Duration>>,
) -> impl Stream<Item = Bytes> + Send {
    stream::unfold((incoming, cut), |(mut s, mut cut)| async move {
        let next = tokio::select! {
            next = s.message() => next,
            _ = cut_signal(&mut cut) => {
                drop(s);
                return std::future::pending().await;
            }
        };
        match next {
            Ok(Some(m)) => Some((m, (s, cut))),
            Ok(None) => None,
            Err(status) => {
                tracing::debug!(%status, "the client's request stream broke");
                std::future::pending().await
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_drain_cut_ends_an_answer_in_flight_with_unavailable_and_spares_a_finished_one() {
        let (cut, rx) = watch::channel(None);
        // An answer that sent one frame and then waits forever (a node that never ends).
        let waiting: Frames =
            Box::pin(stream::iter([Ok(Bytes::from_static(b"first"))]).chain(stream::pending()));
        let mut frames = cut_frames(waiting, rx.clone(), true);
        assert_eq!(frames.next().await.unwrap().unwrap(), "first");
        let stalled = tokio::time::timeout(Duration::from_millis(50), frames.next()).await;
        assert!(stalled.is_err(), "no cut yet, so the answer waits");
        cut.send_replace(Some(Duration::from_secs(2)));
        let status = frames.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("drain_timeout_secs (2 s)"),
            "{status:?}"
        );
        assert!(frames.next().await.is_none(), "nothing after the cut");

        // An answer that already ended keeps its end; and a cut already made is seen
        // at once by a call that starts waiting after it.
        let done: Frames = Box::pin(stream::iter([Ok(Bytes::from_static(b"all"))]));
        let mut frames = cut_frames(done, rx.clone(), false);
        assert_eq!(frames.next().await.unwrap().unwrap(), "all");
        let mut late = rx;
        let timeout = tokio::time::timeout(Duration::from_secs(1), cut_signal(&mut late)).await;
        assert_eq!(timeout.unwrap(), Duration::from_secs(2));
    }
}
