//! refvote's shared model: the etcd key schema ([`keys`]), the stored records
//! ([`records`]), the quorum rules ([`quorum`]) and the transaction protocol built on
//! them ([`tx`], [`repository`], [`reaper`], [`session`]), the repair jobs' claims and
//! fenced completion ([`repair`]), the administrative write lock ([`lock`]) and the
//! replica-set changes made under it ([`replicas`]). The router, votingd and
//! votingctl all go through this crate, so they can never disagree on a key or a rule.
//! It also holds what the two daemons share around that: their `[etcd]` config section
//! ([`settings`]), tracing set-up ([`logging`]) and the Prometheus text format with
//! its `/metrics` server ([`metrics`]).
//!
//! It does not run git, serve RPCs or pick replicas for reads; apart from answering
//! metrics scrapes it only reads and writes etcd (over TLS when `[etcd] ca_path` is
//! set), always with the compares a step relies on.
#![forbid(unsafe_code)]

pub mod decide;
pub mod error;
pub mod faults;
pub mod keys;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod quorum;
pub mod reaper;
pub mod records;
pub mod repair;
pub mod replicas;
pub mod repo;
pub mod repository;
pub mod session;
pub mod settings;
pub mod store;
pub mod tx;

pub use error::{Error, Result};
pub use repo::RepoId;
pub use store::{EtcdTls, Store, StoreConfig};
