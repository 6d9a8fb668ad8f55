//! refvote-router: the thin gRPC front GitLab clients talk to instead of one Gitaly
//! server. Every call goes through one catch-all handler ([`forward`]) with a byte
//! [`codec`]: the method [`registry`] (built from the `op_type` annotations in
//! `proto/`) classifies it, the first [`frame`] names the target repository, etcd says
//! which replicas may serve it, and the frames pass through unchanged apart from the
//! storage name.
//!
//! Accessors, mutators (voted transactions) and maintenance fan-out are routed.
//! Repository creation, repair, the admin service and auth are not yet: the router's
//! own services get UNIMPLEMENTED. gRPC health (`grpc.health.v1`) is answered on
//! the same port, and Prometheus [`metrics`] on their own. The router keeps no state of its
//! own: everything lives in etcd.
#![forbid(unsafe_code)]

pub mod codec;
pub mod config;
mod fanout;
pub mod forward;
pub mod frame;
pub mod metrics;
mod pool;
pub mod registry;
pub mod respond;
pub mod server;
mod wire;

pub use config::Config;
pub use server::RouterServer;
