//! refvote-auth: how refvote's gRPC endpoints know their callers, shared by the router
//! and votingd so both speak one scheme.
//!
//! - [`token`]: Gitaly's v2 shared-secret token (generation and a constant-time check),
//!   wire-compatible with GitLab's Gitaly clients.
//! - [`settings`]: the `[auth]` section of both configuration files.
//! - [`server`]: a tower layer that refuses every call without a valid token with
//!   UNAUTHENTICATED before any handler runs (health checks excepted, as in Gitaly),
//!   or only logs it in `transitioning` mode.
//! - [`git_http`]: the same secret on git's smart HTTP: a v2 bearer token, or HTTP
//!   Basic credentials whose password is the secret (plain git clients).
//! - [`client`]: a channel wrapper that signs every call with a fresh token, replacing
//!   whatever `authorization` the forwarded metadata carried.
//! - [`tls`]: the `[tls]` section: rustls on the gRPC listener (optionally asking for
//!   client certificates) and the CA that `tls://` nodes are trusted by.
//!
//! It does not decide who may do what beyond one distinction: besides Gitaly's one
//! shared secret (all or nothing), the router may hold a read-only one; a call or
//! request proved with it is marked [`ReadOnly`] (git HTTP: [`git_http::Access`]) and
//! the router refuses it what is not a read.
#![forbid(unsafe_code)]

pub mod client;
pub mod git_http;
pub mod server;
pub mod settings;
pub mod tls;
pub mod token;

pub use client::Signed;
pub use git_http::HttpAuthError;
pub use server::AuthLayer;
pub use server::ReadOnly;
pub use settings::{AuthPolicy, AuthSettings, ReadOnlySettings};
pub use tls::TlsSettings;
pub use token::{Secret, TokenError};
