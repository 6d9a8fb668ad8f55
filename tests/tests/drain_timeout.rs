//! A drain whose `drain_timeout_secs` runs out (real etcd, three real votingd, two real
//! routers, real git): a call that never finishes is held at a fault point, the
//! process holding it is SIGTERMed, and it must not hang past its timeout nor leave
//! its lease, nor leave the client without a reason or the replicas disagreeing.
//!
//! - A router held before finalizing a push, with a gRPC fetch stalled by its client
//!   in flight too: not ready at once, exits 75
//!   (EX_TEMPFAIL: "had to cut calls", where a clean drain exits 0) within
//!   grace + timeout + a small margin, its `routers/<id>` record gone right after, the
//!   pusher told the router is shutting down (git prints the drain's reason), the
//!   fetch ended with UNAVAILABLE saying the same, and the cut transaction finalized by the reaper with the replicas
//!   agreeing.
//! - A node held mid-vote (after the decision): the same exit code and bounds, its
//!   `nodes/<name>` record gone at once, the push resolved without divergence (on the
//!   majority or nowhere, with a reason), and the other two nodes go on taking writes.
//!
//! One cluster serves both, in turn, to keep the run short.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use refvote_cluster::faults;
use refvote_proto::gitaly::SshUploadPackRequest;
use refvote_proto::gitaly::ssh_service_client::SshServiceClient;
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::hold::Hold;
use refvote_tests::node::NodeOptions;
use refvote_tests::proc::wait_until;
use refvote_tests::router::RouterOptions;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const REPO: &str = "drain/timeout.git";
const GRACE_SECS: u64 = 1;
const TIMEOUT_SECS: u64 = 2;
/// What a drain cut short exits with (router and votingd alike).
const EXIT_DRAIN_CUT: i32 = 75;
/// Past grace + timeout: the cut's flush (1 s), the lease's revocation, process exit.
const MARGIN: Duration = Duration::from_secs(3);

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
) -> tokio::task::JoinHandle<anyhow::Result<Output>> {
    let (path, branch) = (work.path.clone(), branch.to_owned());
    tokio::spawn(async move { git::push(&path, Path::new(&url), &[branch.as_str()], &[]).await })
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn logs(c: &VoteCluster) -> String {
    let mut out = String::new();
    for n in &c.nodes {
        out.push_str(&format!("--- {} ---\n{}\n", n.name, n.log_tail(25)));
    }
    for r in &c.routers {
        out.push_str(&format!("--- {} ---\n{}\n", r.name, r.log_tail(25)));
    }
    out
}

async fn key_exists(c: &VoteCluster, key: &str) -> anyhow::Result<bool> {
    Ok(c.store.get(key).await?.is_some())
}

/// `refs/heads/<branch>` on each node, in node order.
fn revs(c: &VoteCluster, branch: &str) -> Vec<Option<String>> {
    let refname = format!("refs/heads/{branch}");
    c.nodes
        .iter()
        .map(|n| git::rev(&n.repo(REPO), &refname))
        .collect()
}

/// Waits for `exited()` after a SIGTERM at `t0`, at most grace + timeout + margin, and
/// returns the status and when it came.
async fn wait_exit(
    what: &str,
    t0: Instant,
    mut exited: impl FnMut() -> Option<std::process::ExitStatus>,
) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
    let limit = Duration::from_secs(GRACE_SECS + TIMEOUT_SECS) + MARGIN;
    while t0.elapsed() < limit {
        if let Some(status) = exited() {
            return Ok((status, t0.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!(
        "{what} still runs {limit:?} after SIGTERM, past drain_grace_secs + drain_timeout_secs"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_runs_out_of_time_cuts_its_calls_clearly_exits_75_and_revokes_its_lease()
-> anyhow::Result<()> {
    let node_opts = NodeOptions::default().config(|c| {
        c.drain_grace_secs = GRACE_SECS;
        c.drain_timeout_secs = TIMEOUT_SECS;
    });
    let router_opts = RouterOptions::http().config(|c| {
        c.drain_grace_secs = GRACE_SECS;
        c.drain_timeout_secs = TIMEOUT_SECS;
    });
    let mut c = Fixture::nodes(3)
        .node_options(node_opts)
        .router_with(router_opts)
        .router()
        .start()
        .await?;
    let (work, _) = c.create_and_push(&c.routers[1], REPO).await?;
    let repo = c.repo_id(REPO);
    let keys = c.store.keys();

    // --- router1, held before finalizing a push, past its drain timeout ---
    let hold = Hold::new(faults::BEFORE_FINALIZE, 1)?;
    c.routers[0].stop()?;
    c.routers[0].env = hold.env();
    c.routers[0].launch().await?;
    git::git(&work.path, &["checkout", "--quiet", "-b", "r1", "main"])?;
    let r1 = work.commit("r1", "held in router1 at its SIGTERM")?;
    let held = spawn_push(&work, c.routers[0].http_url(REPO), "r1");
    hold.wait_reached(Duration::from_secs(30))
        .await
        .with_context(|| logs(&c))?;
    ensure!(
        key_exists(&c, &keys.router("router1")).await?,
        "router1 is not registered in etcd before the signal"
    );

    // A second call in flight, over gRPC: a fetch whose client sent its first message
    // and then neither sends nor closes (git upload-pack on the node waits on it).
    let (feed, requests) = tokio::sync::mpsc::channel::<SshUploadPackRequest>(1);
    feed.send(SshUploadPackRequest {
        repository: refvote_tests::grpc::repo(REPO),
        ..Default::default()
    })
    .await?;
    let mut fetch = SshServiceClient::new(c.routers[0].channel().await?)
        .ssh_upload_pack(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .context("SSHUploadPack through router1")?
        .into_inner();
    let advertised = tokio::time::timeout(Duration::from_secs(10), fetch.message())
        .await
        .context("no ref advertisement from the fetch")??
        .context("the fetch ended before its advertisement")?;
    ensure!(
        !advertised.stdout.is_empty(),
        "the fetch's first answer carries no advertisement"
    );

    let t0 = Instant::now();
    c.routers[0].sigterm()?;
    wait_until(
        "router1 reports NOT_SERVING",
        Duration::from_secs(5),
        || {
            let url = c.routers[0].grpc_url();
            async move { grpc_health(url).await.ok() == Some(ServingStatus::NotServing) }
        },
    )
    .await
    .with_context(|| logs(&c))?;
    let not_ready_after = t0.elapsed();
    ensure!(
        not_ready_after < Duration::from_secs(GRACE_SECS),
        "router1 NOT_SERVING only after {not_ready_after:?}, past the grace"
    );
    let (status, exited_after) = wait_exit("router1", t0, || c.routers[0].exit_status())
        .await
        .with_context(|| logs(&c))?;
    let record_left = key_exists(&c, &keys.router("router1")).await?;
    ensure!(
        status.code() == Some(EXIT_DRAIN_CUT),
        "router1 exited {status:?} (signal {:?}), not {EXIT_DRAIN_CUT} for a drain that cut a call\n{}",
        status.signal(),
        logs(&c)
    );
    ensure!(
        exited_after >= Duration::from_secs(GRACE_SECS + TIMEOUT_SECS),
        "router1 exited after {exited_after:?}, before its drain timeout"
    );
    ensure!(
        !record_left,
        "router1's etcd record outlived it (its lease was not revoked, only left to expire)"
    );
    ensure!(
        c.routers[0]
            .log_tail(80)
            .contains("calls still in flight after drain_timeout_secs"),
        "router1's log does not say it cut calls:\n{}",
        c.routers[0].log_tail(40)
    );
    ensure!(
        !c.routers[0]
            .log_tail(80)
            .contains("connections still open after the cut"),
        "the cut calls' connections did not close on their own:\n{}",
        c.routers[0].log_tail(40)
    );

    // The stalled fetch ends with UNAVAILABLE saying why (not a reset connection),
    // once the timeout ran out and not before.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match fetch.message().await {
                Ok(Some(_)) => continue,
                other => break (other, t0.elapsed()),
            }
        }
    })
    .await
    .context("the stalled fetch still hangs after router1 exited")?;
    drop(feed);
    let (fetch_end, fetch_cut_after) = ended;
    let status = match fetch_end {
        Err(status) => status,
        Ok(_) => anyhow::bail!("the stalled fetch ended cleanly though it never finished"),
    };
    ensure!(
        status.code() == tonic::Code::Unavailable
            && status.message().contains("shutting down")
            && status.message().contains("drain_timeout_secs (2 s)"),
        "the stalled fetch ended with an unclear status: {status:?}"
    );
    ensure!(
        fetch_cut_after >= Duration::from_secs(GRACE_SECS + TIMEOUT_SECS),
        "the stalled fetch was cut after {fetch_cut_after:?}, before the drain timeout"
    );

    // The pusher hears why, and is not left hanging.
    let out = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .context("the push cut by router1's drain still hangs after router1 exited")???;
    let text = said(&out);
    ensure!(
        !out.status.success(),
        "the cut push was acknowledged: {text}"
    );
    ensure!(
        text.contains("shutting down") && text.contains("drain_timeout_secs"),
        "the cut push's client was not told the router is shutting down: {text}"
    );
    ensure!(
        text.contains("[remote rejected] (router shutting down: may or may not have been applied"),
        "the cut push's ref is not rejected with the drain's short reason: {text}"
    );

    // The cut transaction is finalized by the reaper (the lease is gone), and the
    // replicas agree on r1: committed on all three or on none.
    wait_until(
        "router1's cut transaction finalized",
        Duration::from_secs(20),
        || async {
            c.store
                .get_prefix(&keys.txrepo(&repo))
                .await
                .is_ok_and(|(open, _)| open.is_empty())
        },
    )
    .await
    .with_context(|| logs(&c))?;
    let on = revs(&c, "r1");
    ensure!(
        on.iter().all(|r| r == &on[0]) && (on[0].is_none() || on[0].as_deref() == Some(&*r1)),
        "the replicas disagree on the cut push's r1: {on:?} (pushed {r1})"
    );
    eprintln!(
        "router1: NOT_SERVING {not_ready_after:?} after SIGTERM, exit {EXIT_DRAIN_CUT} after \
         {exited_after:?}; the cut push {} on every replica; the client heard: {}",
        if on[0].is_some() {
            "committed"
        } else {
            "aborted"
        },
        text.lines()
            .find(|l| l.contains("shutting down"))
            .unwrap_or_default()
    );

    // The other router serves writes at once.
    git::git(&work.path, &["checkout", "--quiet", "-b", "r2", "main"])?;
    let r2 = work.commit("r2", "after router1's exit")?;
    let url = c.routers[1].http_url(REPO);
    let out = git::push(&work.path, Path::new(&url), &["r2"], &[]).await?;
    ensure!(out.status.success(), "router2 refused r2: {}", said(&out));
    ensure!(
        revs(&c, "r2").iter().all(|r| r.as_deref() == Some(&*r2)),
        "r2 is not on every replica: {:?}",
        revs(&c, "r2")
    );
    // --- node1, held mid-vote (after the decision), past its drain timeout ---
    let hold = Hold::new(faults::AFTER_DECISION, 1)?;
    c.nodes[0].stop()?;
    c.nodes[0].env = hold.env();
    c.nodes[0].launch().await?;
    wait_until(
        "node1 registered again",
        Duration::from_secs(20),
        || async { key_exists(&c, &keys.node("node1")).await.unwrap_or(false) },
    )
    .await?;
    git::git(&work.path, &["checkout", "--quiet", "-b", "n1", "main"])?;
    let n1 = work.commit("n1", "held mid-vote on node1 at its SIGTERM")?;
    let held = spawn_push(&work, url.clone(), "n1");
    hold.wait_reached(Duration::from_secs(30))
        .await
        .with_context(|| logs(&c))?;

    let t0 = Instant::now();
    c.nodes[0].sigterm()?;
    wait_until("node1 reports NOT_SERVING", Duration::from_secs(5), || {
        let url = c.nodes[0].grpc_url();
        async move { grpc_health(url).await.ok() == Some(ServingStatus::NotServing) }
    })
    .await
    .with_context(|| logs(&c))?;
    let not_ready_after = t0.elapsed();
    ensure!(
        not_ready_after < Duration::from_secs(GRACE_SECS),
        "node1 NOT_SERVING only after {not_ready_after:?}, past the grace"
    );
    let (status, exited_after) = wait_exit("node1", t0, || c.nodes[0].exit_status())
        .await
        .with_context(|| logs(&c))?;
    let record_left = key_exists(&c, &keys.node("node1")).await?;
    ensure!(
        status.code() == Some(EXIT_DRAIN_CUT),
        "node1 exited {status:?} (signal {:?}), not {EXIT_DRAIN_CUT} for a drain that cut a call\n{}",
        status.signal(),
        logs(&c)
    );
    ensure!(
        exited_after >= Duration::from_secs(GRACE_SECS + TIMEOUT_SECS),
        "node1 exited after {exited_after:?}, before its drain timeout"
    );
    ensure!(
        !record_left,
        "node1's etcd record outlived it (its lease was not revoked, only left to expire)"
    );
    ensure!(
        c.nodes[0]
            .log_tail(80)
            .contains("calls still in flight after drain_timeout_secs"),
        "node1's log does not say it stopped calls:\n{}",
        c.nodes[0].log_tail(40)
    );

    // The push resolves: acknowledged and on the majority, or refused with a reason;
    // never acknowledged but missing, never half-applied on the two that remain.
    let out = tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .context("the push held on node1 still hangs 30 s after node1 exited")???;
    let text = said(&out);
    let acknowledged = out.status.success();
    wait_until(
        "the held push's transaction finalized",
        Duration::from_secs(20),
        || async {
            c.store
                .get_prefix(&keys.txrepo(&repo))
                .await
                .is_ok_and(|(open, _)| open.is_empty())
        },
    )
    .await
    .with_context(|| logs(&c))?;
    let on = revs(&c, "n1");
    ensure!(
        on[1] == on[2],
        "node2 and node3 disagree on n1: {on:?} (pushed {n1})"
    );
    if acknowledged {
        ensure!(
            on[1].as_deref() == Some(&*n1),
            "the acknowledged n1 is not on the majority: {on:?}"
        );
    } else {
        ensure!(
            text.contains("remote:") || text.contains("rejected"),
            "the push held on node1 failed without a reason: {text}"
        );
    }
    ensure!(
        on[0].is_none() || on[0] == on[1],
        "node1 holds an n1 the others do not: {on:?}"
    );
    eprintln!(
        "node1: NOT_SERVING {not_ready_after:?} after SIGTERM, exit {EXIT_DRAIN_CUT} after \
         {exited_after:?}; the held push: {}; n1 on the nodes: {on:?}",
        if acknowledged {
            "acknowledged".to_owned()
        } else {
            format!("refused: {}", text.trim())
        }
    );

    // The two that remain keep taking writes.
    git::git(&work.path, &["checkout", "--quiet", "-b", "n2", "main"])?;
    let n2 = work.commit("n2", "after node1's exit")?;
    let out = git::push(&work.path, Path::new(&url), &["n2"], &[]).await?;
    ensure!(
        out.status.success(),
        "a push after node1's exit failed: {}\n{}",
        said(&out),
        logs(&c)
    );
    let on = revs(&c, "n2");
    ensure!(
        on[1].as_deref() == Some(&*n2) && on[2].as_deref() == Some(&*n2),
        "n2 is not on node2 and node3: {on:?}"
    );

    // node1 missed writes, and etcd says so (reads avoid it); back without the hold,
    // it is repaired to what the majority holds: every replica agrees.
    ensure!(
        !up_to_date(&c, &repo, "node1").await,
        "node1 lacks writes but its replica is recorded up to date"
    );
    c.nodes[0].env.clear();
    c.nodes[0].launch().await?;
    wait_until("node1 repaired", Duration::from_secs(30), || async {
        up_to_date(&c, &repo, "node1").await
    })
    .await
    .with_context(|| logs(&c))?;
    for branch in ["main", "r1", "r2", "n1", "n2"] {
        let on = revs(&c, branch);
        ensure!(
            on.iter().all(|r| r == &on[1]),
            "after node1's repair the replicas disagree on {branch}: {on:?}"
        );
    }
    Ok(())
}

async fn up_to_date(c: &VoteCluster, repo: &refvote_cluster::RepoId, node: &str) -> bool {
    match c.store.repo_view(repo).await {
        Ok(v) => v
            .replicas
            .get(node)
            .is_some_and(|(r, _)| r.is_up_to_date(&v.record)),
        Err(_) => false,
    }
}
