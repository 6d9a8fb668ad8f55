//! votingd: the daemon on every storage host. It serves the `reference-transaction`
//! hook over a Unix socket ([`vote`]), records and decides votes in etcd through the
//! shared model crate, holds the node's etcd lease, reaps abandoned transactions, and
//! reports its health ([`status`]). `votingctl` ships from this crate too.
//!
//! It does not (yet) serve Gitaly's gRPC protocol or run git itself; the node service
//! comes in its own issue. It never decides a vote from its own clock: a vote it cannot
//! settle in time aborts locally and counts as this replica failing.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod daemon;
pub mod hooks;
pub mod logging;
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
