//! The handshakes byte for byte, against literal bytes taken from Gitaly's sources.
//! The peer on the other end is hand-rolled here on tokio-yamux directly, so the
//! checks do not go through the crate's own client or server code.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use refvote_sidechannel::{DialOptions, dial};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_yamux::StreamHandle;
use tonic::transport::server::Connected;
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;

use crate::support::{TestServer, TestService};

// internal/grpc/backchannel/backchannel.go: `magicBytes = []byte("backchannel")`,
// written by the client right after TLS.
const BACKCHANNEL: &[u8; 11] = b"backchannel";
// internal/grpc/sidechannel/sidechannel.go: `magicBytes = []byte("sidechannel")`,
// then `binary.Write(stream, binary.BigEndian, sidechannelID)` with an int64 id.
const SIDECHANNEL: &[u8; 11] = b"sidechannel";
// internal/grpc/sidechannel/registry.go: the waiter writes `[]byte("ok")`.
const OK: &[u8; 2] = b"ok";
// internal/grpc/sidechannel/conn.go: "0009Hello0000", a 4-hex length counting
// itself, the data, and the flush packet (internal/git/pktline: `PktFlush() "0000"`).
const HELLO_CHUNKED: &[u8] = b"0009hello0000";

/// tonic needs `Connected` on what it serves; a bare yamux stream has nothing to say.
struct Bare(StreamHandle);

impl Connected for Bare {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for Bare {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bare {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Drives a raw yamux session; streams the peer opens come out of the receiver.
fn drive<T>(mut session: tokio_yamux::Session<T>) -> mpsc::UnboundedReceiver<StreamHandle>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(stream)) = session.next().await {
            if tx.send(stream).is_err() {
                break;
            }
        }
    });
    rx
}

/// A client dialing like gitlab-shell, by hand: magic, yamux client, gRPC on the
/// first stream; server-opened streams are returned untouched.
async fn raw_client(addr: std::net::SocketAddr) -> (Channel, Inbound) {
    raw_client_on(TcpStream::connect(addr).await.unwrap()).await
}

type Channel = tonic::transport::Channel;
type Inbound = mpsc::UnboundedReceiver<StreamHandle>;

async fn raw_client_on<T>(mut tcp: T) -> (Channel, Inbound)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tcp.write_all(BACKCHANNEL).await.unwrap();
    let config = tokio_yamux::Config {
        enable_keepalive: false,
        ..Default::default()
    };
    let session = tokio_yamux::Session::new_client(tcp, config);
    let mut control = session.control();
    let inbound = drive(session);
    let grpc = control.open_stream().await.unwrap();
    let once = Arc::new(Mutex::new(Some(grpc)));
    let connector = tower::service_fn(move |_: http::Uri| {
        let s = once.lock().unwrap().take();
        async move {
            s.map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| io::Error::other("dialed once"))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://raw")
        .connect_with_connector(connector)
        .await
        .unwrap();
    (channel, inbound)
}

fn echo_call(service: &str, ids: &[&str]) -> Request<HealthCheckRequest> {
    let mut req = Request::new(HealthCheckRequest {
        service: service.into(),
    });
    for id in ids {
        req.metadata_mut()
            .append("gitaly-sidechannel-id", id.parse().unwrap());
    }
    req
}

/// The server's side: it opens the stream, names the id, waits for `ok`, reads
/// chunks up to `0000`, answers raw and closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_speaks_gitalys_bytes() {
    let server = TestServer::start(None).await;
    let (channel, mut inbound) = raw_client(server.addr).await;
    // 0x0102030405060708; a proxy's earlier value comes first, the last one counts.
    let call = tokio::spawn(async move {
        HealthClient::new(channel)
            .check(echo_call("echo:http", &["999", "72623859790382856"]))
            .await
    });
    let mut stream = inbound.recv().await.unwrap();
    let mut hello = [0u8; 19];
    stream.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello[..11], SIDECHANNEL);
    assert_eq!(&hello[11..], &[1, 2, 3, 4, 5, 6, 7, 8]);
    stream.write_all(OK).await.unwrap();
    stream.write_all(HELLO_CHUNKED).await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"hello", "raw bytes back, then the end of the stream");
    let answer = call.await.unwrap().unwrap().into_inner();
    assert_eq!(answer.status, ServingStatus::Serving as i32);
    server.stop().await;
}

/// A client that never confirms: the server gives up after Gitaly's 5 s and
/// answers each RPC's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_sidechannel_times_out_after_five_seconds() {
    let server = TestServer::start(None).await;
    let (channel, mut inbound) = raw_client(server.addr).await;
    let started = tokio::time::Instant::now();
    let calls = ["http", "ssh"].map(|rpc| {
        let channel = channel.clone();
        tokio::spawn(async move {
            HealthClient::new(channel)
                .check(echo_call(&format!("echo:{rpc}"), &["7"]))
                .await
        })
    });
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = inbound.recv().await.unwrap();
        let mut hello = [0u8; 19];
        s.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello[..11], SIDECHANNEL);
        held.push(s); // and say nothing
    }
    let [http, ssh] = calls;
    let http = http.await.unwrap().unwrap_err();
    let ssh = ssh.await.unwrap().unwrap_err();
    let took = started.elapsed();
    assert_eq!(http.code(), Code::Unavailable, "{http:?}");
    assert_eq!(ssh.code(), Code::Aborted, "{ssh:?}");
    assert!(http.message().contains("did not confirm"), "{http:?}");
    assert!(
        took >= Duration::from_millis(4900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    // The server reset the streams it gave up on.
    for mut s in held {
        let mut rest = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut rest))
            .await
            .unwrap();
        assert!(r.is_err() || r.unwrap() == 0);
    }
    assert_eq!(server.last_session().open_streams(), 1);
    server.stop().await;
}

/// A hand-rolled Gitaly-style server: checks the magic, runs yamux as the server and
/// gRPC (a health service) on the client's first stream.
async fn raw_server() -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Receiver<tokio_yamux::Control>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut magic = [0u8; 11];
        tcp.read_exact(&mut magic).await.unwrap();
        assert_eq!(&magic, BACKCHANNEL, "the client's first 11 bytes");
        let config = tokio_yamux::Config {
            accept_backlog: 1,
            enable_keepalive: false,
            max_stream_window_size: 16 << 20,
            ..Default::default()
        };
        let session = tokio_yamux::Session::new_server(tcp, config);
        let _ = tx.send(session.control());
        let mut inbound = drive(session);
        let grpc = inbound.recv().await.unwrap();
        tonic::transport::Server::builder()
            .add_service(HealthServer::new(TestService::default()))
            .serve_with_incoming(tokio_stream::once(Ok::<_, io::Error>(Bare(grpc))))
            .await
            .unwrap();
    });
    (addr, rx)
}

/// The client's side: `backchannel` first, `ok` to a sidechannel it registered,
/// chunks and `0000` for its data, raw bytes read back; streams it did not register
/// are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_speaks_gitalys_bytes() {
    let (addr, control) = raw_server().await;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let client = dial(endpoint, DialOptions::default()).await.unwrap();
    let mut control = control.await.unwrap();
    // gRPC works over the first stream.
    let answer = HealthClient::new(client.channel())
        .check(Request::new(HealthCheckRequest { service: "".into() }))
        .await
        .unwrap();
    assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);

    // A stream naming an id nobody registered is refused without "ok".
    let mut stray = control.open_stream().await.unwrap();
    stray.write_all(SIDECHANNEL).await.unwrap();
    stray.write_all(&12345i64.to_be_bytes()).await.unwrap();
    let mut two = [0u8; 2];
    let r = tokio::time::timeout(Duration::from_secs(5), stray.read(&mut two))
        .await
        .unwrap();
    assert!(
        r.is_err() || r.unwrap() == 0,
        "no confirmation for a stranger"
    );
    // So is one that is not a sidechannel (Gitaly's reverse gRPC dial).
    let mut h2 = control.open_stream().await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), h2.read(&mut two))
        .await
        .unwrap();
    assert!(r.is_err() || r.unwrap() == 0);

    let waiter = client.register();
    let id = waiter.id();
    let accepted = tokio::spawn(waiter.accept());
    let mut side = control.open_stream().await.unwrap();
    side.write_all(SIDECHANNEL).await.unwrap();
    side.write_all(&id.to_be_bytes()).await.unwrap();
    side.read_exact(&mut two).await.unwrap();
    assert_eq!(&two, OK);
    let mut sc = accepted.await.unwrap().unwrap();
    sc.write_all(b"hello").await.unwrap();
    sc.close_write().await.unwrap();
    let mut wire = vec![0u8; HELLO_CHUNKED.len()];
    side.read_exact(&mut wire).await.unwrap();
    assert_eq!(wire, HELLO_CHUNKED);
    side.write_all(b"world").await.unwrap();
    side.shutdown().await.unwrap();
    let mut back = Vec::new();
    sc.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"world");
    drop(sc);

    // 70000 bytes in one write: a full chunk (fff0 = 65520, header included), then
    // the remaining 4484 bytes (1188 = 4488), then the flush.
    let waiter = client.register();
    let id = waiter.id();
    let accepted = tokio::spawn(waiter.accept());
    let mut side = control.open_stream().await.unwrap();
    side.write_all(SIDECHANNEL).await.unwrap();
    side.write_all(&id.to_be_bytes()).await.unwrap();
    side.read_exact(&mut two).await.unwrap();
    let mut sc = accepted.await.unwrap().unwrap();
    let payload = crate::support::data(70_000, 9);
    let writer = tokio::spawn(async move {
        sc.write_all(&payload).await.unwrap();
        sc.close_write().await.unwrap();
        sc
    });
    let mut wire = Vec::new();
    let mut buf = [0u8; 8192];
    while !wire.ends_with(b"0000") || wire.len() < 70_000 + 12 {
        let n = side.read(&mut buf).await.unwrap();
        assert!(n > 0);
        wire.extend_from_slice(&buf[..n]);
    }
    let payload = crate::support::data(70_000, 9);
    assert_eq!(&wire[..4], b"fff0");
    assert_eq!(&wire[4..65520], &payload[..65516]);
    assert_eq!(&wire[65520..65524], b"1188");
    assert_eq!(&wire[65524..70008], &payload[65516..]);
    assert_eq!(&wire[70008..], b"0000");
    drop(writer.await.unwrap());
    assert_eq!(client.registry().waiting(), 0);
}

/// The local socket takes both kinds too (Gitaly's `socket_path`, which
/// gitlab-shell may dial with the backchannel handshake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_takes_both_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gitaly.socket");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let incoming = refvote_sidechannel::MuxIncoming::unix(
        listener,
        refvote_sidechannel::ListenConfig::default(),
    );
    assert!(incoming.local_addr().is_none());
    let service = TestService::default();
    let (stop, task) = crate::support::serve_incoming(HealthServer::new(service.clone()), incoming);

    let unix = path.clone();
    let plain = tonic::transport::Endpoint::from_static("http://local")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let unix = unix.clone();
            async move {
                tokio::net::UnixStream::connect(unix)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap();
    let kind = HealthClient::new(plain)
        .check(Request::new(HealthCheckRequest {
            service: "kind".into(),
        }))
        .await
        .unwrap();
    assert_eq!(kind.into_inner().status, ServingStatus::NotServing as i32);

    let (channel, mut inbound) =
        raw_client_on(tokio::net::UnixStream::connect(&path).await.unwrap()).await;
    let call = tokio::spawn(async move {
        HealthClient::new(channel)
            .check(echo_call("echo:ssh", &["5"]))
            .await
    });
    let mut stream = inbound.recv().await.unwrap();
    let mut hello = [0u8; 19];
    stream.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello[..11], SIDECHANNEL);
    assert_eq!(&hello[11..], &5i64.to_be_bytes());
    stream.write_all(OK).await.unwrap();
    stream.write_all(HELLO_CHUNKED).await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hello");
    assert_eq!(
        call.await.unwrap().unwrap().into_inner().status,
        ServingStatus::Serving as i32
    );
    assert!(!service.sessions.lock().unwrap().is_empty());
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}
