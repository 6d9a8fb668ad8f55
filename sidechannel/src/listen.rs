//! The listener: one port for plain HTTP/2 gRPC and for Gitaly's backchannel.
//!
//! Every accepted connection (after TLS, when configured) is sniffed for its first 11
//! bytes under a deadline. `backchannel` starts a yamux session in which this process
//! is the server, and the client's first stream carries its gRPC. Anything else is
//! handed on with the sniffed bytes put back in front, to be served as HTTP/2 gRPC
//! exactly as before. Both kinds come out of [`MuxIncoming`], which tonic's
//! `serve_with_incoming(_shutdown)` accepts; a handler finds the connection's
//! [`ConnInfo`] (peer address, the yamux session if any) in its request extensions.
//!
//! What it does not do: authenticate (the token check stays a tower layer, applied to
//! both kinds alike) or open sidechannels (see [`crate::server`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use crate::mux::{self, Role, Session, YStream};

/// The 11 bytes a multiplexing client sends first (`internal/grpc/backchannel/backchannel.go`).
pub const BACKCHANNEL_MAGIC: &[u8; 11] = b"backchannel";

/// How connections are accepted.
#[derive(Clone)]
pub struct ListenConfig {
    /// The time a new connection has for TLS, its first 11 bytes and (backchannel)
    /// opening its gRPC stream. Gitaly relies on gRPC's connection timeout (120 s);
    /// a connection that says nothing for this long is dropped.
    pub handshake_timeout: Duration,
    /// The yamux settings of backchannel sessions ([`mux::server_config`]).
    pub yamux: tokio_yamux::Config,
}

impl std::fmt::Debug for ListenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenConfig")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("yamux_accept_backlog", &self.yamux.accept_backlog)
            .field(
                "yamux_max_stream_window",
                &self.yamux.max_stream_window_size,
            )
            .finish()
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            handshake_timeout: Duration::from_secs(10),
            yamux: mux::server_config(),
        }
    }
}

/// Binds `addr` (before anything else starts, so a busy port fails start-up at once).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let std = std::net::TcpListener::bind(addr)?;
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

/// What a gRPC handler can learn about the connection its call came on
/// (`request.extensions().get::<ConnInfo>()`).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address (`None` on a Unix socket).
    pub remote_addr: Option<SocketAddr>,
    /// The address it connected to.
    pub local_addr: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    backchannel: Option<Session>,
}

impl ConnInfo {
    /// The yamux session of a backchannel connection; `None` for plain HTTP/2.
    pub fn backchannel(&self) -> Option<&Session> {
        self.backchannel.as_ref()
    }
}

/// The client's address of a call served through [`MuxIncoming`] (tonic's own
/// `Request::remote_addr` only knows its own connection types).
pub fn remote_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnInfo>()
        .and_then(|i| i.remote_addr)
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

enum Transport {
    /// Plain HTTP/2: the sniffed bytes first, then the connection.
    Plain {
        prefix: Vec<u8>,
        at: usize,
        io: Box<dyn Io>,
    },
    /// The client's first yamux stream.
    Backchannel(YStream),
}

/// One accepted connection, ready for gRPC.
pub struct MuxConn {
    transport: Transport,
    info: ConnInfo,
}

impl std::fmt::Debug for MuxConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxConn").field("info", &self.info).finish()
    }
}

impl MuxConn {
    /// The connection's [`ConnInfo`].
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }
}

impl Connected for MuxConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for MuxConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain { prefix, at, io } => {
                if *at < prefix.len() {
                    let n = (prefix.len() - *at).min(buf.remaining());
                    buf.put_slice(&prefix[*at..*at + n]);
                    *at += n;
                    return Poll::Ready(Ok(()));
                }
                Pin::new(io).poll_read(cx, buf)
            }
            Transport::Backchannel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MuxConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().transport {
            Transport::Plain { io, .. } => Pin::new(io).poll_write(cx, buf),
            Transport::Backchannel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().transport {
            Transport::Plain { io, .. } => Pin::new(io).poll_write_vectored(cx, bufs),
            Transport::Backchannel(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.transport {
            Transport::Plain { io, .. } => io.is_write_vectored(),
            Transport::Backchannel(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain { io, .. } => Pin::new(io).poll_flush(cx),
            Transport::Backchannel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain { io, .. } => Pin::new(io).poll_shutdown(cx),
            Transport::Backchannel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Accepted connections, plain and backchannel, for tonic's
/// `Server::serve_with_incoming(_shutdown)`. Dropping it stops accepting and closes
/// the listening socket.
pub struct MuxIncoming {
    rx: mpsc::Receiver<MuxConn>,
    local_addr: Option<SocketAddr>,
}

enum Listener {
    Tcp(TcpListener),
    /// A local socket (Gitaly's `socket_path`); its clients may dial with the
    /// backchannel handshake too.
    Unix(UnixListener),
}

/// A connection just accepted: its I/O, the peer, our address.
type Accepted = (Box<dyn Io>, Option<SocketAddr>, Option<SocketAddr>);

impl Listener {
    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => {
                let (tcp, peer) = l.accept().await?;
                // Small gRPC frames must not wait for Nagle.
                tcp.set_nodelay(true)?;
                let local = tcp.local_addr().ok();
                Ok((Box::new(tcp), Some(peer), local))
            }
            Listener::Unix(l) => {
                let (unix, _) = l.accept().await?;
                Ok((Box::new(unix), None, None))
            }
        }
    }
}

impl MuxIncoming {
    /// Accepts on `listener` in a new task; `tls` makes every connection TLS (both
    /// kinds: the backchannel magic comes after the TLS handshake, as Gitaly's
    /// clients send it).
    pub fn new(
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        config: ListenConfig,
    ) -> io::Result<MuxIncoming> {
        let local_addr = Some(listener.local_addr()?);
        Ok(Self::start(
            Listener::Tcp(listener),
            tls,
            config,
            local_addr,
        ))
    }

    /// Accepts on a Unix socket (no TLS there, as in Gitaly).
    pub fn unix(listener: UnixListener, config: ListenConfig) -> MuxIncoming {
        Self::start(Listener::Unix(listener), None, config, None)
    }

    fn start(
        listener: Listener,
        tls: Option<TlsAcceptor>,
        config: ListenConfig,
        local_addr: Option<SocketAddr>,
    ) -> MuxIncoming {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(accept_loop(listener, tls, config, tx));
        MuxIncoming { rx, local_addr }
    }

    /// The TCP address listened on (`None` for a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl tokio_stream::Stream for MuxIncoming {
    type Item = io::Result<MuxConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

async fn accept_loop(
    listener: Listener,
    tls: Option<TlsAcceptor>,
    config: ListenConfig,
    tx: mpsc::Sender<MuxConn>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tx.closed() => return,
        };
        match accepted {
            Ok((io, peer, local)) => {
                let (tls, config, tx) = (tls.clone(), config.clone(), tx.clone());
                tokio::spawn(async move {
                    let deadline = config.handshake_timeout;
                    let handshake = handshake(io, peer, local, tls, &config);
                    match tokio::time::timeout(deadline, handshake).await {
                        Ok(Ok(conn)) => {
                            let _ = tx.send(conn).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(?peer, error = %e, "connection dropped during its handshake")
                        }
                        Err(_) => {
                            tracing::debug!(
                                ?peer,
                                ?deadline,
                                "connection dropped: no handshake in time"
                            )
                        }
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of
                // spinning; the listener itself stays.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handshake(
    io: Box<dyn Io>,
    peer: Option<SocketAddr>,
    local_addr: Option<SocketAddr>,
    tls: Option<TlsAcceptor>,
    config: &ListenConfig,
) -> io::Result<MuxConn> {
    let mut io: Box<dyn Io> = match &tls {
        Some(acceptor) => Box::new(acceptor.accept(io).await?),
        None => io,
    };
    let prefix = sniff(&mut io).await?;
    let mut info = ConnInfo {
        remote_addr: peer,
        local_addr,
        tls: tls.is_some(),
        backchannel: None,
    };
    if prefix != BACKCHANNEL_MAGIC {
        return Ok(MuxConn {
            transport: Transport::Plain { prefix, at: 0, io },
            info,
        });
    }
    // The client's first stream is its gRPC connection; it opens no other (Gitaly
    // accepts exactly one), so later ones are refused (reset).
    let (first_tx, first_rx) = oneshot::channel();
    let mut first_tx = Some(first_tx);
    let session = Session::start(
        io,
        Role::Server,
        config.yamux,
        move |stream| match first_tx.take() {
            Some(tx) => {
                let _ = tx.send(stream);
            }
            None => stream.reset(),
        },
    );
    // A handshake that times out here must not leave the session running.
    let guard = CloseOnDrop(Some(session));
    let Ok(mut grpc) = first_rx.await else {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the backchannel session ended before the client opened its gRPC stream",
        ));
    };
    grpc.mark_primary();
    info.backchannel = guard.disarm();
    Ok(MuxConn {
        transport: Transport::Backchannel(grpc),
        info,
    })
}

/// Reads up to the magic's length, never more, so nothing after it is consumed.
async fn sniff(io: &mut Box<dyn Io>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; BACKCHANNEL_MAGIC.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection before sending 11 bytes",
            ));
        }
        filled += n;
    }
    Ok(buf)
}

struct CloseOnDrop(Option<Session>);

impl CloseOnDrop {
    fn disarm(mut self) -> Option<Session> {
        self.0.take()
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.close();
        }
    }
}
