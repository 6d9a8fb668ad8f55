//! refvote-sidechannel (header written below)
#![forbid(unsafe_code)]

pub mod frame;
pub mod mux;
