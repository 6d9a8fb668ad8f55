//! votingd: the daemon on every storage host. It serves the `reference-transaction`
//! hook over a Unix socket ([`vote`]), records and decides votes in etcd through the
//! shared model crate, holds the node's etcd lease, reaps abandoned transactions,
//! installs the hook ([`hooks`]), and reports its health ([`status`], read back with
//! [`client`]) and Prometheus [`metrics`]. [`daemon`] builds it all from the config
//! ([`config`]) and wires in the node's Gitaly-compatible gRPC service
//! (`refvote-node`), which runs real git on the node's storages.
//!
//! It never decides a vote from its own clock: a vote it cannot settle in time aborts
//! locally and counts as this replica failing. It does not pick replicas or finalize
//! transactions (the router does), it does not run git itself (the node service
//! does), and it holds none of the operator's commands (`votingctl`).
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod daemon;
pub mod hooks;
pub mod metrics;
pub mod status;
pub mod vote;

pub use config::Config;
pub use daemon::Daemon;
