//! refvote's cluster harness: real etcd ([`etcd`]), real votingd processes ([`node`]),
//! real routers ([`router`]), real git ([`git`]), every process started on loopback in
//! its own temp dir and killed by pid when the test ends ([`proc`]). Their command
//! lines, config files (the real config types, serialized) and health checks are the
//! launcher's (`refvote_launcher`), as for `votingctl cluster`. [`cluster`] puts them
//! together in the common shapes ([`cluster::Fixture`]: N nodes, routers, a seeded
//! repository) for the integration tests and benchmarks. [`smarthttp`] lets a real git
//! client push and clone through nodes' gRPC services with no router; [`gitlab_client`]
//! dials and fetches as gitlab-shell and workhorse do (backchannel, sidechannel), and
//! [`workhorse`] puts a real git client's HTTP fetches through it. [`local`] drives a
//! whole cluster started by `votingctl cluster up`, as a person would. [`tls`] issues
//! test certificates. [`metrics`] scrapes a process's Prometheus endpoint. [`nginx`]
//! runs a real nginx with the shipped config in front of routers.
//! [`seaweed`] runs a real S3-compatible server (SeaweedFS) for partition sync.
//! [`faultnet`] cuts links between processes, [`hold`] stops a process at an exact
//! step, [`chaos`] is the fault suite. [`gitlab`] stands in for GitLab's internal API
//! (a real HTTP server). [`webdriver`] drives Debian's Chromium through chromedriver
//! (the ops web's browser test).
//!
//! Nothing here mocks etcd or git; there is no in-process shortcut to a node.

pub mod chaos;
pub mod cluster;
pub mod etcd;
pub mod faultnet;
pub mod git;
pub mod gitlab;
pub mod gitlab_client;
pub mod grpc;
pub mod hold;
pub mod local;
pub mod metrics;
pub mod nginx;
pub mod node;
pub mod proc;
pub mod reads;
pub mod router;
pub mod seaweed;
pub mod smarthttp;
pub mod tls;
pub mod webdriver;
pub mod workhorse;
