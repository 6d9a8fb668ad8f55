//! refvote-router: the thin gRPC front GitLab clients talk to instead of one Gitaly
//! server. Every call goes through one catch-all handler ([`forward`]) with a byte
//! [`codec`]: the method [`registry`] (built from the `op_type` annotations in
//! `proto/`) classifies it, the first [`frame`] names the target repository, etcd says
//! which replicas may serve it, and the frames pass through unchanged apart from the
//! storage name.
//!
//! Accessors, mutators (voted transactions) and maintenance fan-out are routed. Reads
//! take their replicas from [`reads`]: a watched in-memory view of etcd plus one shared
//! linearizable confirm round per batch of reads in flight.
//! Repository creation, repair, the admin service and auth are not yet: the router's
//! own services get UNIMPLEMENTED. The router keeps no state of its
//! own: everything lives in etcd.
#![forbid(unsafe_code)]

pub mod codec;
pub mod config;
mod fanout;
pub mod forward;
pub mod frame;
mod pool;
pub mod reads;
pub mod registry;
pub mod respond;
pub mod server;
mod wire;

pub use config::Config;
pub use server::RouterServer;
