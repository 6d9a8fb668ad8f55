//! The client's side, as gitlab-shell and workhorse dial Gitaly
//! (`client.DialSidechannel`, `SidechannelRegistry.Register`) and as the router
//! dials a node when it proxies a sidechannel (Praefect's way).
//!
//! [`dial`] connects (TCP, then TLS if asked), writes `backchannel`, runs yamux as
//! the client, opens one stream and runs a tonic [`Channel`] over it. The channel
//! never dials again: when the session ends, calls fail and the caller dials anew.
//! Streams the server opens are matched by id to [`Registry::register`]ed waiters,
//! confirmed with `ok`, and handed over as [`ClientSidechannel`]s.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};

use crate::frame::{FLUSH, MAX_PAYLOAD, encode_header};
use crate::listen::BACKCHANNEL_MAGIC;
use crate::mux::{self, Role, Session, YStream};
use crate::server::{CONFIRMATION, METADATA_KEY, OPEN_TIMEOUT, SIDECHANNEL_MAGIC};

/// TLS toward the server: the connector and the name its certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

/// How [`dial`] connects.
#[derive(Clone)]
pub struct DialOptions {
    /// TLS, or plain TCP when `None`.
    pub tls: Option<TlsClient>,
    /// Bounds TCP connect, TLS, the yamux stream and the HTTP/2 handshake together.
    pub connect_timeout: Duration,
    /// yamux settings ([`mux::client_config`]: what Gitaly's clients use).
    pub yamux: tokio_yamux::Config,
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            tls: None,
            connect_timeout: Duration::from_secs(10),
            yamux: mux::client_config(),
        }
    }
}

/// Why [`dial`] failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot dial {0}")]
    Address(String),
    #[error("connecting to {0}")]
    Connect(String, #[source] io::Error),
    #[error("TLS handshake with {0}")]
    Tls(String, #[source] io::Error),
    #[error("backchannel handshake with {0}")]
    Handshake(String, #[source] io::Error),
    #[error("opening the gRPC stream to {0}")]
    Stream(String, #[source] tokio_yamux::Error),
    #[error("HTTP/2 connection to {0}")]
    Grpc(String, #[source] tonic::transport::Error),
    #[error("connecting to {0} took longer than {1:?}")]
    Timeout(String, Duration),
}

/// A backchannel connection: a gRPC channel and the sidechannels its server opens.
#[derive(Clone)]
pub struct BackchannelClient {
    channel: Channel,
    registry: Registry,
    session: Session,
    peer: Option<SocketAddr>,
}

impl std::fmt::Debug for BackchannelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackchannelClient")
            .field("peer", &self.peer)
            .field("session", &self.session)
            .finish()
    }
}

impl BackchannelClient {
    /// The gRPC channel; clone it freely. It does not reconnect.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Where sidechannels are registered.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers a sidechannel for the next call (see [`Registry::register`]).
    pub fn register(&self) -> Waiter {
        self.registry.register()
    }

    /// The yamux session (alive? how many streams?).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The server's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }
}

/// Dials `endpoint` (its URI's host and port; its HTTP/2 settings apply) with the
/// backchannel handshake. The URI is `http://`: TLS, when wanted, is
/// [`DialOptions::tls`], done below the yamux session rather than by tonic.
pub async fn dial(
    endpoint: Endpoint,
    options: DialOptions,
) -> Result<BackchannelClient, DialError> {
    let uri = endpoint.uri().clone();
    if uri.scheme_str() != Some("http") {
        return Err(DialError::Address(format!(
            "{uri} (give an http:// endpoint; TLS comes from DialOptions::tls)"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| DialError::Address(format!("{uri} (no host:port)")))?;
    let port = authority.port_u16().unwrap_or(80);
    let target = format!("{}:{port}", authority.host().trim_matches(['[', ']']));
    let deadline = options.connect_timeout;
    tokio::time::timeout(deadline, connect(&target, endpoint, options))
        .await
        .map_err(|_| DialError::Timeout(target.clone(), deadline))?
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

async fn connect(
    target: &str,
    endpoint: Endpoint,
    options: DialOptions,
) -> Result<BackchannelClient, DialError> {
    let tcp = TcpStream::connect(target)
        .await
        .map_err(|e| DialError::Connect(target.to_owned(), e))?;
    tcp.set_nodelay(true)
        .map_err(|e| DialError::Connect(target.to_owned(), e))?;
    let peer = tcp.peer_addr().ok();
    let mut io: Box<dyn Io> = match &options.tls {
        Some(tls) => Box::new(
            tls.connector
                .connect(tls.server_name.clone(), tcp)
                .await
                .map_err(|e| DialError::Tls(target.to_owned(), e))?,
        ),
        None => Box::new(tcp),
    };
    io.write_all(BACKCHANNEL_MAGIC)
        .await
        .map_err(|e| DialError::Handshake(target.to_owned(), e))?;
    let registry = Registry::default();
    let inbound = registry.clone();
    let session = Session::start(io, Role::Client, options.yamux, move |stream| {
        tokio::spawn(inbound.clone().accept(stream));
    });
    let mut grpc = match session.open().await {
        Ok(s) => s,
        Err(e) => {
            session.close();
            return Err(DialError::Stream(target.to_owned(), e));
        }
    };
    grpc.mark_primary();
    // HTTP/2's handshake does not wait for the server; the yamux ACK does.
    if let Err(e) = grpc.established().await {
        session.close();
        return Err(DialError::Handshake(target.to_owned(), e));
    }
    let once = Arc::new(Mutex::new(Some(grpc)));
    let connector = tower::service_fn(move |_: http::Uri| {
        let stream = once.lock().unwrap_or_else(PoisonError::into_inner).take();
        async move {
            stream.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the backchannel connection is closed; dial again",
                )
            })
        }
    });
    let channel = match endpoint.connect_with_connector(connector).await {
        Ok(c) => c,
        Err(e) => {
            session.close();
            return Err(DialError::Grpc(target.to_owned(), e));
        }
    };
    Ok(BackchannelClient {
        channel,
        registry,
        session,
        peer,
    })
}

/// Sidechannels this client waits for, by id.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    next: AtomicI64,
    waiting: Mutex<HashMap<i64, oneshot::Sender<YStream>>>,
}

impl Registry {
    /// Registers a sidechannel: put [`Waiter::id`] in the call's metadata
    /// ([`Waiter::attach`]), make the call, and await [`Waiter::accept`] alongside
    /// it. Dropping the waiter withdraws the registration.
    pub fn register(&self) -> Waiter {
        // Ids start at 1: Gitaly reads an unparsable id as 0.
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        Waiter {
            id,
            rx: Some(rx),
            registry: self.clone(),
        }
    }

    /// Registrations not yet answered by the server nor withdrawn.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, oneshot::Sender<YStream>>> {
        self.inner
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A stream the server opened: a sidechannel for one of our waiters, or nothing
    /// we serve (Gitaly's servers also dial a backchannel gRPC client this way; we
    /// offer no services there, so that stream is refused).
    async fn accept(self, mut stream: YStream) {
        let hello = async {
            let mut magic = [0u8; 11];
            stream.read_exact(&mut magic).await?;
            if &magic != SIDECHANNEL_MAGIC {
                return Ok(None);
            }
            let mut id = [0u8; 8];
            stream.read_exact(&mut id).await?;
            Ok::<_, io::Error>(Some(i64::from_be_bytes(id)))
        };
        let id = match tokio::time::timeout(OPEN_TIMEOUT, hello).await {
            Ok(Ok(Some(id))) => id,
            Ok(Ok(None)) => {
                tracing::debug!("refusing a server-opened stream that is not a sidechannel");
                return stream.reset();
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "a server-opened stream failed before naming its sidechannel");
                return stream.reset();
            }
            Err(_) => return stream.reset(),
        };
        let Some(waiter) = self.lock().remove(&id) else {
            tracing::debug!(id, "the server opened a sidechannel nobody waits for");
            return stream.reset();
        };
        // Confirm at once, whether or not the caller is awaiting yet: the server
        // gives up after a few seconds.
        let confirmed = tokio::time::timeout(OPEN_TIMEOUT, stream.write_all(CONFIRMATION)).await;
        if !matches!(confirmed, Ok(Ok(()))) {
            return stream.reset();
        }
        if let Err(stream) = waiter.send(stream) {
            stream.reset();
        }
    }
}

/// Why a [`Waiter`] got no sidechannel.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error(
        "sidechannel: the server did not open the sidechannel (the call ended, or the connection closed)"
    )]
    NotOpened,
}

/// A registered sidechannel the server has not opened yet.
pub struct Waiter {
    id: i64,
    rx: Option<oneshot::Receiver<YStream>>,
    registry: Registry,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").field("id", &self.id).finish()
    }
}

impl Waiter {
    /// The id to send as `gitaly-sidechannel-id`.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Sets `gitaly-sidechannel-id` in a call's metadata, replacing any value there
    /// (a proxy forwards its own caller's id otherwise).
    pub fn attach(&self, metadata: &mut MetadataMap) {
        let value = AsciiMetadataValue::try_from(self.id.to_string()).expect("digits are ASCII");
        metadata.insert(METADATA_KEY, value);
    }

    /// Sets `gitaly-sidechannel-id` in a call seen as HTTP headers (a forwarding
    /// proxy's request), replacing any value there.
    pub fn attach_headers(&self, headers: &mut http::HeaderMap) {
        let value = http::HeaderValue::from(self.id);
        headers.insert(METADATA_KEY, value);
    }

    /// The sidechannel, once the server opened it and we confirmed it. Fails when
    /// the registration is withdrawn or the connection ends first.
    pub async fn accept(mut self) -> Result<ClientSidechannel, WaitError> {
        let rx = self.rx.take().expect("accept consumes the waiter");
        match rx.await {
            Ok(mut stream) => Ok(ClientSidechannel {
                stream: {
                    stream.set_reset_on_drop(true);
                    stream
                },
                pending: Vec::new(),
                at: 0,
                write_closed: false,
                read_done: false,
            }),
            Err(_) => Err(WaitError::NotOpened),
        }
    }
}

impl Waiter {
    /// Runs `call` (a call carrying this waiter's id) and serves its sidechannel
    /// with `callback` once the server opens it, the way Gitaly's clients use a
    /// registration: when the call ends before the server opened the sidechannel,
    /// the registration is withdrawn and the second value is `None`; once the
    /// callback runs, it is awaited to its end even if the call ends first (its
    /// reads end when the server's stream does).
    pub async fn serve<C, T, F, Fut, R>(self, call: C, callback: F) -> (T, Option<R>)
    where
        C: Future<Output = T>,
        F: FnOnce(ClientSidechannel) -> Fut,
        Fut: Future<Output = R>,
    {
        let opened = std::sync::atomic::AtomicBool::new(false);
        let side = async {
            let sc = self.accept().await.ok()?;
            opened.store(true, Ordering::Relaxed);
            Some(callback(sc).await)
        };
        tokio::pin!(call, side);
        // The sidechannel first: the server writes nothing before our `ok`, which
        // is sent just before the stream is handed over, so by the time the call
        // can end, a stream the server opened is already waiting here.
        tokio::select! {
            biased;
            side_out = &mut side => (call.await, side_out),
            out = &mut call => {
                let side = if opened.load(Ordering::Relaxed) { side.await } else { None };
                (out, side)
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// An open sidechannel, client side. Writes are sent as chunks; shutting down
/// (or [`ClientSidechannel::close_write`]) sends the `0000` that ends them while
/// the stream stays open for reading. Reads return the server's bytes as sent and
/// end when the server closes. Dropped before the server's data was read to its
/// end, it resets the stream (the server's writes fail); otherwise it closes it.
pub struct ClientSidechannel {
    stream: YStream,
    /// A chunk (header and payload) not yet fully written.
    pending: Vec<u8>,
    at: usize,
    write_closed: bool,
    read_done: bool,
}

impl std::fmt::Debug for ClientSidechannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSidechannel")
            .field("stream", &self.stream)
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

impl ClientSidechannel {
    /// Ends what we send (`0000`); reading goes on.
    pub async fn close_write(&mut self) -> io::Result<()> {
        self.shutdown().await
    }

    /// Aborts the sidechannel: the server's reads and writes fail.
    pub fn reset(mut self) {
        self.stream.set_reset_on_drop(true);
    }

    /// The stream without the client's framing, for a tool that frames by itself.
    pub fn into_raw(self) -> YStream {
        let mut stream = self.stream;
        stream.set_reset_on_drop(false);
        stream
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.at < self.pending.len() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.pending[self.at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.at += n;
        }
        self.pending.clear();
        self.at = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ClientSidechannel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        if buf.filled().len() == before && buf.remaining() > 0 && !this.read_done {
            // The server's data is complete: from now on dropping ends the stream
            // gracefully instead of resetting it.
            this.read_done = true;
            this.stream.set_reset_on_drop(false);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientSidechannel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "sidechannel: write after the data was ended (0000 sent)",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_PAYLOAD);
        this.pending.extend_from_slice(&encode_header(n));
        this.pending.extend_from_slice(&buf[..n]);
        // The chunk is ours now; what the stream does not take yet goes out on the
        // next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if !this.write_closed {
            this.write_closed = true;
            this.pending.extend_from_slice(FLUSH);
            ready!(this.poll_pending(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_have_fresh_ids_and_drop_withdraws_them() {
        let registry = Registry::default();
        let a = registry.register();
        let b = registry.register();
        assert_eq!((a.id(), b.id()), (1, 2));
        assert_eq!(registry.waiting(), 2);
        drop(a);
        assert_eq!(registry.waiting(), 1);
        drop(b);
        assert_eq!(registry.waiting(), 0);
    }

    #[test]
    fn attaching_replaces_a_forwarded_id() {
        let registry = Registry::default();
        let w = registry.register();
        let mut md = MetadataMap::new();
        md.insert(METADATA_KEY, "77".parse().unwrap());
        w.attach(&mut md);
        let all: Vec<_> = md.get_all(METADATA_KEY).iter().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].to_str().unwrap(), "1");
        let mut headers = http::HeaderMap::new();
        headers.append(METADATA_KEY, "77".parse().unwrap());
        headers.append(METADATA_KEY, "78".parse().unwrap());
        w.attach_headers(&mut headers);
        let all: Vec<_> = headers.get_all(METADATA_KEY).iter().collect();
        assert_eq!(all, [&http::HeaderValue::from(1i64)]);
    }
}
