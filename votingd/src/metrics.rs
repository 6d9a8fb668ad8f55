//! votingd's Prometheus metrics (`votingd_…`) on `prometheus_listen_addr`: votes by
//! outcome, vote latency, transactions in flight, the lease, etcd errors. Most values
//! are the vote service's own counters (the latency histogram too), read at scrape
//! time.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use refvote_telemetry::metrics::{self, Text};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::vote::VoteService;

/// Serves `/metrics` on `listener` until the task is aborted.
pub fn serve(
    listener: TcpListener,
    service: Arc<VoteService>,
    lease: watch::Receiver<Option<i64>>,
) -> JoinHandle<()> {
    let render: metrics::Render = Arc::new(move || {
        let text = render(&service, lease.borrow().is_some());
        Box::pin(async move { text })
    });
    metrics::serve(listener, render)
}

fn render(service: &VoteService, lease_held: bool) -> String {
    let c = &service.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut t = Text::new();
    t.counter_by(
        "votingd_votes_total",
        "Votes at `prepared` by outcome: commit (this replica's update won), abort (no \
         value reached the threshold), lost (another value won; this replica is marked \
         outdated), timeout (no decision in vote_timeout_ms), error (etcd failed; aborted).",
        "outcome",
        &[
            ("commit", get(&c.commits)),
            ("abort", get(&c.aborts)),
            ("lost", get(&c.lost)),
            ("timeout", get(&c.timeouts)),
            ("error", get(&c.errors)),
        ],
    );
    t.histogram(
        "votingd_vote_duration_seconds",
        "Time from a vote's arrival to its decision.",
        &c.vote_seconds,
    );
    t.counter(
        "votingd_confirmations_total",
        "Committed updates confirmed in etcd.",
        get(&c.confirms),
    );
    t.counter(
        "votingd_hook_requests_rejected_total",
        "Hook calls refused as malformed or out of place.",
        get(&c.rejected_requests),
    );
    t.gauge(
        "votingd_votes_waiting",
        "Votes waiting for a decision now.",
        get(&c.votes_waiting) as i64,
    );
    t.gauge(
        "votingd_transactions_in_flight",
        "Transactions this node is voting in or still has to confirm.",
        service.open_transactions().len() as i64,
    );
    t.gauge(
        "votingd_lease_held",
        "1 while the node holds its etcd lease (it may vote and serve), else 0.",
        i64::from(lease_held),
    );
    refvote_cluster::store::render_etcd_errors(&mut t, "votingd");
    t.finish()
}
