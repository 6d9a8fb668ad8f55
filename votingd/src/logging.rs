//! Tracing set-up, shared with the router: see [`refvote_cluster::logging`].

pub use refvote_cluster::logging::init;
