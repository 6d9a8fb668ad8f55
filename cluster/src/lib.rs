//! refvote's shared model: the etcd key schema ([`keys`]), the stored records
//! ([`records`]), the quorum rules ([`quorum`]) and the transaction protocol built on
//! them ([`tx`], [`repository`], [`reaper`], [`session`]), the repair jobs' claims and
//! fenced completion ([`repair`]), the administrative write lock ([`lock`]) and the
//! replica-set changes made under it ([`replicas`]), and Gitaly's repository checksum
//! ([`checksum`]); the summaries operators read ([`summary`]). The router, votingd and
//! votingctl all go through this crate, so they can never disagree on a key or a rule.
//! It also holds the `[etcd]` config section both daemons read ([`settings`]) and the
//! etcd client wrapper ([`store`]), which counts failed etcd requests.
//!
//! It does not run git, serve RPCs, pick replicas for reads, set up logging or serve
//! metrics (`refvote-telemetry` does); it only reads and writes etcd (over TLS when
//! `[etcd] ca_path` is set), always with the compares a step relies on.
#![forbid(unsafe_code)]

pub mod checksum;
pub mod decide;
pub mod error;
pub mod faults;
pub mod keys;
pub mod lock;
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
pub mod summary;
pub mod tx;
pub mod verifier;

pub use error::{Error, Result};
pub use repo::RepoId;
pub use store::{EtcdTls, Store, StoreConfig};
