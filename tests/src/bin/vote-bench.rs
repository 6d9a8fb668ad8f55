//! The voting-core benchmark (`scripts/bench-vote.sh`): vote round trip (hook start to
//! exit) with 3 voters and a 3-member etcd, against its floor measured in the same run
//! (one etcd commit, one hook process start), and whole transactions per second at 1,
//! 8 and 64 concurrent transactions. Real etcd, real votingd, real hook processes.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::ensure;
use etcd_client::{Txn, TxnOp};
use refvote_cluster::RepoId;
use refvote_cluster::records::TxRecord;
use refvote_tests::cluster::VoteCluster;
use refvote_tests::node::{Node, bin};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn summary(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (pct(&v, 0.5), pct(&v, 0.99))
}

/// Runs the hook like git does; returns how long it took from spawn to exit.
async fn hook(phase: &str, stdin: &[u8], env: &[(String, String)]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(bin("reference-transaction"));
    cmd.arg(phase)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove(refvote_proto::contract::ENV_TX);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let mut input = child.stdin.take().expect("piped");
    tokio::io::AsyncWriteExt::write_all(&mut input, stdin).await?;
    drop(input);
    let out = child.wait_with_output().await?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "hook {phase} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

/// One whole transaction: create, three votes, three confirmations, done, finalize.
/// Returns the three `prepared` round trips.
async fn transaction(c: &VoteCluster, repo: &RepoId, n: u64) -> anyhow::Result<Vec<Duration>> {
    let tx: TxRecord = c.begin(repo).await?;
    let line = format!("{} {:040x} refs/heads/b{n}\n", "0".repeat(40), n + 1);
    let nodes: Vec<&Node> = tx.voters.iter().map(|v| c.node(v)).collect();
    let envs: Vec<Vec<(String, String)>> = nodes.iter().map(|n| n.tx_env(&tx.id)).collect();
    futures::future::try_join_all(
        nodes
            .iter()
            .map(|node| c.store.start_voter(&tx.id, &node.name)),
    )
    .await?;
    let votes = futures::future::try_join_all(
        envs.iter()
            .map(|env| hook("prepared", line.as_bytes(), env)),
    )
    .await?;
    futures::future::try_join_all(
        envs.iter()
            .map(|env| hook("committed", line.as_bytes(), env)),
    )
    .await?;
    futures::future::try_join_all(
        nodes
            .iter()
            .map(|node| c.store.done(&tx.id, &node.name, true, "")),
    )
    .await?;
    let outcome = c.finalize(&tx).await?;
    ensure!(
        outcome.acknowledged && outcome.promoted.len() == 3,
        "{outcome:?}"
    );
    Ok(votes)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let samples: usize = std::env::var("SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let c = VoteCluster::start(3, 3).await?;
    eprintln!("cluster up: 3-member etcd, 3 votingd; {samples} samples per figure");

    // Floor 1: a hook process start (no refvote context: it reads stdin and exits).
    let mut spawn = Vec::new();
    for _ in 0..samples {
        spawn.push(hook("prepared", b"x", &[]).await?);
    }
    let (spawn50, spawn99) = summary(spawn);

    // Floor 2: one etcd commit (a one-put txn) through the same client refvote uses.
    let mut commit = Vec::new();
    for i in 0..samples {
        let t = Instant::now();
        c.store
            .txn(Txn::new().and_then([TxnOp::put(format!("/bench/{i}"), "x", None)]))
            .await?;
        commit.push(t.elapsed());
    }
    let (commit50, commit99) = summary(commit);

    // The vote round trip: hook start to exit at `prepared`, three voters at once.
    let repo = RepoId::new("default", "bench/votes.git")?;
    c.store
        .create_repository(&repo, &c.node_names(), "")
        .await?;
    let mut votes = Vec::new();
    for n in 0..samples as u64 {
        votes.extend(transaction(&c, &repo, n).await?);
    }
    let (vote50, vote99) = summary(votes);

    // Transactions per second at 1, 8 and 64 in flight, each worker on its own
    // repository, and 8 in flight on one repository (concurrent finalizes compete).
    let mut rates = Vec::new();
    for (inflight, shared) in [(1usize, false), (8, false), (64, false), (8, true)] {
        let repos: Vec<RepoId> = (0..inflight)
            .map(|w| RepoId::new("default", &format!("bench/{inflight}-{shared}-{w}.git")).unwrap())
            .collect();
        for r in if shared { &repos[..1] } else { &repos[..] } {
            c.store.create_repository(r, &c.node_names(), "").await?;
        }
        let per_worker =
            (samples / 2).max(4 * 64 / inflight).max(8) as u64 / if inflight == 64 { 4 } else { 1 };
        let started = Instant::now();
        let workers = (0..inflight).map(|w| {
            let (c, repo) = (&c, if shared { &repos[0] } else { &repos[w] });
            async move {
                for n in 0..per_worker {
                    transaction(c, repo, (w as u64) << 32 | n).await?;
                }
                anyhow::Ok(per_worker)
            }
        });
        let done: u64 = futures::future::try_join_all(workers)
            .await?
            .into_iter()
            .sum();
        let rate = done as f64 / started.elapsed().as_secs_f64();
        rates.push((inflight, shared, done, rate));
    }

    if let Ok(dir) = std::env::var("BENCH_LOGS") {
        std::fs::create_dir_all(&dir)?;
        for n in &c.nodes {
            std::fs::copy(
                n.dir.join(format!("{}.log", n.name)),
                format!("{dir}/{}.log", n.name),
            )?;
        }
    }
    let floor = commit50 + spawn50;
    let mut out = std::io::stdout().lock();
    writeln!(out, "| figure | p50 ms | p99 ms |")?;
    writeln!(out, "| --- | --- | --- |")?;
    writeln!(
        out,
        "| hook process start (floor 1) | {} | {} |",
        ms(spawn50),
        ms(spawn99)
    )?;
    writeln!(
        out,
        "| one etcd commit (floor 2) | {} | {} |",
        ms(commit50),
        ms(commit99)
    )?;
    writeln!(
        out,
        "| vote round trip, hook start to exit, 3 voters | {} | {} |",
        ms(vote50),
        ms(vote99)
    )?;
    writeln!(
        out,
        "\nvote p50 / (etcd commit p50 + hook start p50) = {:.2}  (floor {} ms)",
        vote50.as_secs_f64() / floor.as_secs_f64(),
        ms(floor)
    )?;
    writeln!(
        out,
        "\n| transactions in flight | repositories | transactions | per second |"
    )?;
    writeln!(out, "| --- | --- | --- | --- |")?;
    for (inflight, shared, done, rate) in rates {
        let repos = if shared {
            "1 (shared)".to_string()
        } else {
            inflight.to_string()
        };
        writeln!(out, "| {inflight} | {repos} | {done} | {rate:.0} |")?;
    }
    Ok(())
}
