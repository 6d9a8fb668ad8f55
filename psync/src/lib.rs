//! Partition sync: carries chosen git repositories across an air gap through
//! S3-compatible object storage (or a local directory), encrypted, incremental and
//! resumable, into another refvote cluster or any git remote.
//!
//! A **producer** ([`produce`]) mirrors each repository from the source (a refvote
//! router's smart HTTP, or any git URL), and uploads to the bucket the next
//! *sequence*: a git bundle — full the first time, afterwards only what is new since
//! the last sequence's tips — sealed with a streaming AEAD ([`crypto`]), then a sealed
//! manifest listing the complete ref set, created only if absent ([`naming`] says
//! where each lives and why the manifest is the commit point). A **consumer**
//! ([`consume`]) applies the sequences in order to a [`consume::Target`]: here a git
//! remote ([`git_target`]); the refvote cluster target lives in `votingctl`, which
//! also resolves repository prefixes against a source cluster's registry.
//!
//! What it does not do: run a daemon (a timer starts each run), talk to etcd or
//! gRPC (the refvote side plugs in through [`consume::Target`] and [`cli::Cluster`];
//! of refvote's shared model it uses only the pure checksum and the fault points),
//! garbage-collect old sequences from the bucket, or carry anything but refs and
//! objects (no issues; wikis as separate repositories are just more repositories).
#![forbid(unsafe_code)]

pub mod bundle;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod consume;
pub mod context;
pub mod crypto;
pub mod error;
pub mod fault;
pub mod git;
pub mod git_target;
pub mod keys;
pub mod listing;
pub mod manifest;
pub mod metrics;
pub mod mirror;
pub mod naming;
pub mod plan;
pub mod produce;
pub mod progress;
pub mod refs;
pub mod report;
pub mod state;
pub mod store;
pub mod transfer;
