//! votingd drains on SIGTERM the way the router does (real etcd, three real votingd,
//! a real router, real git): a node SIGTERMed while a push through the router is
//! mid-vote on it reports not ready at once (gRPC health NOT_SERVING, `draining` in
//! its etcd record), new pushes leave it out and succeed on the other two, the push in
//! flight finishes on it and is acknowledged (or refused cleanly, never lost), the node
//! revokes its lease and exits 0 within its drain timeout, and every acknowledged push
//! is on the majority.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use refvote_cluster::faults;
use refvote_cluster::records::NodeRecord;
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::hold::Hold;
use refvote_tests::node::NodeOptions;
use refvote_tests::proc::wait_until;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const REPO: &str = "drain/project.git";
const GRACE_SECS: u64 = 1;
const TIMEOUT_SECS: u64 = 20;

async fn grpc_health(url: String) -> anyhow::Result<ServingStatus> {
    let ch = tonic::transport::Channel::from_shared(url)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await?
        .into_inner()
        .status())
}

fn spawn_push(
    work: &WorkRepo,
    url: String,
    branch: &str,
) -> tokio::task::JoinHandle<anyhow::Result<std::process::Output>> {
    let (path, branch) = (work.path.clone(), branch.to_owned());
    tokio::spawn(async move { git::push(&path, Path::new(&url), &[branch.as_str()], &[]).await })
}

fn logs(c: &VoteCluster) -> String {
    let mut out = String::new();
    for n in &c.nodes {
        out.push_str(&format!("--- {} ---\n{}\n", n.name, n.log_tail(25)));
    }
    for r in &c.routers {
        out.push_str(&format!("--- router ---\n{}\n", r.log_tail(25)));
    }
    out
}

async fn node_record(c: &VoteCluster, node: &str) -> anyhow::Result<Option<NodeRecord>> {
    let key = c.store.keys().node(node);
    Ok(match c.store.get(&key).await? {
        Some(e) => Some(e.decode()?),
        None => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigtermed_node_finishes_the_push_in_flight_takes_no_new_one_and_exits_0()
-> anyhow::Result<()> {
    let opts = NodeOptions::default().config(|c| {
        c.drain_grace_secs = GRACE_SECS;
        c.drain_timeout_secs = TIMEOUT_SECS;
    });
    let mut c = Fixture::nodes(3)
        .node_options(opts)
        .router()
        .start()
        .await?;
    let (work, _) = c.create_and_push(&c.routers[0], REPO).await?;
    let url = c.routers[0].http_url(REPO);

    // node1 holds its hook's vote right after the key is decided: the push is in
    // flight on it, mid-vote, when the signal comes.
    let hold = Hold::new(faults::AFTER_DECISION, 1)?;
    c.nodes[0].stop()?;
    c.nodes[0].env = hold.env();
    c.nodes[0].launch().await?;
    wait_until("node1 votes again", Duration::from_secs(20), || async {
        node_record(&c, "node1").await.is_ok_and(|r| r.is_some())
    })
    .await?;

    git::git(&work.path, &["checkout", "--quiet", "-b", "b1", "main"])?;
    let b1 = work.commit("b1", "in flight at the SIGTERM")?;
    let first = spawn_push(&work, url.clone(), "b1");
    hold.wait_reached(Duration::from_secs(30))
        .await
        .with_context(|| logs(&c))?;
    ensure!(
        grpc_health(c.nodes[0].grpc_url()).await? == ServingStatus::Serving,
        "node1 was not serving before the signal"
    );

    let t0 = Instant::now();
    c.nodes[0].sigterm()?;
    // Not ready at once, while its listener still serves (the grace).
    wait_until("node1 reports NOT_SERVING", Duration::from_secs(5), || {
        let url = c.nodes[0].grpc_url();
        async move { grpc_health(url).await.ok() == Some(ServingStatus::NotServing) }
    })
    .await
    .with_context(|| logs(&c))?;
    let not_ready_after = t0.elapsed();
    ensure!(
        not_ready_after < Duration::from_secs(GRACE_SECS),
        "NOT_SERVING only after {not_ready_after:?}, past the grace"
    );
    let record = node_record(&c, "node1")
        .await?
        .context("node1's record vanished before its calls finished")?;
    ensure!(
        record.draining,
        "node1's etcd record is not marked draining"
    );

    // A push that begins during the drain leaves node1 out and succeeds on the others.
    git::git(&work.path, &["checkout", "--quiet", "-b", "b2", "main"])?;
    let b2 = work.commit("b2", "begun during the drain")?;
    let second = git::push(&work.path, Path::new(&url), &["b2"], &[]).await?;
    ensure!(
        second.status.success(),
        "a push begun during node1's drain failed: {}\n{}",
        String::from_utf8_lossy(&second.stderr),
        logs(&c)
    );
    ensure!(
        git::rev(&c.nodes[0].repo(REPO), "refs/heads/b2").is_none(),
        "the draining node1 took part in a transaction begun after the signal"
    );
    ensure!(
        c.nodes[0].exit_status().is_none(),
        "node1 exited with a call in flight"
    );

    // The held call goes on past the grace (the listener is closed by now) and
    // finishes inside the drain timeout.
    tokio::time::sleep(Duration::from_secs(GRACE_SECS + 1)).await;
    hold.release();
    let first = first.await??;
    let said = String::from_utf8_lossy(&first.stderr).into_owned();
    let acknowledged = first.status.success();

    let mut status = None;
    let limit = Duration::from_secs(GRACE_SECS + TIMEOUT_SECS + 5);
    while t0.elapsed() < limit {
        status = c.nodes[0].exit_status();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exited_after = t0.elapsed();
    let status = status.with_context(|| format!("node1 still runs after {limit:?}"))?;
    ensure!(status.success(), "node1 exited {status:?}\n{}", logs(&c));
    ensure!(
        node_record(&c, "node1").await?.is_none(),
        "node1's lease was not revoked at exit"
    );
    eprintln!(
        "node1: NOT_SERVING {not_ready_after:?} after SIGTERM, exit 0 after {exited_after:?}; \
         the push in flight: {}",
        if acknowledged {
            "acknowledged"
        } else {
            "refused"
        }
    );

    // Nothing acknowledged is missing on the majority (a refusal says why).
    let on = |node: usize, branch: &str| git::rev(&c.nodes[node].repo(REPO), branch);
    for n in 1..3 {
        ensure!(
            on(n, "refs/heads/b2").as_deref() == Some(b2.as_str()),
            "node{} lacks the acknowledged b2",
            n + 1
        );
    }
    if acknowledged {
        for n in 0..3 {
            ensure!(
                on(n, "refs/heads/b1").as_deref() == Some(b1.as_str()),
                "node{} lacks the acknowledged b1 (the in-flight write on node1 must finish)",
                n + 1
            );
        }
    } else {
        ensure!(
            said.contains("remote:") || said.contains("error"),
            "the push in flight failed without a reason: {said}"
        );
    }
    Ok(())
}
