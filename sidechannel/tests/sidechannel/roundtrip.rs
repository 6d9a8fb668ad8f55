//! Both kinds of client on one port, and sidechannel transfers that work.

use std::time::Duration;

use refvote_sidechannel::client::{ClientSidechannel, DialOptions, TlsClient};
use refvote_sidechannel::{BackchannelClient, dial, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Request;
use tonic::transport::{Certificate, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::support::{TestCa, TestServer, alive_tasks, data, settles};

fn check(service: &str) -> Request<HealthCheckRequest> {
    Request::new(HealthCheckRequest {
        service: service.into(),
    })
}

fn status(r: Result<tonic::Response<HealthCheckResponse>, tonic::Status>) -> ServingStatus {
    ServingStatus::try_from(r.unwrap().into_inner().status).unwrap()
}

/// Sends `input` as the client data of an echo call and returns what came back.
/// Writing and reading run together: the server echoes as it reads, so a client
/// that wrote everything first would stall on the window.
pub async fn echo(client: &BackchannelClient, rpc: &str, input: Vec<u8>) -> Vec<u8> {
    let waiter = client.register();
    let mut req = check(&format!("echo:{rpc}"));
    waiter.attach(req.metadata_mut());
    let mut health = HealthClient::new(client.channel());
    let (answer, out) = waiter
        .serve(health.check(req), |sc: ClientSidechannel| async move {
            let (mut r, mut w) = tokio::io::split(sc);
            let write = async {
                for chunk in input.chunks(100_000) {
                    w.write_all(chunk).await.unwrap();
                }
                w.shutdown().await.unwrap();
            };
            let mut out = Vec::new();
            let read = r.read_to_end(&mut out);
            let ((), n) = tokio::join!(write, read);
            n.unwrap();
            out
        })
        .await;
    assert_eq!(status(answer), ServingStatus::Serving);
    out.expect("the server opened the sidechannel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_backchannel_clients_share_the_port() {
    let server = TestServer::start(None).await;
    // Rails' way: plain HTTP/2 gRPC.
    let plain = server.endpoint().connect().await.unwrap();
    let mut plain = HealthClient::new(plain);
    assert_eq!(status(plain.check(check("")).await), ServingStatus::Serving);
    assert_eq!(
        status(plain.check(check("kind")).await),
        ServingStatus::NotServing
    );
    // gitlab-shell's way: backchannel, gRPC on the first yamux stream.
    let bc = dial(server.endpoint(), DialOptions::default())
        .await
        .unwrap();
    let mut over_yamux = HealthClient::new(bc.channel());
    assert_eq!(
        status(over_yamux.check(check("kind")).await),
        ServingStatus::Serving
    );
    // Both keep working, interleaved.
    for _ in 0..3 {
        assert_eq!(status(plain.check(check("")).await), ServingStatus::Serving);
        assert_eq!(
            status(over_yamux.check(check("")).await),
            ServingStatus::Serving
        );
    }
    let session = server.last_session();
    assert!(session.is_alive());
    assert_eq!(session.open_streams(), 1, "only the gRPC stream");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_mebibytes_each_way() {
    let server = TestServer::start(None).await;
    let client = dial(server.endpoint(), DialOptions::default())
        .await
        .unwrap();
    // Larger than the server's 16 MiB window and 80 client windows.
    let input = data(20 << 20, 1);
    let out = echo(&client, "http", input.clone()).await;
    assert!(
        out == input,
        "echo differs ({} of {} bytes)",
        out.len(),
        input.len()
    );
    // The same connection serves the next call, and an SSH-style one.
    let small = data(1000, 2);
    assert_eq!(echo(&client, "ssh", small.clone()).await, small);
    assert_eq!(echo(&client, "http", Vec::new()).await, Vec::<u8>::new());
    let (server_session, client_session) = (server.last_session(), client.session().clone());
    settles(usize::MAX, "after the transfers", || {
        (
            server_session.open_streams() + client_session.open_streams(),
            2,
        )
    })
    .await;
    assert_eq!(client.registry().waiting(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sidechannels_on_one_connection() {
    let server = TestServer::start(None).await;
    let client = dial(server.endpoint(), DialOptions::default())
        .await
        .unwrap();
    let calls = (0..6u64).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let input = data(2 << 20, 10 + i);
            let out = echo(&client, "http", input.clone()).await;
            assert!(out == input, "call {i} got other bytes");
        })
    });
    for c in calls {
        tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .unwrap()
            .unwrap();
    }
    server.stop().await;
}

/// With TLS on the listener both kinds still work: the magic comes after the TLS
/// handshake, and ALPN says h2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_kinds_over_tls() {
    let ca = TestCa::new();
    let acceptor =
        tls::acceptor_from_pem(&ca.read("server.pem"), &ca.read("server.key"), None).unwrap();
    let server = TestServer::start(Some(acceptor)).await;
    let url = format!("https://localhost:{}", server.addr.port());
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca.read("ca.pem")))
                .domain_name("localhost"),
        )
        .unwrap();
    let mut plain = HealthClient::new(endpoint.connect().await.unwrap());
    assert_eq!(
        status(plain.check(check("kind")).await),
        ServingStatus::NotServing
    );
    let connector = tls::connector_from_pem(&ca.read("ca.pem"), None).unwrap();
    let options = DialOptions {
        tls: Some(TlsClient {
            connector,
            server_name: "localhost".try_into().unwrap(),
        }),
        ..DialOptions::default()
    };
    let bc = dial(
        tonic::transport::Endpoint::from_shared(format!("http://localhost:{}", server.addr.port()))
            .unwrap(),
        options,
    )
    .await
    .unwrap();
    let input = data(3 << 20, 3);
    assert!(echo(&bc, "http", input.clone()).await == input);
    // A plaintext backchannel client on a TLS port gets nowhere.
    let e = dial(
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", server.addr.port()))
            .unwrap(),
        DialOptions {
            connect_timeout: Duration::from_secs(3),
            ..DialOptions::default()
        },
    )
    .await
    .unwrap_err();
    eprintln!("plaintext against TLS: {e}");
    server.stop().await;
}

/// A connection that sends nothing is dropped after the handshake deadline, and
/// the listener serves others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_dropped_at_the_deadline() {
    let config = refvote_sidechannel::ListenConfig {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let server = TestServer::start_with(None, config).await;
    let baseline = alive_tasks();
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Fewer than 11 bytes, then nothing.
    silent.write_all(b"back").await.unwrap();
    let plain = server.endpoint().connect().await.unwrap();
    assert_eq!(
        status(HealthClient::new(plain).check(check("")).await),
        ServingStatus::Serving
    );
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf))
        .await
        .expect("the server closes the silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    drop(silent);
    settles(baseline, "after the silent connection", || (0, 0)).await;
    server.stop().await;
}
