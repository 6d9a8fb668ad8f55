//! Sending one call to several replicas at once (DESIGN.md §2 step 3): every replica
//! gets the first frame rewritten for its node and every later client frame through a
//! bounded channel of its own. A replica that cannot keep up, answers too much, fails,
//! or has not answered after another replica did while its node lost its lease, is
//! dropped alone; nothing any replica says is passed on here — the caller
//! decides which answer the client gets once the outcome is settled (a replica's
//! frames may also be copied to a [`Tap`] as they come, for an interactive push's live
//! part, `crate::interactive`).

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{Stream, StreamExt, stream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::{Extensions, Request, Status, Streaming};

use crate::codec::BytesCodec;
use crate::pool::NodeChannel;

/// Client frames buffered per replica: enough to ride out a replica's short pause
/// without holding a large push in memory for each.
const LEG_BUFFER: usize = 16;
/// How long a replica's full buffer may hold up the tee before it is dropped.
const STALL: Duration = Duration::from_secs(5);
/// After one replica answered successfully, how long the others may still take (at
/// least; a write that took longer on the first replica gives them twice as long).
/// Replicas whose node lost its lease are dropped sooner.
const LAGGARD_LIMIT: Duration = Duration::from_secs(60);
/// How often a slow replica's node is checked for a lost lease.
const GONE_POLL: Duration = Duration::from_millis(100);
/// What one replica may answer before it is dropped: answers are held back until the
/// outcome is settled, and a push's answer (report-status, progress) is small.
pub const MAX_ANSWER: usize = 1024 * 1024;

/// One replica's call to start.
pub struct LegSpec {
    pub node: String,
    pub channel: NodeChannel,
    /// The first frame, with this node's storage name.
    pub first: Bytes,
    pub metadata: MetadataMap,
    /// Where this replica's answer frames are copied as they arrive, if anywhere.
    pub tap: Option<Tap>,
}

/// A copy of one replica's answer frames as they arrive: `(leg, Some(frame))` for each,
/// then `(leg, None)` once the call is over (also when the router drops it).
pub struct Tap {
    pub leg: usize,
    pub frames: mpsc::UnboundedSender<(usize, Option<Bytes>)>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = self.frames.send((self.leg, None));
    }
}

/// How one replica's call ended.
#[derive(Debug)]
pub enum LegResult {
    /// The node answered: its frames and, if it ended with an error, that status.
    Answered {
        metadata: MetadataMap,
        frames: Vec<Bytes>,
        status: Option<Status>,
    },
    /// The node refused the call before any frame (its own status), or the router
    /// itself failed.
    Failed(Status),
    /// No answer from the node: it could not be reached, the connection to it broke,
    /// or the router dropped the call (the replica could not keep up, or did not
    /// answer long after another did, or its node lost its lease).
    Unreached(Status),
}

impl LegResult {
    pub fn succeeded(&self) -> bool {
        matches!(self, LegResult::Answered { status: None, .. })
    }

    /// Whether the node itself ended the call, with success or its own refusal.
    pub fn reached(&self) -> bool {
        !matches!(self, LegResult::Unreached(_))
    }

    /// The status a client would see: OK, the node's error, or why the call failed.
    pub fn status_text(&self) -> String {
        match self {
            LegResult::Answered { status: None, .. } => "ok".into(),
            LegResult::Answered {
                status: Some(s), ..
            }
            | LegResult::Failed(s)
            | LegResult::Unreached(s) => format!("{:?}: {}", s.code(), s.message()),
        }
    }

    /// Why the call ended, without the code: "ok" or the status message.
    pub fn status_message(&self) -> String {
        match self {
            LegResult::Answered { status: None, .. } => "ok".into(),
            LegResult::Answered {
                status: Some(s), ..
            }
            | LegResult::Failed(s)
            | LegResult::Unreached(s) => s.message().to_owned(),
        }
    }
}

/// A status the transport made up (the connection failed or broke) rather than one
/// the node sent: only the transport's carry the error they came from.
fn from_transport(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// A running replica call and the tee's side of it.
pub(crate) struct Leg {
    node: String,
    pub(crate) task: JoinHandle<LegResult>,
    /// Later client frames; `None` once the replica is dropped or has ended.
    frames: Option<mpsc::Sender<Bytes>>,
    /// Resolves (with an error) when the call's task ends, so a replica that stopped
    /// reading because it already answered does not hold up the tee for [`STALL`].
    ended: Option<oneshot::Receiver<()>>,
}

/// Runs `path` on every replica in `legs`, teeing `rest` (the client's frames after
/// the first, when the method streams them) to all of them, and returns how each call
/// ended, in the order given. `gone(node)` says a node lost its etcd lease (see
/// [`collect`]); `unreached(node, why)` hears at once of each call that ends without
/// the node's answer, so a write can settle without waiting for that replica.
pub async fn fan_out(
    path: http::uri::PathAndQuery,
    legs: Vec<LegSpec>,
    rest: Option<Streaming<Bytes>>,
    gone: &(dyn Fn(&str) -> bool + Sync),
    unreached: &(dyn Fn(&str, &str) + Sync),
) -> Vec<(String, LegResult)> {
    let started = Instant::now();
    let mut running: Vec<Leg> = legs
        .into_iter()
        .map(|spec| start_leg(path.clone(), spec, rest.is_some()))
        .collect();
    if let Some(mut rest) = rest {
        loop {
            let frame = match rest.message().await {
                Ok(Some(f)) => f,
                // A clean end of the client's stream ends every replica's stream.
                Ok(None) => break,
                Err(status) => {
                    // A broken client stream must not look complete to a replica: a
                    // clean end could let it apply a truncated push. Cancelling resets
                    // each call, and each node records itself failed.
                    tracing::info!(%status, "the client's request stream broke; cancelling every replica's call");
                    for leg in &running {
                        leg.task.abort();
                    }
                    break;
                }
            };
            let sends = running
                .iter_mut()
                .filter(|l| l.frames.is_some())
                .map(|leg| tee(leg, frame.clone()));
            futures_util::future::join_all(sends).await;
            if running.iter().all(|l| l.frames.is_none()) {
                // Every replica ended or was dropped: nobody needs the rest.
                break;
            }
        }
    }
    for leg in &mut running {
        // Dropping the sender ends that replica's request stream cleanly.
        leg.frames = None;
    }
    collect(running, started, gone, unreached).await
}

/// Ends every replica's request stream cleanly (dropping its sender).
pub(crate) fn end_streams(running: &mut [Leg]) {
    for leg in running {
        leg.frames = None;
    }
}

/// Waits for every replica's call to end, except that once one replica has answered
/// successfully, a replica whose node `gone` says has lost its lease is dropped (etcd
/// already counts it failed, so finalize does not need its answer), and any other gets
/// at most [`LAGGARD_LIMIT`] or twice as long as that first one took. A replica that is
/// alive but stuck (its process paused, its disk hung) must not hold the write.
pub(crate) async fn collect(
    mut running: Vec<Leg>,
    started: Instant,
    gone: &(dyn Fn(&str) -> bool + Sync),
    unreached: &(dyn Fn(&str, &str) + Sync),
) -> Vec<(String, LegResult)> {
    let nodes: Vec<String> = running.iter().map(|l| l.node.clone()).collect();
    let mut results: Vec<Option<LegResult>> = running.iter().map(|_| None).collect();
    let mut dropped = vec![false; running.len()];
    {
        let mut waiting: FuturesUnordered<_> = running
            .iter_mut()
            .enumerate()
            .map(|(i, leg)| async move { (i, (&mut leg.task).await) })
            .collect();
        let mut deadline: Option<Instant> = None;
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        loop {
            let settled = (0..results.len()).all(|i| results[i].is_some() || dropped[i]);
            if settled {
                break;
            }
            let checking = deadline.is_some();
            tokio::select! {
                next = waiting.next() => {
                    let Some((i, joined)) = next else { break };
                    let result = match joined {
                        Ok(r) => r,
                        Err(e) if e.is_cancelled() => LegResult::Unreached(Status::unavailable(
                            "the router dropped the call: the replica could not keep up, or the client's stream broke",
                        )),
                        Err(e) => LegResult::Failed(Status::internal(format!(
                            "the call failed in the router: {e}"
                        ))),
                    };
                    if let LegResult::Unreached(s) = &result {
                        unreached(&nodes[i], s.message());
                    }
                    if deadline.is_none() && result.succeeded() {
                        refvote_cluster::faults::reach(refvote_cluster::faults::AFTER_FIRST_ANSWER).await;
                        deadline = Some(Instant::now() + LAGGARD_LIMIT.max(2 * started.elapsed()));
                    }
                    results[i] = Some(result);
                }
                _ = tokio::time::sleep(GONE_POLL), if checking => {
                    for i in 0..results.len() {
                        if results[i].is_none() && !dropped[i] && gone(&nodes[i]) {
                            tracing::warn!(node = %nodes[i], "a replica's node lost its lease before answering; dropping its call");
                            dropped[i] = true;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if checking => break,
            }
        }
    }
    running
        .into_iter()
        .zip(results)
        .zip(dropped)
        .map(|((leg, result), dropped)| {
            let result = result.unwrap_or_else(|| {
                if !dropped {
                    tracing::warn!(node = %leg.node, "a replica did not answer long after another did; dropping its call");
                }
                // Aborting drops the call, which resets it.
                leg.task.abort();
                LegResult::Unreached(Status::unavailable(format!(
                    "node {} did not answer (its lease lapsed, or long after another replica answered); the router dropped the call",
                    leg.node
                )))
            });
            (leg.node, result)
        })
        .collect()
}

/// Sends one frame to one replica, dropping the replica if its buffer stays full for
/// [`STALL`]. Runs concurrently with the other replicas' sends.
pub(crate) async fn tee(leg: &mut Leg, frame: Bytes) {
    enum Sent {
        Taken,
        Gone,
        Stalled,
    }
    let sent = {
        let Leg { frames, ended, .. } = &mut *leg;
        let Some(sender) = frames.as_ref() else {
            return;
        };
        let ended = async {
            match ended.as_mut() {
                Some(rx) => {
                    let _ = rx.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = sender.send(frame) => if r.is_ok() { Sent::Taken } else { Sent::Gone },
            _ = tokio::time::sleep(STALL) => Sent::Stalled,
            _ = ended => Sent::Gone,
        }
    };
    match sent {
        Sent::Taken => {}
        Sent::Gone => {
            leg.frames = None;
            leg.ended = None;
        }
        Sent::Stalled => {
            tracing::warn!(node = %leg.node, ?STALL, "a replica did not take the client's frames; dropping it");
            // Aborting drops the call, which resets it; the node records itself failed.
            leg.task.abort();
            leg.frames = None;
            leg.ended = None;
        }
    }
}

fn start_leg(path: http::uri::PathAndQuery, spec: LegSpec, streaming: bool) -> Leg {
    start_leg_watched(path, spec, streaming, None)
}

/// [`start_leg`], telling `first_answer` the replica's first answer frame as soon as it
/// arrives (a two-phase call's proposal, [`crate::twophase`]); it is kept in the
/// result's frames as well.
pub(crate) fn start_leg_watched(
    path: http::uri::PathAndQuery,
    spec: LegSpec,
    streaming: bool,
    first_answer: Option<oneshot::Sender<Bytes>>,
) -> Leg {
    let (frames, rx) = if streaming {
        let (tx, rx) = mpsc::channel(LEG_BUFFER);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let (ended_tx, ended_rx) = oneshot::channel::<()>();
    let node = spec.node.clone();
    let task = tokio::spawn(async move {
        // Dropped when the task ends or is aborted: tells the tee this call is over.
        let _ended = ended_tx;
        run_leg(path, spec, rx, first_answer).await
    });
    Leg {
        node,
        task,
        frames,
        ended: Some(ended_rx),
    }
}

type Outgoing = std::pin::Pin<Box<dyn Stream<Item = Bytes> + Send>>;

async fn run_leg(
    path: http::uri::PathAndQuery,
    spec: LegSpec,
    rest: Option<mpsc::Receiver<Bytes>>,
    mut first_answer: Option<oneshot::Sender<Bytes>>,
) -> LegResult {
    let first = spec.first;
    let tap = spec.tap;
    let outgoing: Outgoing = match rest {
        Some(rx) => Box::pin(stream::once(async { first }).chain(ReceiverStream::new(rx))),
        None => Box::pin(stream::once(async { first })),
    };
    let mut client = tonic::client::Grpc::new(spec.channel)
        // The node already bounded what it sends; the router bounds what it keeps.
        .max_decoding_message_size(usize::MAX);
    if let Err(e) = client.ready().await {
        return LegResult::Unreached(Status::unavailable(format!(
            "cannot reach node {}: {e}",
            spec.node
        )));
    }
    let request = Request::from_parts(spec.metadata, Extensions::new(), outgoing);
    let response = match client.streaming(request, path, BytesCodec).await {
        Ok(r) => r,
        Err(status) if from_transport(&status) => {
            return LegResult::Unreached(Status::unavailable(format!(
                "cannot reach node {}: {}",
                spec.node,
                status.message()
            )));
        }
        Err(status) => return LegResult::Failed(status),
    };
    let (metadata, mut stream, _) = response.into_parts();
    let mut frames = Vec::new();
    let mut size = 0usize;
    loop {
        match stream.message().await {
            Ok(Some(f)) => {
                size += f.len();
                if size > MAX_ANSWER {
                    // Returning drops the response stream, which resets the call.
                    return LegResult::Failed(Status::resource_exhausted(format!(
                        "node {} answered more than {MAX_ANSWER} bytes, more than the router holds back for a write",
                        spec.node
                    )));
                }
                if let Some(tap) = &tap {
                    let _ = tap.frames.send((tap.leg, Some(f.clone())));
                }
                if let Some(tell) = first_answer.take() {
                    let _ = tell.send(f.clone());
                }
                frames.push(f);
            }
            Ok(None) => {
                return LegResult::Answered {
                    metadata,
                    frames,
                    status: None,
                };
            }
            // The connection broke before the node ended the call.
            Err(status) if from_transport(&status) => {
                return LegResult::Unreached(Status::unavailable(format!(
                    "the call to node {} broke: {}",
                    spec.node,
                    status.message()
                )));
            }
            Err(status) => {
                return LegResult::Answered {
                    metadata,
                    frames,
                    status: Some(status),
                };
            }
        }
    }
}
