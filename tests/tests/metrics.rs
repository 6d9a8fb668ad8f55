//! Observability against real processes: after real git pushes through a real router
//! (one with a node killed), the router's and a node's Prometheus `/metrics` carry
//! every documented series with values that match what happened, the router answers
//! gRPC health on its gRPC port, and the metrics port answers only `/metrics`.

use std::collections::BTreeMap;

use refvote_tests::cluster::VoteCluster;
use refvote_tests::git;
use refvote_tests::metrics::{get, scrape};
use refvote_tests::router::Router;
use refvote_tests::smarthttp::{GitHttpProxy, Target};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("{series} is missing from:\n{samples:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_node_and_a_router_after_pushes_match_what_happened() -> anyhow::Result<()> {
    let mut c = VoteCluster::start(3, 1).await?;
    c.create_repo("m.git").await?;
    let router = Router::start("router1", c.dir.path(), &c.etcd.endpoints()).await?;

    // Before any call: every series a dashboard relies on is there, at zero.
    let r = scrape(router.metrics_addr()).await?;
    for series in [
        "refvote_router_transactions_in_flight",
        "refvote_router_transactions_total{outcome=\"acknowledged\"}",
        "refvote_router_replicas_marked_outdated_total",
        "refvote_router_repair_jobs",
        "refvote_router_grpc_call_duration_seconds_count",
        "refvote_router_etcd_errors_total{kind=\"timeout\"}",
    ] {
        assert_eq!(value(&r, series), 0.0, "{series}");
    }
    assert_eq!(value(&r, "refvote_router_lease_held"), 1.0);

    let http = GitHttpProxy::start(vec![Target {
        url: router.grpc_url(),
        storage: "default".into(),
        transaction: None,
    }])
    .await?;
    let url = http.url("m.git");
    let work = c.work("w")?;
    work.commit("main", "first")?;
    let out = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]).await?;
    assert!(out.status.success(), "{out:?}\n{}", router.log_tail(30));
    // With node3 gone the write still succeeds on two of three; node3 is outdated.
    c.nodes[2].kill()?;
    work.commit("main", "second")?;
    let out = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]).await?;
    assert!(out.status.success(), "{out:?}\n{}", router.log_tail(30));

    let r = scrape(router.metrics_addr()).await?;
    let receive = "method=\"/gitaly.SmartHTTPService/PostReceivePack\",code=\"OK\"";
    assert_eq!(
        value(&r, &format!("refvote_router_grpc_calls_total{{{receive}}}")),
        2.0
    );
    let calls: f64 = r
        .iter()
        .filter(|(k, _)| k.starts_with("refvote_router_grpc_calls_total{"))
        .map(|(_, v)| v)
        .sum();
    // info/refs before each push, the two pushes; the histogram saw every call.
    assert!(calls >= 4.0, "{r:#?}");
    assert_eq!(
        value(&r, "refvote_router_grpc_call_duration_seconds_count"),
        calls
    );
    assert_eq!(
        value(
            &r,
            "refvote_router_grpc_call_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        calls
    );
    assert_eq!(
        value(
            &r,
            "refvote_router_transactions_total{outcome=\"acknowledged\"}"
        ),
        2.0
    );
    assert_eq!(value(&r, "refvote_router_transactions_in_flight"), 0.0);
    assert_eq!(
        value(&r, "refvote_router_replicas_marked_outdated_total"),
        1.0
    );
    assert!(value(&r, "refvote_router_repair_jobs") >= 1.0, "{r:#?}");

    // A made-up method is refused and counted under its code.
    let ch = router.channel().await?;
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await?;
    let err = grpc
        .unary::<(), (), _>(
            tonic::Request::new(()),
            "/gitaly.NoSuchService/Nope".parse()?,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let r = scrape(router.metrics_addr()).await?;
    assert_eq!(
        value(
            &r,
            "refvote_router_grpc_calls_total{method=\"/gitaly.NoSuchService/Nope\",code=\"Unimplemented\"}"
        ),
        1.0
    );

    // gRPC health on the router's own gRPC port.
    let health = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);

    // node1 voted on both pushes and won both.
    let n = scrape(c.nodes[0].metrics_addr()).await?;
    let commits = value(&n, "votingd_votes_total{outcome=\"commit\"}");
    assert!(commits >= 2.0, "{n:#?}");
    for outcome in ["abort", "lost", "timeout", "error"] {
        assert_eq!(
            value(&n, &format!("votingd_votes_total{{outcome=\"{outcome}\"}}")),
            0.0,
            "{outcome}"
        );
    }
    let votes = value(&n, "votingd_vote_duration_seconds_count");
    assert!(votes >= commits, "{n:#?}");
    let sum = value(&n, "votingd_vote_duration_seconds_sum");
    assert!(sum > 0.0 && sum < 60.0 * votes, "{n:#?}");
    assert!(value(&n, "votingd_confirmations_total") >= commits);
    assert_eq!(value(&n, "votingd_votes_waiting"), 0.0);
    assert!(n.contains_key("votingd_transactions_in_flight"));
    assert_eq!(value(&n, "votingd_lease_held"), 1.0);
    assert!(n.contains_key("votingd_etcd_errors_total{kind=\"unavailable\"}"));

    // Only /metrics is served there.
    let (status, _) = get(c.nodes[0].metrics_addr(), "/").await?;
    assert_eq!(status, 404);
    Ok(())
}
