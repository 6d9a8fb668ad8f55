//! What the tests share: a Gitaly-shaped test service behind the multiplexed
//! listener, test data, task accounting, and a throw-away TLS CA (openssl CLI).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use refvote_sidechannel::listen::{self, ConnInfo, ListenConfig, MuxIncoming};
use refvote_sidechannel::mux::Session;
use refvote_sidechannel::{FetchRpc, server, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// What a test service answers depends on `HealthCheckRequest.service`
/// (the test stands in for a Gitaly RPC with the health service, as Gitaly's own
/// sidechannel tests do):
/// - `""`: SERVING, no sidechannel.
/// - `"kind"`: SERVING on a backchannel connection, NOT_SERVING on plain HTTP/2.
/// - `"echo:http"` / `"echo:ssh"`: opens the sidechannel, writes back everything the
///   client sends as it arrives, ends after the client's `0000`; failures are
///   mapped as `PostUploadPackWithSidechannel` / `SSHUploadPackWithSidechannel` map
///   them.
/// - `"stall:http"`: opens the sidechannel, then gives the client 300 ms for its
///   data (Gitaly's upload-pack negotiation deadline, shortened) and answers
///   DEADLINE_EXCEEDED.
#[derive(Clone, Default)]
pub struct TestService {
    /// The backchannel sessions calls came on.
    pub sessions: Arc<Mutex<Vec<Session>>>,
}

pub fn rpc(name: &str) -> FetchRpc {
    match name {
        "ssh" => FetchRpc::SshUploadPack,
        "http" => FetchRpc::PostUploadPack,
        other => panic!("unknown rpc {other}"),
    }
}

fn answer(status: ServingStatus) -> Result<Response<HealthCheckResponse>, Status> {
    Ok(Response::new(HealthCheckResponse {
        status: status as i32,
    }))
}

#[tonic::async_trait]
impl Health for TestService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        // Absent only where a test serves this service without the listener.
        let backchannel = match request.extensions().get::<ConnInfo>() {
            Some(info) => info.backchannel().cloned(),
            None => None,
        };
        if let Some(s) = &backchannel {
            self.sessions.lock().unwrap().push(s.clone());
        }
        let service = request.get_ref().service.clone();
        match service.split_once(':') {
            None if service.is_empty() => answer(ServingStatus::Serving),
            None if service == "kind" => answer(if backchannel.is_some() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }),
            Some(("echo", which)) => {
                let rpc = rpc(which);
                let mut sc = server::open(&request)
                    .await
                    .map_err(|e| status::open_failed(rpc, &e))?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = sc
                        .read(&mut buf)
                        .await
                        .map_err(|e| status::transfer_failed(rpc, &e))?;
                    if n == 0 {
                        break;
                    }
                    sc.write_all(&buf[..n])
                        .await
                        .map_err(|e| status::transfer_failed(rpc, &e))?;
                }
                sc.shutdown()
                    .await
                    .map_err(|e| status::transfer_failed(rpc, &e))?;
                answer(ServingStatus::Serving)
            }
            Some(("stall", which)) => {
                let rpc = rpc(which);
                let mut sc = server::open(&request)
                    .await
                    .map_err(|e| status::open_failed(rpc, &e))?;
                let mut buf = [0u8; 1024];
                match tokio::time::timeout(Duration::from_millis(300), sc.read(&mut buf)).await {
                    Err(_) => Err(Status::deadline_exceeded(
                        "waiting for negotiation: the client sent nothing",
                    )),
                    Ok(r) => Err(Status::internal(format!("unexpected read {r:?}"))),
                }
            }
            _ => Err(Status::not_found(format!("no test behaviour {service:?}"))),
        }
    }

    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

/// Serves `svc` on a loopback port behind the multiplexed listener, until the
/// sender fires.
pub fn serve<H: Health>(
    svc: HealthServer<H>,
    tls: Option<TlsAcceptor>,
    config: ListenConfig,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, JoinHandle<()>) {
    let listener = listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let incoming = MuxIncoming::new(listener, tls, config).unwrap();
    let addr = incoming.local_addr().unwrap();
    let (stop, task) = serve_incoming(svc, incoming);
    (addr, stop, task)
}

/// Serves `svc` on `incoming` until the sender fires.
pub fn serve_incoming<H: Health>(
    svc: HealthServer<H>,
    incoming: MuxIncoming,
) -> (tokio::sync::oneshot::Sender<()>, JoinHandle<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (stop, task)
}

/// The test service on a loopback port behind the multiplexed listener.
pub struct TestServer {
    pub addr: SocketAddr,
    pub service: TestService,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub async fn start(tls: Option<TlsAcceptor>) -> TestServer {
        Self::start_with(tls, ListenConfig::default()).await
    }

    pub async fn start_with(tls: Option<TlsAcceptor>, config: ListenConfig) -> TestServer {
        let service = TestService::default();
        let (addr, stop, task) = serve(HealthServer::new(service.clone()), tls, config);
        TestServer {
            addr,
            service,
            stop: Some(stop),
            task,
        }
    }

    pub fn endpoint(&self) -> tonic::transport::Endpoint {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).unwrap()
    }

    /// The backchannel session of the latest call.
    pub fn last_session(&self) -> Session {
        self.service
            .sessions
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a call came on a backchannel connection")
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the server drains in time")
            .unwrap();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Deterministic, incompressible-looking test bytes.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Tasks alive in this test's runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits (bounded) until no more than `baseline` tasks are alive, and until
/// `streams()` reports `want`; panics with what is left otherwise.
pub async fn settles(baseline: usize, what: &str, mut streams: impl FnMut() -> (usize, usize)) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (got, want) = streams();
        let tasks = alive_tasks();
        if tasks <= baseline && got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {tasks} tasks alive (baseline {baseline}), {got} streams open (want {want})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A CA, and a certificate for 127.0.0.1 / localhost it signed, made with openssl.
pub struct TestCa {
    pub dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=sidechannel test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        TestCa { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed for the TLS tests");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
