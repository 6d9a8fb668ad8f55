//! refvote-telemetry: how refvote's daemons (votingd, the router) report on
//! themselves. [`logging`] sets up tracing (text or JSON on stderr, `RUST_LOG`);
//! [`metrics`] has counters, gauges, histograms and bounded label families on atomics,
//! the Prometheus text format, and the small HTTP server behind `/metrics`.
//!
//! It defines no series of its own: each component keeps its metrics in its own crate
//! (`votingd_…` in votingd, `refvote_router_…` in the router, the etcd error counter
//! in `refvote-cluster`'s store) and renders them on a scrape. It knows nothing of
//! etcd, git or votes.
#![forbid(unsafe_code)]

pub mod logging;
pub mod metrics;
