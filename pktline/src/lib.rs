//! refvote-pktline: git's pkt-line framing, in one place for the router, the storage
//! node and the tests (gitoxide's `gix-packetline` is the model).
//!
//! - [`encode`] and [`decode`]: data packets (a 4-hex-digit length that counts itself,
//!   then at most [`MAX_DATA_LEN`] bytes) and the special packets flush `0000`, delim
//!   `0001` and response-end `0002`.
//! - [`sideband`]: side-band multiplexing (`side-band`, `side-band-64k`): band 1 data,
//!   2 progress, 3 error.
//! - [`command`]: a push's command lines (`<old> <new> <ref>`, capabilities after the
//!   first line's NUL) and its capabilities.
//! - [`section`] and [`canonical`]: a receive-pack request's command section, read
//!   incrementally within [`Limits`] and rewritten into one canonical order (sorted by
//!   ref name), so every replica applies a push's commands alike.
//! - [`report`]: the report-status git reads at the end of a push (`unpack ok`,
//!   `ok <ref>`, `ng <ref> <reason>`), inside the side-band when one was negotiated.
//!
//! It does no I/O: everything works on byte slices and `Vec<u8>`. The `tokio` feature
//! adds two adapters (`canonicalize`, `read_canonical_section`) that stream a push
//! through the canonical ordering over `AsyncRead`/`AsyncWrite`. It does not check ref
//! names or object ids beyond what framing and sorting need (git does that), and knows
//! nothing of sockets, HTTP or gRPC.
#![forbid(unsafe_code)]

pub mod canonical;
pub mod command;
pub mod decode;
pub mod encode;
#[cfg(feature = "tokio")]
mod io;
pub mod report;
pub mod section;
pub mod sideband;

pub use canonical::{Summary, canonical_section};
pub use decode::{DecodeError, Header, Packet};
pub use encode::EncodeError;
#[cfg(feature = "tokio")]
pub use io::{canonicalize, read_canonical_section};
pub use section::{Limits, PktError, SectionReader};

/// git's `LARGE_PACKET_MAX`: the largest pkt-line, its 4 header bytes included.
pub const MAX_PKT_LEN: usize = 65520;

/// The most payload one data pkt-line carries ([`MAX_PKT_LEN`] less the header).
pub const MAX_DATA_LEN: usize = MAX_PKT_LEN - HEADER_LEN;

/// The length header: four lower-case hex digits.
pub const HEADER_LEN: usize = 4;
