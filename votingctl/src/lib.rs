//! votingctl: the operator's tool. The binary (`src/main.rs`) parses the command line;
//! this library holds the commands: what they read from etcd (through the cluster
//! crate), ask routers (the admin service) and nodes (`CalculateChecksum`), and how
//! they print it: a human table by default, JSON with `--json`. [`connect`] finds the
//! cluster and opens the connections; [`repos`] lists repositories and data loss;
//! [`replicas`] calls a router's admin service; [`data`] verifies checksums, accepts
//! data loss and tracks repositories found on disk; [`view`] is the cluster section of
//! `votingctl status`; [`partition_sync`] is `votingctl partition-sync` (the crate
//! `refvote-psync`, with the source cluster's registry and a refvote target).
//! `votingctl status` reads the node's own health over its vote
//! socket (`votingd::client`); `votingctl cluster` runs a local cluster through
//! `refvote-launcher`.
//!
//! Every command prints errors that say what to do and exits non-zero on them. The
//! commands that change records (`verify`, `accept-dataloss`, `track`) write one etcd
//! txn with the compares the change relies on, so a concurrent write makes them fail
//! (and say so) rather than overwrite it. They never copy data themselves: outdated
//! replicas get repair jobs that the routers' repair workers run. It is no daemon:
//! nothing it starts stays behind, except the processes of `cluster up`.
#![forbid(unsafe_code)]

pub mod connect;
pub mod data;
pub mod partition_sync;
pub mod replicas;
pub mod repos;
pub mod view;

pub use connect::{Ctl, Target, etcd_error, parse_repo, table};
