//! votingd: the daemon on every storage host. It serves Gitaly's gRPC protocol and runs
//! real git on the node's storages ([`node`]), serves the `reference-transaction` hook
//! over a Unix socket ([`vote`]), records and decides votes in etcd through the shared
//! model crate, holds the node's etcd lease, reaps abandoned transactions, and reports
//! its health ([`status`]) and Prometheus [`metrics`]. `votingctl` ships from this
//! crate too, with the local cluster it can run ([`local_cluster`]) and its operator
//! commands ([`ctl`]). [`pktline`] puts a
//! push's commands in one canonical order, so every replica's receive-pack applies them
//! alike.
//!
//! It never decides a vote from its own clock: a vote it cannot settle in time aborts
//! locally and counts as this replica failing. It does not pick replicas or finalize
//! transactions; the router does.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod hooks;
pub mod local_cluster;
pub mod metrics;
pub mod node;
pub mod pktline;
pub mod status;
pub mod vote;

pub use config::Config;
pub use daemon::Daemon;

/// The environment votingd gives git so its hook votes in transaction `tx` as `voter`.
pub fn transaction_env(tx: &str, voter: &str, socket: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("REFVOTE_TX".into(), tx.into()),
        ("REFVOTE_VOTER".into(), voter.into()),
        ("REFVOTE_SOCKET".into(), socket.display().to_string()),
    ]
}
