//! refvote-sidechannel's integration tests: a tonic service behind the multiplexed
//! listener on a loopback port, called by plain HTTP/2 clients, by this crate's
//! backchannel client, by a hand-rolled client that checks the bytes Gitaly's
//! sources define, and by a Go program built on hashicorp-yamux and grpc-go (the
//! libraries gitlab-shell and workhorse use).

mod failures;
mod interop;
mod proxy;
mod roundtrip;
mod support;
mod wire;
