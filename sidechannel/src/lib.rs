//! refvote-sidechannel: Gitaly's backchannel and sidechannel, both ends, for the
//! node's and the router's gRPC ports and for the router's calls to nodes.
//!
//! GitLab's gitlab-shell and workhorse open every Gitaly connection with the
//! *backchannel* handshake: after TLS (if any) the client writes the 11 bytes
//! `backchannel`, then runs hashicorp-yamux as the yamux client and speaks gRPC on
//! its first stream. Rails and other clients speak plain HTTP/2 gRPC on the same
//! port. A fetch (`SSHUploadPackWithSidechannel`, `PostUploadPackWithSidechannel`)
//! then moves its data over a *sidechannel*: the call's metadata carries
//! `gitaly-sidechannel-id: N`, the server opens a yamux stream back to the client,
//! writes `sidechannel` and N (8 bytes big-endian), waits for `ok`, and the two
//! exchange the fetch's bytes there instead of in protobuf messages.
//!
//! - [`listen`]: the accept loop. Sniffs 11 bytes (after TLS) under a deadline;
//!   backchannel connections become yamux sessions (refvote is the yamux server,
//!   Gitaly's settings), others go on unchanged. Yields connections for tonic's
//!   `serve_with_incoming(_shutdown)`, each with a [`listen::ConnInfo`] in the
//!   request extensions (peer address, the session).
//! - [`server`]: a handler opens the call's sidechannel ([`server::open`]) and gets a
//!   [`server::ServerSidechannel`]: reads are the client's data (chunked on the wire,
//!   [`frame`]), writes go back raw, shutdown ends the answer.
//! - [`client`]: dials like gitlab-shell does ([`client::dial`]): a tonic `Channel`
//!   over the first yamux stream that never re-dials, and a registry of sidechannel
//!   waiters matched by id to the streams the server opens.
//! - [`proxy`]: the router between a caller and a node (Praefect's way).
//! - [`status`]: Gitaly's status codes for every failure, per RPC.
//! - [`tls`]: rustls acceptor and connector from the `[tls]` section.
//! - [`mux`]: yamux sessions (tokio-yamux) and the stream type under all of it.
//!
//! Design notes. The yamux implementation is tokio-yamux, a port of hashicorp's:
//! its settings are hashicorp's (accept backlog, keep-alive, maximum stream window,
//! write timeout) so Gitaly's values carry over one to one, it uses tokio I/O, and it
//! adds one crate to the build. Its streams only notice window updates, resets and
//! the end of the session while they are read; [`mux::YStream`] makes them reliable
//! for a writer that does not read and keeps an idle stream from stalling its
//! session. (libp2p's `yamux` has sound wakeups but auto-tunes windows against a
//! per-connection budget instead of hashicorp's per-stream maximum, has no accept
//! backlog, speaks futures I/O, and brings about seven more crates.) TLS is done by
//! the listener, not tonic: the magic travels inside TLS.
//!
//! How a server adopts it: bind with [`listen::bind`], build a
//! [`listen::MuxIncoming`] (with [`tls::acceptor`] instead of tonic's own TLS), and
//! pass it to `serve_with_incoming_shutdown`; the auth layer stays as it is. A
//! handler calls [`server::open`] (tonic) or [`server::open_http`] (a raw tower
//! service) and maps failures with [`status`]. A proxy dials its upstream with
//! [`client::dial`], registers a [`client::Waiter`], puts its id on the forwarded
//! call ([`client::Waiter::attach_headers`]) and runs [`client::Waiter::serve`] with
//! a callback that opens its caller's sidechannel and runs [`proxy::proxy`].
//!
//! What it does not do: serve any RPC, check tokens (the auth layer still wraps
//! every call, on either kind of connection), or offer services on the reverse
//! (server→client) gRPC connection Gitaly's servers also dial over the backchannel;
//! refvote does not need it, and a client here refuses such streams.
#![forbid(unsafe_code)]

pub mod client;
pub mod frame;
pub mod listen;
pub mod mux;
pub mod proxy;
pub mod server;
pub mod status;
pub mod tls;

pub use client::{BackchannelClient, ClientSidechannel, DialOptions, Registry, Waiter, dial};
pub use listen::{ConnInfo, ListenConfig, MuxConn, MuxIncoming};
pub use proxy::proxy;
pub use server::{METADATA_KEY, OpenError, ServerSidechannel};
pub use status::FetchRpc;
