//! The server's side of a sidechannel: a handler serving a call that carries
//! `gitaly-sidechannel-id` opens a stream back to the client on the call's yamux
//! session, names the id, waits for the client's `ok`, then reads the client's
//! chunked data and writes raw bytes back (Gitaly's `OpenSidechannel`,
//! `internal/grpc/sidechannel/sidechannel.go` and `conn.go`).
//!
//! Wire, server first: `sidechannel` (11 bytes), the id as 8 bytes big-endian; the
//! client answers `ok`. Then client→server is [`crate::frame`] chunks ending with
//! `0000`, server→client is raw and ends when the server closes the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::frame::{FramingError, HEADER_LEN, ReadState};
use crate::listen::ConnInfo;
use crate::mux::{Session, YStream};

/// The magic a server writes first on the stream it opens.
pub const SIDECHANNEL_MAGIC: &[u8; 11] = b"sidechannel";
/// The call metadata naming the sidechannel the client waits for.
pub const METADATA_KEY: &str = "gitaly-sidechannel-id";
/// The client's confirmation.
pub const CONFIRMATION: &[u8; 2] = b"ok";
/// How long opening may take, confirmation included (Gitaly's `sidechannelTimeout`).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a sidechannel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("sidechannel: {METADATA_KEY} not found in the call's metadata")]
    MissingId,
    #[error("sidechannel: {METADATA_KEY} {0:?} is not a decimal integer")]
    InvalidId(String),
    #[error(
        "sidechannel: the call did not come on a backchannel connection (the client must dial with the `backchannel` handshake)"
    )]
    NotMultiplexed,
    #[error("sidechannel: opening a stream to the client")]
    Open(#[source] tokio_yamux::Error),
    #[error("sidechannel: handshake with the client")]
    Handshake(#[source] io::Error),
    #[error("sidechannel: the client did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("sidechannel: expected \"ok\" from the client, got {0:?}")]
    BadConfirmation(String),
}

impl OpenError {
    /// Whether trying the call again may help: the connection failed, not the call.
    /// Gitaly answers these with UNAVAILABLE on `PostUploadPackWithSidechannel`.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            OpenError::Open(_)
                | OpenError::Handshake(_)
                | OpenError::Timeout(_)
                | OpenError::BadConfirmation(_)
        )
    }
}

/// The id the client registered: the last `gitaly-sidechannel-id` value (a proxy
/// appends its own after the one it received).
pub fn sidechannel_id<'a, I>(values: I) -> Result<i64, OpenError>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let last = values.into_iter().last().ok_or(OpenError::MissingId)?;
    let text = std::str::from_utf8(last)
        .map_err(|_| OpenError::InvalidId(String::from_utf8_lossy(last).into_owned()))?;
    // Gitaly parses with strconv.ParseInt(_, 10, 64): optional sign, decimal digits.
    text.parse::<i64>()
        .map_err(|_| OpenError::InvalidId(text.to_owned()))
}

/// Opens the sidechannel of a tonic call.
pub async fn open<T>(request: &tonic::Request<T>) -> Result<ServerSidechannel, OpenError> {
    let id = sidechannel_id(
        request
            .metadata()
            .get_all(METADATA_KEY)
            .iter()
            .map(|v| v.as_bytes()),
    )?;
    open_on(session_of(request.extensions())?, id, OPEN_TIMEOUT).await
}

/// Opens the sidechannel of a call seen as a plain HTTP request (a tower service in
/// front of tonic, such as the router's forwarder).
pub async fn open_http(
    headers: &http::HeaderMap,
    extensions: &http::Extensions,
) -> Result<ServerSidechannel, OpenError> {
    let id = sidechannel_id(headers.get_all(METADATA_KEY).iter().map(|v| v.as_bytes()))?;
    open_on(session_of(extensions)?, id, OPEN_TIMEOUT).await
}

fn session_of(extensions: &http::Extensions) -> Result<&Session, OpenError> {
    extensions
        .get::<ConnInfo>()
        .and_then(ConnInfo::backchannel)
        .ok_or(OpenError::NotMultiplexed)
}

/// Opens sidechannel `id` on `session`, bounded by `timeout`.
pub async fn open_on(
    session: &Session,
    id: i64,
    timeout: Duration,
) -> Result<ServerSidechannel, OpenError> {
    let mut stream = session.open().await.map_err(OpenError::Open)?;
    let handshake = async {
        let mut hello = [0u8; 19];
        hello[..11].copy_from_slice(SIDECHANNEL_MAGIC);
        hello[11..].copy_from_slice(&id.to_be_bytes());
        stream.write_all(&hello).await?;
        let mut ok = [0u8; 2];
        stream.read_exact(&mut ok).await?;
        Ok::<_, io::Error>(ok)
    };
    let ok = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            stream.reset();
            return Err(OpenError::Handshake(e));
        }
        Err(_) => {
            stream.reset();
            return Err(OpenError::Timeout(timeout));
        }
    };
    if &ok != CONFIRMATION {
        stream.reset();
        return Err(OpenError::BadConfirmation(
            String::from_utf8_lossy(&ok).into_owned(),
        ));
    }
    // Until the client has ended its data (or we ended ours), dropping resets.
    stream.set_reset_on_drop(true);
    Ok(ServerSidechannel {
        stream,
        state: ReadState::default(),
    })
}

/// The client's framing error inside an I/O error from [`ServerSidechannel`]'s reads.
pub fn framing_error(e: &io::Error) -> Option<&FramingError> {
    e.get_ref().and_then(|inner| inner.downcast_ref())
}

fn framing_io(e: FramingError) -> io::Error {
    let kind = match e {
        FramingError::NoFlush | FramingError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e)
}

/// An open sidechannel, server side. Reads yield the client's data and end (EOF) at
/// its `0000`; an end without it, or bytes that are not chunks, are read errors
/// ([`framing_error`] tells which). Writes go to the client unchanged; shutting down
/// ends the stream, which ends the client's data. Dropped before the client finished
/// sending, it resets the stream so the client's writes fail instead of waiting;
/// otherwise dropping ends it like a shutdown.
#[derive(Debug)]
pub struct ServerSidechannel {
    stream: YStream,
    state: ReadState,
}

impl ServerSidechannel {
    /// Whether the client's `0000` has been read.
    pub fn client_done(&self) -> bool {
        self.state == ReadState::Done
    }

    /// Aborts the sidechannel: the client's reads and writes fail.
    pub fn reset(mut self) {
        self.stream.set_reset_on_drop(true);
    }
}

impl AsyncRead for ServerSidechannel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &this.state {
                ReadState::Done => return Poll::Ready(Ok(())),
                ReadState::Failed(e) => return Poll::Ready(Err(framing_io(e.clone()))),
                ReadState::Header { filled, .. } => {
                    let mut header = [0u8; HEADER_LEN];
                    let mut rb = ReadBuf::new(&mut header[..HEADER_LEN - filled]);
                    ready!(Pin::new(&mut this.stream).poll_read(cx, &mut rb))?;
                    if rb.filled().is_empty() {
                        let e = this.state.at_eof().expect("not done");
                        return Poll::Ready(Err(framing_io(e)));
                    }
                    this.state.feed_header(rb.filled());
                    if this.state == ReadState::Done {
                        this.stream.set_reset_on_drop(false);
                    }
                }
                ReadState::Payload { remaining } => {
                    if buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let want = (*remaining).min(buf.remaining());
                    let mut rb = ReadBuf::new(buf.initialize_unfilled_to(want));
                    ready!(Pin::new(&mut this.stream).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        let e = this.state.at_eof().expect("not done");
                        return Poll::Ready(Err(framing_io(e)));
                    }
                    buf.advance(n);
                    this.state.consumed_payload(n);
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for ServerSidechannel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.stream.set_reset_on_drop(false);
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_id_wins() {
        let vals: [&[u8]; 2] = [b"7", b"42"];
        assert_eq!(sidechannel_id(vals).unwrap(), 42);
        assert_eq!(sidechannel_id([&b"-3"[..]]).unwrap(), -3);
        assert!(matches!(
            sidechannel_id(std::iter::empty()),
            Err(OpenError::MissingId)
        ));
        let e = sidechannel_id([&b"12x"[..]]).unwrap_err();
        assert!(matches!(&e, OpenError::InvalidId(v) if v == "12x"), "{e}");
        assert!(e.to_string().contains("gitaly-sidechannel-id"));
        assert!(matches!(
            sidechannel_id([&b"99999999999999999999"[..]]),
            Err(OpenError::InvalidId(_))
        ));
    }

    #[test]
    fn transport_failures_are_retryable_and_call_errors_are_not() {
        assert!(OpenError::Timeout(OPEN_TIMEOUT).is_retryable());
        assert!(OpenError::Open(tokio_yamux::Error::SessionShutdown).is_retryable());
        assert!(!OpenError::NotMultiplexed.is_retryable());
        assert!(!OpenError::MissingId.is_retryable());
    }

    #[test]
    fn framing_errors_survive_the_io_error() {
        let e = framing_io(FramingError::SpecialPacket('1'));
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(framing_error(&e), Some(&FramingError::SpecialPacket('1')));
        let e = framing_io(FramingError::NoFlush);
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(framing_error(&io::Error::other("x")).is_none());
    }
}
