//! The router's Prometheus metrics (`refvote_router_…`) on `prometheus_listen_addr`:
//! calls by method and gRPC code with their latency, transactions in flight and their
//! outcomes, sidechannel calls in flight, connections by kind (plain or backchannel), replicas marked outdated, repair jobs waiting in etcd, the background verifier's
//! progress and mismatches, the lease, etcd errors.
//!
//! Counting is one line at each place: [`track`] wraps every response in
//! `server.rs`; `forward.rs` holds [`TRANSACTIONS_IN_FLIGHT`] and calls [`finalized`];
//! `sidechannel.rs` holds [`SIDECHANNELS_IN_FLIGHT`]; the listener counts [`CONNECTIONS`].

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use etcd_client::GetOptions;
use http_body::{Body, Frame, SizeHint};
use refvote_cluster::Store;
use refvote_cluster::records::TxOutcome;
use refvote_sidechannel::ListenStats;
use refvote_telemetry::metrics::{self, Counter, Family, Gauge, Histogram, LATENCY_BUCKETS, Text};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::codegen::http;

/// Distinct method names kept; more (made-up paths) are counted as `other`.
const MAX_METHOD_SERIES: usize = 512;

pub static CALLS: LazyLock<Family<Counter>> =
    LazyLock::new(|| Family::new(&["method", "code"], MAX_METHOD_SERIES * 2));
pub static CALL_SECONDS: LazyLock<Histogram> = LazyLock::new(|| Histogram::new(LATENCY_BUCKETS));
/// Voted writes between their transaction's creation and the client's answer.
pub static TRANSACTIONS_IN_FLIGHT: LazyLock<Gauge> = LazyLock::new(Gauge::default);
/// Sidechannel calls between their registration on a node's connection and their end.
pub static SIDECHANNELS_IN_FLIGHT: LazyLock<Gauge> = LazyLock::new(Gauge::default);
/// Connections the gRPC listener accepted, by kind (`server.rs` hands it to the
/// listener).
pub static CONNECTIONS: LazyLock<Arc<ListenStats>> = LazyLock::new(Arc::default);
pub static TRANSACTIONS: LazyLock<Family<Counter>> = LazyLock::new(|| Family::new(&["outcome"], 8));
pub static MARKED_OUTDATED: LazyLock<Counter> = LazyLock::new(Counter::default);

const OUTCOMES: [&str; 4] = [
    "acknowledged",
    "not_written",
    "outcome_unknown",
    "finalize_failed",
];

/// Counts a finalized transaction: acknowledged (threshold promoted), not written
/// (committed nowhere), outcome unknown (committed somewhere, too few promoted), or
/// finalize failed (etcd could not say).
pub fn finalized<E>(outcome: &Result<TxOutcome, E>) {
    let label = match outcome {
        Ok(o) if o.acknowledged => "acknowledged",
        Ok(o) if !o.committed => "not_written",
        Ok(_) => "outcome_unknown",
        Err(_) => "finalize_failed",
    };
    TRANSACTIONS.with(&[label]).inc();
    if let Ok(o) = outcome {
        MARKED_OUTDATED.add(o.outdated.len() as u64);
    }
}

/// Counts the call once its response ends: the gRPC code comes from the trailers (or
/// the headers of a trailers-only answer); a response dropped before its end, such as
/// a client that went away, counts as `Cancelled`.
pub fn track(
    method: &str,
    started: Instant,
    resp: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let (parts, body) = resp.into_parts();
    if let Some(code) = grpc_code(&parts.headers) {
        count(method, code, started);
        return http::Response::from_parts(parts, body);
    }
    let body = Tracked {
        inner: body,
        method: Some(method.to_owned()),
        started,
    };
    http::Response::from_parts(parts, tonic::body::Body::new(body))
}

fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(v))
}

fn count(method: &str, code: tonic::Code, started: Instant) {
    // The names other gRPC servers' metrics use, so dashboards carry over.
    let name = match code {
        tonic::Code::Ok => "OK".to_owned(),
        tonic::Code::Cancelled => "Canceled".to_owned(),
        c => format!("{c:?}"),
    };
    CALLS.with(&[method, &name]).inc();
    CALL_SECONDS.observe_duration(started.elapsed());
}

struct Tracked {
    inner: tonic::body::Body,
    /// Taken when counted.
    method: Option<String>,
    started: Instant,
}

impl Tracked {
    fn finish(&mut self, code: tonic::Code) {
        if let Some(m) = self.method.take() {
            count(&m, code, self.started);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(tonic::Code::Internal),
            Poll::Ready(None) => self.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// Serves `/metrics` on `listener` until the task is aborted. The repair-job count is
/// read from etcd at each scrape (a count-only range, cheap at any size).
pub fn serve(
    listener: TcpListener,
    store: Store,
    lease: watch::Receiver<Option<i64>>,
) -> JoinHandle<()> {
    let render: metrics::Render = Arc::new(move || {
        let store = store.clone();
        let lease_held = lease.borrow().is_some();
        Box::pin(async move { render(&store, lease_held).await })
    });
    metrics::serve(listener, render)
}

async fn render(store: &Store, lease_held: bool) -> String {
    let prefix = format!("{}repair/", store.keys().jobs());
    let jobs = store
        .request(|mut c| {
            let prefix = prefix.clone();
            async move {
                c.get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
            }
        })
        .await
        .map(|r| r.count());
    let mut t = Text::new();
    t.counter_family(
        "refvote_router_grpc_calls_total",
        "Calls answered, by full method name and gRPC code (Canceled: the client left first).",
        &CALLS,
    );
    t.histogram(
        "refvote_router_grpc_call_duration_seconds",
        "Time from a call's arrival to the end of its answer.",
        &CALL_SECONDS,
    );
    t.gauge(
        "refvote_router_transactions_in_flight",
        "Voted writes between their transaction's creation and the answer.",
        TRANSACTIONS_IN_FLIGHT.get(),
    );
    t.gauge(
        "refvote_router_sidechannels_in_flight",
        "Sidechannel calls (gitlab-shell's and workhorse's fetches) being proxied to a node.",
        SIDECHANNELS_IN_FLIGHT.get(),
    );
    let (plain, backchannel, dropped) = CONNECTIONS.get();
    t.counter_by(
        "refvote_router_grpc_connections_total",
        "Connections accepted on the gRPC port, by kind: plain (HTTP/2 gRPC: Rails, \
         votingctl) or backchannel (Gitaly's yamux handshake: gitlab-shell, workhorse).",
        "kind",
        &[("plain", plain), ("backchannel", backchannel)],
    );
    t.counter(
        "refvote_router_grpc_connections_dropped_total",
        "Connections dropped before their handshake finished (TLS failed, closed early, \
         or silent past the deadline).",
        dropped,
    );
    for o in OUTCOMES {
        TRANSACTIONS.with(&[o]);
    }
    t.counter_family(
        "refvote_router_transactions_total",
        "Finalized transactions by outcome: acknowledged, not_written (committed nowhere), \
         outcome_unknown (committed on fewer than threshold replicas; repair rolls it \
         forward), finalize_failed.",
        &TRANSACTIONS,
    );
    t.counter(
        "refvote_router_replicas_marked_outdated_total",
        "Replicas this router's finalize marked outdated (each gets a repair job).",
        MARKED_OUTDATED.get(),
    );
    match jobs {
        Ok(n) => t.gauge(
            "refvote_router_repair_jobs",
            "Repair jobs in etcd, cluster-wide: outdated replicas waiting for or under repair.",
            n,
        ),
        Err(e) => tracing::debug!(error = %e, "metrics: cannot count repair jobs"),
    }
    for class in ["upload_pack", "receive_pack"] {
        for reason in ["queue_full", "queue_timeout"] {
            crate::limit::LIMITED.with(&[class, reason]);
        }
    }
    t.counter_family(
        "refvote_router_limited_total",
        "Costly calls shed by [limits] (RESOURCE_EXHAUSTED / HTTP 429), by class \
         (upload_pack, receive_pack) and reason (queue_full, queue_timeout).",
        &crate::limit::LIMITED,
    );
    t.gauge(
        "refvote_router_limit_in_progress",
        "Costly calls (upload-pack, receive-pack) holding a slot of a [limits] limit.",
        crate::limit::IN_PROGRESS.get(),
    );
    t.gauge(
        "refvote_router_limit_queued",
        "Costly calls waiting in a [limits] queue for a slot.",
        crate::limit::QUEUED.get(),
    );
    t.counter(
        "refvote_router_verifier_replicas_checked_total",
        "Replica checksums the background verifier compared with their records.",
        crate::verifier::CHECKED.get(),
    );
    t.counter(
        "refvote_router_verifier_mismatches_total",
        "Replicas the background verifier found changed behind the cluster's back \
         (marked outdated, repair queued).",
        crate::verifier::MISMATCHES.get(),
    );
    t.counter(
        "refvote_router_verifier_busy_skipped_total",
        "Repositories the verifier skipped until its next pass: writes kept them busy.",
        crate::verifier::BUSY.get(),
    );
    t.gauge(
        "refvote_router_verifier_pass_done",
        "Repositories of this router's share looked at in the verifier's current pass.",
        crate::verifier::PASS_DONE.get(),
    );
    t.gauge(
        "refvote_router_verifier_pass_total",
        "Repositories in this router's share when the verifier's current pass began.",
        crate::verifier::PASS_TOTAL.get(),
    );
    t.gauge(
        "refvote_router_verifier_last_full_pass_timestamp_seconds",
        "When the verifier last finished a full pass (unix seconds; 0: not yet).",
        crate::verifier::LAST_FULL_PASS.get(),
    );
    t.gauge(
        "refvote_router_lease_held",
        "1 while the router holds its etcd lease (it may start writes), else 0.",
        i64::from(lease_held),
    );
    refvote_cluster::store::render_etcd_errors(&mut t, "refvote_router");
    t.finish()
}
