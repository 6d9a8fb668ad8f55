//! Clients that misbehave on an open sidechannel get Gitaly's codes, and nothing is
//! left behind: no task, no stream, no registration.

use std::time::Duration;

use refvote_sidechannel::client::ClientSidechannel;
use refvote_sidechannel::{BackchannelClient, DialOptions, dial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::roundtrip::echo;
use crate::support::{TestServer, alive_tasks, data, settles};

/// What the client does with the sidechannel once it is open.
#[derive(Debug, Clone, Copy)]
enum Misbehaviour {
    /// `0001`: a git delim packet, not sidechannel data.
    SpecialPacket,
    /// Not a length at all.
    Garbage,
    /// Half a chunk, then the end of the stream (yamux FIN).
    Truncated,
    /// A whole chunk, then the end of the stream without `0000`.
    NoFlush,
    /// Some data, then a yamux reset.
    Reset,
    /// Nothing at all, the connection kept open.
    Stall,
}

async fn misbehave(
    client: &BackchannelClient,
    service: &str,
    how: Misbehaviour,
) -> (tonic::Status, Duration) {
    let waiter = client.register();
    let mut req = Request::new(HealthCheckRequest {
        service: service.into(),
    });
    waiter.attach(req.metadata_mut());
    let mut health = HealthClient::new(client.channel());
    let started = tokio::time::Instant::now();
    let (answer, opened) = waiter
        .serve(health.check(req), |sc: ClientSidechannel| async move {
            let mut raw = sc.into_raw();
            match how {
                Misbehaviour::SpecialPacket => raw.write_all(b"0009hello0001").await.unwrap(),
                Misbehaviour::Garbage => raw.write_all(b"PACK\x00\x00\x00\x02").await.unwrap(),
                Misbehaviour::Truncated => {
                    raw.write_all(b"0009hel").await.unwrap();
                    raw.shutdown().await.unwrap();
                }
                Misbehaviour::NoFlush => {
                    raw.write_all(b"0009hello").await.unwrap();
                    raw.shutdown().await.unwrap();
                }
                Misbehaviour::Reset => {
                    raw.write_all(b"0009hello").await.unwrap();
                    // Let the server read it before the reset.
                    let mut echo = [0u8; 5];
                    raw.read_exact(&mut echo).await.unwrap();
                    assert_eq!(&echo, b"hello");
                    raw.reset();
                    return;
                }
                Misbehaviour::Stall => {}
            }
            // Whatever the server does next (ends or resets the stream), it must
            // not leave us waiting.
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest))
                .await
                .expect("the server ends the sidechannel");
        })
        .await;
    assert!(
        opened.is_some(),
        "{how:?}: the server opened the sidechannel"
    );
    (answer.unwrap_err(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_get_gitalys_codes_and_leave_nothing_running() {
    let server = TestServer::start(None).await;
    let client = dial(server.endpoint(), DialOptions::default())
        .await
        .unwrap();
    // Warm up: the connection's own tasks exist from here on.
    let input = data(1 << 20, 5);
    assert!(echo(&client, "http", input.clone()).await == input);
    let (server_session, client_session) = (server.last_session(), client.session().clone());
    let streams = || {
        (
            server_session.open_streams() + client_session.open_streams(),
            2,
        )
    };
    settles(usize::MAX, "warm-up", streams).await;
    let baseline = alive_tasks();

    use Misbehaviour::*;
    // (what the client does, the RPC's kind, the code Gitaly answers, a message part)
    let cases = [
        (
            SpecialPacket,
            "http",
            Code::FailedPrecondition,
            "invalid header 1",
        ),
        (SpecialPacket, "ssh", Code::Internal, "invalid header 1"),
        (
            Garbage,
            "http",
            Code::FailedPrecondition,
            "invalid chunk length",
        ),
        (Garbage, "ssh", Code::Internal, "invalid chunk length"),
        (
            Truncated,
            "http",
            Code::FailedPrecondition,
            "inside a chunk",
        ),
        (Truncated, "ssh", Code::Cancelled, "user canceled"),
        (NoFlush, "http", Code::FailedPrecondition, "no 0000"),
        (NoFlush, "ssh", Code::Cancelled, "user canceled"),
        (Reset, "http", Code::FailedPrecondition, ""),
        (Reset, "ssh", Code::Cancelled, "user canceled"),
    ];
    for (how, rpc, code, part) in cases {
        let (status, took) = misbehave(&client, &format!("echo:{rpc}"), how).await;
        assert_eq!(status.code(), code, "{how:?} on {rpc}: {status:?}");
        assert!(
            status.message().contains(part),
            "{how:?} on {rpc}: {:?} lacks {part:?}",
            status.message()
        );
        assert!(
            took < Duration::from_secs(2),
            "{how:?} on {rpc} took {took:?}"
        );
        settles(baseline, &format!("after {how:?} on {rpc}"), streams).await;
        assert_eq!(client.registry().waiting(), 0);
    }

    // Opened, then silent: the handler's deadline (Gitaly's negotiation timeout).
    let (status, took) = misbehave(&client, "stall:http", Stall).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3));
    settles(baseline, "after a stall", streams).await;

    // The connection still serves a good transfer afterwards.
    assert!(echo(&client, "ssh", input.clone()).await == input);
    settles(baseline, "after the last transfer", streams).await;
    server.stop().await;
}

/// Calls that cannot have a sidechannel: no id in the metadata, a bad id, or a plain
/// HTTP/2 connection (Rails dials so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_backchannel_or_an_id_are_refused() {
    let server = TestServer::start(None).await;
    let client = dial(server.endpoint(), DialOptions::default())
        .await
        .unwrap();
    let mut over_yamux = HealthClient::new(client.channel());
    let plain = server.endpoint().connect().await.unwrap();
    let mut plain = HealthClient::new(plain);
    for (rpc, code) in [("http", Code::Internal), ("ssh", Code::Aborted)] {
        let req = || {
            Request::new(HealthCheckRequest {
                service: format!("echo:{rpc}"),
            })
        };
        let e = over_yamux.check(req()).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains("gitaly-sidechannel-id"), "{e:?}");

        let mut bad = req();
        bad.metadata_mut()
            .insert("gitaly-sidechannel-id", "twelve".parse().unwrap());
        let e = over_yamux.check(bad).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains("\"twelve\""), "{e:?}");

        let mut with_id = req();
        with_id
            .metadata_mut()
            .insert("gitaly-sidechannel-id", "1".parse().unwrap());
        let e = plain.check(with_id).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains("backchannel"), "{e:?}");
    }
    // A registration the server never opens is withdrawn when the call ends.
    let waiter = client.register();
    let mut req = Request::new(HealthCheckRequest { service: "".into() });
    waiter.attach(req.metadata_mut());
    let (answer, side) = waiter
        .serve(over_yamux.check(req), |_sc| async {
            panic!("no sidechannel for this call")
        })
        .await;
    answer.unwrap();
    assert!(side.is_none());
    assert_eq!(client.registry().waiting(), 0);
    server.stop().await;
}

/// The server dies mid-transfer: the client's call fails, its sidechannel ends, and
/// the dead connection's channel does not dial again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_going_away_fails_the_client_cleanly() {
    let server = TestServer::start(None).await;
    let client = dial(server.endpoint(), DialOptions::default())
        .await
        .unwrap();
    let waiter = client.register();
    let mut req = Request::new(HealthCheckRequest {
        service: "echo:http".into(),
    });
    waiter.attach(req.metadata_mut());
    let mut health = HealthClient::new(client.channel());
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    let call = tokio::spawn(async move {
        waiter
            .serve(health.check(req), |mut sc: ClientSidechannel| async move {
                sc.write_all(b"hello").await.unwrap();
                let _ = opened_tx.send(());
                // Never finishes sending: only the server's end can end this.
                let mut buf = Vec::new();
                sc.read_to_end(&mut buf).await
            })
            .await
    });
    opened_rx.await.unwrap();
    let session = server.last_session();
    drop(server); // aborts the server task and its connections
    session.close();
    let (answer, side) = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the client notices")
        .unwrap();
    assert!(answer.is_err());
    assert!(side.is_some());
    tokio::time::timeout(Duration::from_secs(5), client.session().ended())
        .await
        .expect("the client's session ends");
    let e = HealthClient::new(client.channel())
        .check(Request::new(HealthCheckRequest { service: "".into() }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
}
