//! yamux sessions (tokio-yamux) with Gitaly's settings, and the stream type every
//! other module uses.
//!
//! tokio-yamux's stream only looks at its incoming frames while it is being read:
//! a writer waiting for send window is not woken by the window update, nor by a reset
//! or the end of the session, unless someone also reads; and a stream nobody polls
//! fills its frame queue (8 frames) and stops the whole session from reading its
//! socket. [`YStream`] closes those gaps: every poll of the inner stream uses one
//! waker that wakes the reader, the writer and a small per-stream drain task, the
//! drain task moves arriving frames into the stream's buffer (bounded by the yamux
//! window, as in hashicorp's implementation), and a writer checks that the session is
//! still alive. The session itself runs in one task per connection.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
use tokio_yamux::stream::StreamState;
use tokio_yamux::{Config, StreamHandle};

/// hashicorp-yamux's initial (and, for clients, maximum) stream window.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// The stream window Gitaly's server side allows (`backchannel/server.go`).
pub const SERVER_MAX_WINDOW: u32 = 16 * 1024 * 1024;

/// Gitaly's server-side session settings (`internal/grpc/backchannel/server.go`,
/// `muxConfig` in `backchannel.go`): no yamux keep-alive (gRPC's own keep-alive
/// covers both kinds of connection), an accept backlog of one (the client opens only
/// its gRPC stream), and a 16 MiB stream window.
pub fn server_config() -> Config {
    Config {
        accept_backlog: 1,
        enable_keepalive: false,
        max_stream_window_size: SERVER_MAX_WINDOW,
        ..Config::default()
    }
}

/// The settings Gitaly's clients (gitlab-shell, workhorse, Praefect) dial with:
/// hashicorp's defaults (backlog 256, 256 KiB window, 10 s write timeout) with
/// keep-alive off.
pub fn client_config() -> Config {
    Config {
        accept_backlog: 256,
        enable_keepalive: false,
        max_stream_window_size: INITIAL_WINDOW,
        ..Config::default()
    }
}

/// Which end of the session this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepted the connection (Gitaly, refvote's node and router).
    Server,
    /// Dialed it (gitlab-shell, workhorse, the router toward a node).
    Client,
}

/// How long a session outlives its gRPC stream, so the last frames reach the socket
/// and the peer gets to close first.
fn grace(role: Role) -> Duration {
    match role {
        Role::Server => Duration::from_secs(2),
        Role::Client => Duration::from_millis(200),
    }
}

/// What a session's streams and its driver share.
pub(crate) struct SessionState {
    alive: AtomicBool,
    shutdown: AtomicBool,
    primary_gone: AtomicBool,
    streams: AtomicUsize,
    events: Notify,
    ended: watch::Sender<bool>,
}

impl SessionState {
    fn new() -> Arc<SessionState> {
        Arc::new(SessionState {
            alive: AtomicBool::new(true),
            shutdown: AtomicBool::new(false),
            primary_gone: AtomicBool::new(false),
            streams: AtomicUsize::new(0),
            events: Notify::new(),
            ended: watch::Sender::new(false),
        })
    }

    fn stream_closed(&self, primary: bool) {
        self.streams.fetch_sub(1, Ordering::AcqRel);
        if primary {
            self.primary_gone.store(true, Ordering::Release);
        }
        self.events.notify_one();
    }
}

/// A running yamux session: opens streams, tells whether it is alive. Cloning it is
/// cheap; the session ends when the peer closes, on a protocol error, after
/// [`Session::close`], or shortly after its gRPC stream is gone.
#[derive(Clone)]
pub struct Session {
    control: tokio_yamux::Control,
    state: Arc<SessionState>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("alive", &self.is_alive())
            .field("streams", &self.open_streams())
            .finish()
    }
}

impl Session {
    /// Runs a session over `io` in a new task. Streams the peer opens are handed to
    /// `on_inbound`, from the driver task: it must not block.
    pub(crate) fn start<T, F>(io: T, role: Role, config: Config, mut on_inbound: F) -> Session
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: FnMut(YStream) + Send + 'static,
    {
        let mut session = match role {
            Role::Server => tokio_yamux::Session::new_server(io, config),
            Role::Client => tokio_yamux::Session::new_client(io, config),
        };
        let state = SessionState::new();
        let handle = Session {
            control: session.control(),
            state: state.clone(),
        };
        tokio::spawn(async move {
            let mut grace_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
            loop {
                if state.shutdown.load(Ordering::Acquire) {
                    break;
                }
                if state.primary_gone.load(Ordering::Acquire) && grace_timer.is_none() {
                    grace_timer = Some(Box::pin(tokio::time::sleep(grace(role))));
                }
                tokio::select! {
                    next = session.next() => match next {
                        Some(Ok(stream)) => on_inbound(YStream::new(stream, &state)),
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, ?role, "yamux session failed");
                            break;
                        }
                        None => break,
                    },
                    _ = state.events.notified() => {}
                    _ = async { grace_timer.as_mut().expect("guarded").await }, if grace_timer.is_some() => break,
                }
            }
            // Streams check `alive` before they wait on the (then closed) session.
            state.alive.store(false, Ordering::Release);
            drop(session);
            state.ended.send_replace(true);
        });
        handle
    }

    /// Opens a stream to the peer (SYN sent at once).
    pub(crate) async fn open(&self) -> Result<YStream, tokio_yamux::Error> {
        if !self.is_alive() {
            return Err(tokio_yamux::Error::SessionShutdown);
        }
        let stream = self.control.clone().open_stream().await?;
        Ok(YStream::new(stream, &self.state))
    }

    /// Whether the session still runs.
    pub fn is_alive(&self) -> bool {
        self.state.alive.load(Ordering::Acquire)
    }

    /// Streams of this session not yet dropped (the gRPC stream included).
    pub fn open_streams(&self) -> usize {
        self.state.streams.load(Ordering::Acquire)
    }

    /// Ends the session now: the connection closes, every stream fails.
    pub fn close(&self) {
        self.state.shutdown.store(true, Ordering::Release);
        self.state.events.notify_one();
    }

    /// Resolves once the session has ended and its connection is closed.
    pub async fn ended(&self) {
        let mut rx = self.state.ended.subscribe();
        let _ = rx.wait_for(|ended| *ended).await;
    }
}

/// One waker for the inner stream that wakes everyone who may be waiting on it.
#[derive(Default)]
struct FanOut {
    reader: AtomicWaker,
    writer: AtomicWaker,
    drainer: AtomicWaker,
}

impl Wake for FanOut {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.reader.wake();
        self.writer.wake();
        self.drainer.wake();
    }
}

struct Shared {
    handle: Mutex<StreamHandle>,
    fan: Arc<FanOut>,
    waker: Waker,
    dropped: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, StreamHandle> {
        self.handle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A yamux stream with tokio I/O. Dropping it ends it gracefully (FIN) unless
/// [`YStream::reset`] was called, which aborts it (RST).
pub struct YStream {
    shared: Arc<Shared>,
    session: Arc<SessionState>,
    primary: bool,
    shut: bool,
    reset: bool,
}

impl std::fmt::Debug for YStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.shared.lock();
        f.debug_struct("YStream")
            .field("id", &h.id())
            .field("state", &h.state())
            .finish()
    }
}

fn broken(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, why)
}

impl YStream {
    fn new(handle: StreamHandle, session: &Arc<SessionState>) -> YStream {
        let fan = Arc::new(FanOut::default());
        let shared = Arc::new(Shared {
            handle: Mutex::new(handle),
            waker: Waker::from(fan.clone()),
            fan,
            dropped: AtomicBool::new(false),
        });
        session.streams.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(drain_frames(Arc::downgrade(&shared)));
        YStream {
            shared,
            session: session.clone(),
            primary: false,
            shut: false,
            reset: false,
        }
    }

    /// Marks the session's gRPC stream: once it is dropped the session winds down.
    pub(crate) fn mark_primary(&mut self) {
        self.primary = true;
    }

    /// Aborts the stream: the peer's reads and writes on it fail at once.
    pub fn reset(mut self) {
        self.reset = true;
    }

    /// Sets whether dropping this stream resets it (true) or ends it (false).
    pub fn set_reset_on_drop(&mut self, reset: bool) {
        self.reset = reset;
    }

    /// Resolves once the peer acknowledged the stream (a yamux ACK): proof that a
    /// yamux session answers on the other end.
    pub async fn established(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            self.shared.fan.reader.register(cx.waker());
            if !self.session.alive.load(Ordering::Acquire) {
                return Poll::Ready(Err(broken("the yamux session has ended")));
            }
            self.with_inner(|inner, fcx| {
                let mut one = [0u8; 1];
                if let Poll::Ready(Err(e)) = inner.poll_peek(fcx, &mut ReadBuf::new(&mut one)) {
                    return Poll::Ready(Err(e));
                }
                match inner.state() {
                    StreamState::Init | StreamState::SynSent => Poll::Pending,
                    StreamState::Reset => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        "the peer refused the stream",
                    ))),
                    _ => Poll::Ready(Ok(())),
                }
            })
        })
        .await
    }

    fn with_inner<R>(&self, f: impl FnOnce(&mut StreamHandle, &mut Context<'_>) -> R) -> R {
        let mut inner = self.shared.lock();
        let mut cx = Context::from_waker(&self.shared.waker);
        f(&mut inner, &mut cx)
    }
}

/// Keeps a stream's frames flowing into its buffer while the application is busy
/// elsewhere, so one idle stream never stalls its session.
async fn drain_frames(shared: Weak<Shared>) {
    std::future::poll_fn(|cx| {
        let Some(s) = shared.upgrade() else {
            return Poll::Ready(());
        };
        if s.dropped.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        s.fan.drainer.register(cx.waker());
        let mut inner = s.lock();
        match inner.state() {
            StreamState::RemoteClosing | StreamState::Closed | StreamState::Reset => {
                return Poll::Ready(());
            }
            _ => {}
        }
        let mut one = [0u8; 1];
        let mut fcx = Context::from_waker(&s.waker);
        // Peeking pulls every queued frame into the buffer and registers for more;
        // what it copies is not consumed.
        let _ = inner.poll_peek(&mut fcx, &mut ReadBuf::new(&mut one));
        Poll::Pending
    })
    .await
}

impl AsyncRead for YStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.shared.fan.reader.register(cx.waker());
        self.with_inner(|inner, fcx| Pin::new(inner).poll_read(fcx, buf))
    }
}

impl AsyncWrite for YStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.shared.fan.writer.register(cx.waker());
        if !self.session.alive.load(Ordering::Acquire) {
            return Poll::Ready(Err(broken("the yamux session has ended")));
        }
        self.with_inner(|inner, fcx| {
            for _ in 0..2 {
                if let Poll::Ready(r) = Pin::new(&mut *inner).poll_write(fcx, buf) {
                    return Poll::Ready(r);
                }
                // Out of send window. tokio-yamux ignores frames once the peer has
                // half-closed, so no window update can ever free this writer.
                if inner.state() == StreamState::RemoteClosing {
                    return Poll::Ready(Err(broken("the peer closed the stream")));
                }
                // Process what has arrived (a window update, a reset) and register
                // for what comes next.
                let mut one = [0u8; 1];
                if let Poll::Ready(Err(e)) = inner.poll_peek(fcx, &mut ReadBuf::new(&mut one)) {
                    return Poll::Ready(Err(e));
                }
                if inner.send_window() == 0 {
                    return Poll::Pending;
                }
            }
            Poll::Pending
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shut {
            return Poll::Ready(Ok(()));
        }
        self.shut = true;
        self.with_inner(|inner, fcx| Pin::new(inner).poll_shutdown(fcx))
    }
}

impl Drop for YStream {
    fn drop(&mut self) {
        self.shared.dropped.store(true, Ordering::Release);
        if !self.reset && !self.shut {
            // A FIN; dropping the inner handle without one sends RST.
            self.with_inner(|inner, fcx| {
                let _ = Pin::new(inner).poll_shutdown(fcx);
            });
        }
        self.shared.fan.drainer.wake();
        self.session.stream_closed(self.primary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Inbound = tokio::sync::mpsc::UnboundedReceiver<YStream>;

    /// A server and a client session over an in-memory pipe, with the streams each
    /// side's peer opens.
    fn pair() -> (Session, Inbound, Session, Inbound) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (stx, srx) = tokio::sync::mpsc::unbounded_channel();
        let (ctx, crx) = tokio::sync::mpsc::unbounded_channel();
        let server = Session::start(a, Role::Server, server_config(), move |s| {
            let _ = stx.send(s);
        });
        let client = Session::start(b, Role::Client, client_config(), move |s| {
            let _ = ctx.send(s);
        });
        (server, srx, client, crx)
    }

    #[tokio::test]
    async fn settings_are_gitalys() {
        let s = server_config();
        assert_eq!(s.accept_backlog, 1);
        assert!(!s.enable_keepalive);
        assert_eq!(s.max_stream_window_size, 16 << 20);
        let c = client_config();
        assert_eq!(c.accept_backlog, 256);
        assert!(!c.enable_keepalive);
        assert_eq!(c.max_stream_window_size, 256 << 10);
    }

    /// The server sends 32 client windows while the client reads slowly and never
    /// writes: every window update must reach the writer by itself.
    #[tokio::test]
    async fn a_lone_writer_gets_its_window_updates() {
        let (server, _, _client, mut inbound) = pair();
        let mut out = server.open().await.unwrap();
        let total = 32 * INITIAL_WINDOW as usize;
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 100_000];
            let mut sent = 0;
            while sent < total {
                let n = chunk.len().min(total - sent);
                out.write_all(&chunk[..n]).await.unwrap();
                sent += n;
            }
            out.shutdown().await.unwrap();
            out
        });
        let mut inb = inbound.recv().await.unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 10_000];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), inb.read(&mut buf))
                .await
                .expect("the writer stalled")
                .unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        assert_eq!(got, total);
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .unwrap()
            .unwrap();
    }

    /// A writer blocked on window must fail when the session ends.
    #[tokio::test]
    async fn a_blocked_writer_fails_when_the_session_ends() {
        let (server, _, client, mut inbound) = pair();
        let mut out = server.open().await.unwrap();
        let _inb = inbound.recv().await.unwrap();
        let writer = tokio::spawn(async move {
            let chunk = vec![1u8; 64 * 1024];
            loop {
                if let Err(e) = out.write_all(&chunk).await {
                    return e;
                }
            }
        });
        // Nobody reads: the writer fills the client's window, then waits.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!writer.is_finished());
        client.close();
        let e = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer must be woken")
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        tokio::time::timeout(Duration::from_secs(5), server.ended())
            .await
            .unwrap();
    }

    /// An idle stream (nobody polls it) with data queued must not stop the session
    /// from delivering other streams' data.
    #[tokio::test]
    async fn an_idle_stream_does_not_stall_the_session() {
        let (_server, mut inbound, client, _) = pair();
        let mut first = client.open().await.unwrap();
        let mut second = client.open().await.unwrap();
        // 64 frames on the first stream, far more than tokio-yamux's 8-frame queue.
        for _ in 0..64 {
            first.write_all(&[3u8; 16 * 1024]).await.unwrap();
        }
        second.write_all(b"ping").await.unwrap();
        let idle = inbound.recv().await.unwrap();
        let mut busy = inbound.recv().await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), busy.read_exact(&mut buf))
            .await
            .expect("the second stream's data must arrive")
            .unwrap();
        assert_eq!(&buf, b"ping");
        drop(idle);
    }

    #[tokio::test]
    async fn reset_fails_the_peer_and_drop_ends_it() {
        let (server, mut inbound, client, _) = pair();
        let mut a = client.open().await.unwrap();
        a.write_all(b"x").await.unwrap();
        let mut inb = inbound.recv().await.unwrap();
        let mut one = [0u8; 1];
        inb.read_exact(&mut one).await.unwrap();
        a.reset();
        let e = tokio::time::timeout(Duration::from_secs(5), inb.read(&mut one))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        drop(inb);

        let mut b = client.open().await.unwrap();
        b.write_all(b"bye").await.unwrap();
        drop(b);
        let mut inb = inbound.recv().await.unwrap();
        let mut all = Vec::new();
        inb.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"bye");
        drop(inb);
        drop(inbound);
        // Every stream handle is gone on both sides.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while server.open_streams() + client.open_streams() > 0 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
