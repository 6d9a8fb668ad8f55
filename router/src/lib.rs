//! refvote-router: the thin gRPC front GitLab clients talk to instead of one Gitaly
//! server. Every call goes through one catch-all handler ([`forward`]) with a byte
//! [`codec`]: the method [`registry`] (built from the `op_type` annotations in
//! `proto/`) classifies it, the first [`frame`] names the target repository, etcd says
//! which replicas may serve it, and the frames pass through unchanged apart from the
//! storage name (and a write's time, below).
//!
//! Accessors, mutators (voted transactions) and maintenance fan-out are routed; an
//! interactive push (SSHReceivePack) gets the part of one voter's answer that says
//! nothing about the outcome before it ([`interactive`]). A
//! write that creates commit or tag objects gets its time and the user's zone offset
//! settled once by the router (`stamp`) before the fan-out; what the client hears
//! once a write is finalized is decided in `outcome`. A read of a repository etcd
//! does not know is answered as Gitaly answers one that does not exist
//! (`RepositoryExists`: `exists: false`; everything else NOT_FOUND). Reads
//! take their replicas from [`reads`]: a watched in-memory view of etcd plus one shared
//! linearizable confirm round per batch of reads in flight. Writes are voted;
//! repository creation places and registers the repository; a write by a GitLab user
//! is gated by GitLab's checks on one designated voter, gets post-receive's output in
//! its answer, and reads of a push's quarantine go to that voter ([`gitlab`]). With
//! `http_listen_addr`,
//! plain git clients clone, fetch and push over smart HTTP ([`http`]), each request
//! turned into the Gitaly call and passed through the same handler. Every router also
//! runs the [`repair`] worker (outdated replicas copied from an up-to-date one), the
//! reaper (transactions whose router died) and the background [`verifier`] (replicas
//! changed on disk behind the cluster's back found and outdated), and serves refvote's [`admin`] service
//! (replicas of a repository, their synchronization, removal); the calls these make
//! to nodes (copy, checksum, removal) live in one module, `nodes`. Every call passes
//! Gitaly's token check first when `[auth]` is set (refvote-auth), and every call to a
//! node carries the router's own token; listeners and node channels use TLS when
//! `[tls]` says so. The port takes plain gRPC and Gitaly's backchannel connections
//! alike; calls that carry a sidechannel (gitlab-shell's and workhorse's fetches) have
//! it proxied to the node, Praefect's way (`sidechannel`). ServerService and
//! PraefectInfoService are answered by the router itself from etcd and the nodes
//! ([`intercepted`]), storage-scoped calls go to any live node. gRPC health
//! (`grpc.health.v1`) is answered on the same port and `/-/readiness` on the HTTP
//! front, from one verdict ([`health`]: lease held, etcd reachable, not draining);
//! SIGTERM drains ([`server::RouterServer::drain`]). Costly calls (clones, pushes) are
//! shed over `[limits]` RESOURCE_EXHAUSTED / 429 ([`limit`]). Prometheus [`metrics`] are
//! served on their own port. With `admin_listen_addr`, the [`ops_web`] serves the
//! cluster's pages, their JSON and the admin jobs as buttons (login sessions are its
//! only state in memory). The router keeps no other state of its own: everything
//! lives in etcd.
#![forbid(unsafe_code)]

pub mod admin;
pub mod codec;
pub mod config;
mod fanout;
pub mod forward;
pub mod frame;
pub mod gitlab;
pub mod health;
pub mod http;
pub mod interactive;
pub mod intercepted;
pub mod limit;
pub mod metrics;
mod nodes;
pub mod ops_web;
mod outcome;
mod pool;
pub mod reads;
pub mod registry;
pub mod repair;
pub mod respond;
pub mod server;
pub mod sidechannel;
mod stamp;
mod sweep;
mod twophase;
pub mod verifier;
mod wire;

pub use config::Config;
pub use server::RouterServer;
