//! refvote-router: the thin gRPC front GitLab clients talk to instead of one Gitaly
//! server. Every call goes through one catch-all handler ([`forward`]) with a byte
//! [`codec`]: the method [`registry`] (built from the `op_type` annotations in
//! `proto/`) classifies it, the first [`frame`] names the target repository, etcd says
//! which replicas may serve it, and the frames pass through unchanged apart from the
//! storage name.
//!
//! Accessors, mutators (voted transactions) and maintenance fan-out are routed. Reads
//! take their replicas from [`reads`]: a watched in-memory view of etcd plus one shared
//! linearizable confirm round per batch of reads in flight. Writes are voted;
//! repository creation places and registers the repository. With `http_listen_addr`,
//! plain git clients clone, fetch and push over smart HTTP ([`http`]), each request
//! turned into the Gitaly call and passed through the same handler. Every router also
//! runs the [`repair`] worker (outdated replicas copied from an up-to-date one) and the
//! reaper (transactions whose router died), and serves refvote's [`admin`] service
//! (replicas of a repository, their synchronization, removal); the calls these make
//! to nodes (copy, checksum, removal) live in one module, `nodes`. Every call passes
//! Gitaly's token check first when `[auth]` is set (refvote-auth), and every call to a
//! node carries the router's own token; listeners and node channels use TLS when
//! `[tls]` says so. gRPC health (`grpc.health.v1`) is answered on the same port, and
//! Prometheus [`metrics`] on their own. The router keeps no state of its
//! own: everything lives in etcd.
#![forbid(unsafe_code)]

pub mod admin;
pub mod codec;
pub mod config;
mod fanout;
pub mod forward;
pub mod frame;
pub mod http;
pub mod metrics;
mod nodes;
mod pool;
pub mod reads;
pub mod registry;
pub mod repair;
pub mod respond;
pub mod server;
mod wire;

pub use config::Config;
pub use server::RouterServer;
