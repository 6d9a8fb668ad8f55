//! refvote-router: the thin gRPC front GitLab clients talk to instead of one Gitaly
//! server. So far this crate holds the two pieces every forwarded call starts with:
//! the method [`registry`] built from the `op_type` annotations in `proto/`, and the
//! first-[`frame`] parsing that finds and rewrites a request's target repository
//! without decoding anything else.
//!
//! It does not yet forward calls, run transactions or serve HTTP; those come with the
//! router issue. It keeps no state of its own: everything it will need lives in etcd.
#![forbid(unsafe_code)]

pub mod frame;
pub mod registry;
mod wire;
