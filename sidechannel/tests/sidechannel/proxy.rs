//! A router between a caller and a node, Praefect's way: sidechannel client toward
//! the node, sidechannel server toward the caller, bytes copied between the two.

use std::time::Duration;

use refvote_sidechannel::client::ClientSidechannel;
use refvote_sidechannel::{
    BackchannelClient, DialOptions, ListenConfig, dial, proxy, server, status,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::roundtrip::echo;
use crate::support::{TestServer, TestService, alive_tasks, data, serve, settles};

/// Forwards `check` to the node as `echo:<rpc>` and proxies its sidechannel.
#[derive(Clone)]
struct Router {
    node: BackchannelClient,
    sessions: TestService,
}

#[tonic::async_trait]
impl Health for Router {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let rpc = match request.get_ref().service.as_str() {
            "echo:ssh" => status::FetchRpc::SshUploadPack,
            _ => status::FetchRpc::PostUploadPack,
        };
        if let Some(s) = request
            .extensions()
            .get::<refvote_sidechannel::ConnInfo>()
            .and_then(|i| i.backchannel())
        {
            self.sessions.sessions.lock().unwrap().push(s.clone());
        }
        // The forwarded call carries the caller's metadata, its sidechannel id
        // included; the router's own id replaces it.
        let mut forward = Request::new(request.get_ref().clone());
        *forward.metadata_mut() = request.metadata().clone();
        let waiter = self.node.register();
        waiter.attach(forward.metadata_mut());
        let mut node = HealthClient::new(self.node.channel());
        let (answer, side) = waiter
            .serve(node.check(forward), |up: ClientSidechannel| async {
                let down = server::open(&request)
                    .await
                    .map_err(|e| status::open_failed(rpc, &e))?;
                proxy(up, down).await.map_err(|e| status::proxy_failed(&e))
            })
            .await;
        // The node's own error first; a proxy failure counts when the node succeeded.
        let answer = answer?;
        if let Some(Err(e)) = side {
            return Err(e);
        }
        Ok(answer)
    }

    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

struct Setup {
    node: TestServer,
    router_seen: TestService,
    caller: BackchannelClient,
    _stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn setup() -> Setup {
    let node = TestServer::start(None).await;
    let to_node = dial(node.endpoint(), DialOptions::default()).await.unwrap();
    let router_seen = TestService::default();
    let router = Router {
        node: to_node,
        sessions: router_seen.clone(),
    };
    let (addr, stop, task) = serve(HealthServer::new(router), None, ListenConfig::default());
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let caller = dial(endpoint, DialOptions::default()).await.unwrap();
    Setup {
        node,
        router_seen,
        caller,
        _stop: stop,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_proxies_mebibytes_both_ways() {
    let s = setup().await;
    let input = data(12 << 20, 21);
    assert!(echo(&s.caller, "http", input.clone()).await == input);
    let small = data(70_000, 22);
    assert_eq!(echo(&s.caller, "ssh", small.clone()).await, small);
    assert_eq!(echo(&s.caller, "http", Vec::new()).await, Vec::<u8>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_caller_ends_both_sides_promptly() {
    let s = setup().await;
    let warm = data(100_000, 23);
    assert!(echo(&s.caller, "http", warm.clone()).await == warm);
    let node_session = s.node.last_session();
    let router_session = s
        .router_seen
        .sessions
        .lock()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    let caller_session = s.caller.session().clone();
    let streams = || {
        (
            node_session.open_streams()
                + router_session.open_streams()
                + caller_session.open_streams(),
            3,
        )
    };
    settles(usize::MAX, "warm-up", streams).await;
    let baseline = alive_tasks();

    for how in ["reset", "garbage", "vanish"] {
        let waiter = s.caller.register();
        let mut req = Request::new(HealthCheckRequest {
            service: "echo:http".into(),
        });
        waiter.attach(req.metadata_mut());
        let mut health = HealthClient::new(s.caller.channel());
        let started = tokio::time::Instant::now();
        let (answer, side) = waiter
            .serve(health.check(req), |sc: ClientSidechannel| async move {
                let mut raw = sc.into_raw();
                // A megabyte through the router and back, then the failure.
                let chunk = data(60_000, 24);
                let mut framed = Vec::new();
                framed.extend_from_slice(b"ea64");
                framed.extend_from_slice(&chunk);
                for _ in 0..16 {
                    raw.write_all(&framed).await.unwrap();
                }
                let mut back = vec![0u8; 16 * 60_000];
                raw.read_exact(&mut back).await.unwrap();
                assert!(back.chunks(60_000).all(|c| c == chunk.as_slice()));
                match how {
                    "reset" => raw.reset(),
                    "garbage" => {
                        raw.write_all(b"zzzz").await.unwrap();
                        let mut rest = Vec::new();
                        let _ = raw.read_to_end(&mut rest).await;
                    }
                    _ => {
                        // FIN without 0000.
                        raw.shutdown().await.unwrap();
                        let mut rest = Vec::new();
                        let _ = raw.read_to_end(&mut rest).await;
                    }
                }
            })
            .await;
        assert!(side.is_some());
        let e = answer.unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "{how}: took {took:?}");
        // The node saw its sidechannel fail: its error reaches the caller.
        assert_eq!(e.code(), Code::FailedPrecondition, "{how}: {e:?}");
        settles(baseline, how, streams).await;
    }
    // And the path still works.
    assert!(echo(&s.caller, "http", warm.clone()).await == warm);
}
