//! The router's one catch-all handler: classify the call from the [`Registry`], read
//! the target repository from the first request frame, pick replicas from etcd, and
//! forward raw frames both ways. Nothing here knows a Gitaly message type.
//!
//! So far accessors are forwarded (to one up-to-date replica on a live node, retried
//! on another when a replica says it cannot serve); mutators and maintenance calls are
//! refused with UNIMPLEMENTED rather than sent to one replica without a vote.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use refvote_cluster::repository::RepoView;
use refvote_cluster::{RepoId, Store};
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::{Code, Extensions, Request, Response, Status, Streaming};

use crate::codec::BytesCodec;
use crate::frame;
use crate::pool::Pool;
use crate::registry::{Method, OpKind, Registry};
use crate::respond::RouteError;

/// Frames back to the client: the node's, unchanged, ending with its status.
pub type Frames = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// Frames to a node.
type Outgoing = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

pub struct Forwarder {
    registry: Registry,
    store: Store,
    pool: Pool,
    /// Round-robin position for spreading reads over a repository's replicas.
    turn: AtomicUsize,
}

impl Forwarder {
    pub fn new(registry: Registry, store: Store) -> Forwarder {
        Forwarder {
            registry,
            store,
            pool: Pool::default(),
            turn: AtomicUsize::new(0),
        }
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
            async move { me.call(&method, call).await.map_err(Status::from) }
        });
        grpc.streaming(svc, req).await
    }

    #[tracing::instrument(skip_all, fields(method = %method.path))]
    async fn call(
        &self,
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
        let target = method
            .target
            .clone()
            .ok_or_else(|| not_yet("storage-scoped calls are not routed yet"))?;
        let (metadata, _, mut incoming) = req.into_parts();
        let first = incoming
            .message()
            .await
            .map_err(RouteError::Client)?
            .ok_or_else(|| RouteError::EmptyRequest(method.path.clone()))?;
        let wanted = frame::repository(&first, &target).map_err(|source| RouteError::Frame {
            method: method.path.clone(),
            source,
        })?;
        // The client names the virtual storage; validating here keeps a traversal out
        // of etcd keys and away from every node.
        let repo = RepoId::new(&wanted.storage_name, &wanted.relative_path)?;
        tracing::debug!(%repo, ?kind, "routing");
        match kind {
            OpKind::Accessor => {
                let call = Call {
                    method,
                    target: &target,
                    metadata,
                    first,
                    incoming: Some(incoming),
                };
                self.accessor(&repo, call).await
            }
            OpKind::Mutator => Err(not_yet(
                "writes must be voted by every replica, and voting through the router is to come",
            )),
            OpKind::Maintenance => Err(not_yet("maintenance fan-out is to come")),
        }
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

    async fn accessor(
        &self,
        repo: &RepoId,
        mut call: Call<'_>,
    ) -> Result<Response<Frames>, RouteError> {
        let view = self.view(repo).await?;
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
                Attempt::Refused(status) => return Err(RouteError::Client(status)),
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
        let outgoing: Outgoing = match call
            .incoming
            .take()
            .filter(|_| call.method.client_streaming)
        {
            Some(rest) => Box::pin(stream::once(async { first }).chain(rest_of(rest))),
            None => Box::pin(stream::once(async { first })),
        };
        let request = Request::from_parts(call.metadata.clone(), Extensions::new(), outgoing);
        let path = match http::uri::PathAndQuery::try_from(call.method.path.as_str()) {
            Ok(p) => p,
            Err(e) => return Attempt::Unusable(e.to_string()),
        };
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

/// What one call carries from replica to replica.
struct Call<'a> {
    method: &'a Method,
    target: &'a [u32],
    metadata: MetadataMap,
    first: Bytes,
    /// The rest of the client's stream, until an attempt takes it.
    incoming: Option<Streaming<Bytes>>,
}

enum Attempt {
    Answer(Response<Frames>),
    /// The node answered with an error status before any frame.
    Refused(Status),
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
fn rest_of(incoming: Streaming<Bytes>) -> impl Stream<Item = Bytes> + Send {
    stream::unfold(incoming, |mut s| async move {
        match s.message().await {
            Ok(Some(m)) => Some((m, s)),
            Ok(None) => None,
            Err(status) => {
                tracing::debug!(%status, "the client's request stream broke");
                std::future::pending().await
            }
        }
    })
}
