//! refvote's cluster harness: real etcd ([`etcd`]), real votingd processes ([`node`]),
//! real git ([`git`]), every process started on loopback in its own temp dir and killed
//! by pid when the test ends ([`proc`]). [`cluster`] puts them together for the voting
//! core's integration tests and benchmarks. [`smarthttp`] lets a real git client push
//! and clone through a node's gRPC service. [`local`] drives a whole cluster started
//! by `votingctl cluster up`, as a person would. [`tls`] issues test certificates.
//! [`metrics`] scrapes a process's Prometheus endpoint. [`faultnet`] cuts links between
//! processes, [`hold`] stops a process at an exact step, [`chaos`] is the fault suite.
//!
//! Nothing here mocks etcd or git; there is no in-process shortcut to a node.

pub mod chaos;
pub mod cluster;
pub mod etcd;
pub mod faultnet;
pub mod git;
pub mod grpc;
pub mod hold;
pub mod local;
pub mod metrics;
pub mod node;
pub mod proc;
pub mod reads;
pub mod router;
pub mod smarthttp;
pub mod tls;
