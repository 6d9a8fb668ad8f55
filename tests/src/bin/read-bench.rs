//! The read benchmark (`scripts/bench-reads.sh`): read RPCs straight to a node and
//! through the router, against the git command that answers the same question run by
//! this benchmark, all in one run on a real cluster (one etcd member, three votingd
//! nodes, a router process) and the repository `tests/fixtures/read-repo.sh` builds.
//!
//! Each case is a [`Case`]: one gRPC call and the equivalent git CLI command. Every
//! case is measured at concurrency 1 and CONCURRENCY (default 8) for SECONDS (default
//! 3) per side, the three sides (CLI, direct, router) alternating within each of
//! ROUNDS rounds (default 3); each figure is the median over the rounds. Cases so far:
//! CommitDiff of the fixture's 50-file commit (`git diff --patch --raw -z
//! --find-renames=30% --no-abbrev --full-index A B`). Other read cases are meant to be
//! added to [`cases`] so that one command measures them all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use futures::future::BoxFuture;
use refvote_proto::gitaly::CommitDiffRequest;
use refvote_proto::gitaly::diff_service_client::DiffServiceClient;
use refvote_tests::reads::{REPO, ReadCluster, repo};
use tonic::transport::Channel;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

type Call = Arc<dyn Fn(Channel) -> BoxFuture<'static, anyhow::Result<usize>> + Send + Sync>;

/// One read: the gRPC call (returns the bytes it received) and the git command.
struct Case {
    name: &'static str,
    call: Call,
    cli: Vec<String>,
}

fn cases(rc: &ReadCluster) -> anyhow::Result<Vec<Case>> {
    let (left, right) = (rc.rev("main~1")?, rc.rev("main")?);
    let (l, r) = (left.clone(), right.clone());
    let commit_diff: Call = Arc::new(move |ch: Channel| {
        let (l, r) = (l.clone(), r.clone());
        Box::pin(async move {
            let mut client = DiffServiceClient::new(ch);
            let mut stream = client
                .commit_diff(CommitDiffRequest {
                    repository: repo(REPO),
                    left_commit_id: l,
                    right_commit_id: r,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let (mut bytes, mut files) = (0, 0);
            while let Some(m) = stream.message().await? {
                bytes += m.raw_patch_data.len();
                files += m.end_of_patch as usize;
            }
            ensure!(files == 50, "CommitDiff answered {files} files");
            Ok(bytes)
        })
    });
    Ok(vec![Case {
        name: "CommitDiff (50-file commit)",
        call: commit_diff,
        cli: [
            "diff",
            "--patch",
            "--raw",
            "-z",
            "--find-renames=30%",
            "--no-abbrev",
            "--full-index",
            &left,
            &right,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
    }])
}

/// Latencies and calls per second of `concurrency` loops of `one` for `secs`.
async fn measure<F>(concurrency: usize, secs: u64, one: F) -> anyhow::Result<(Duration, Duration, f64)>
where
    F: Fn() -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync + 'static,
{
    let one = Arc::new(one);
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                one().await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = started.elapsed().as_secs_f64();
    all.sort();
    ensure!(!all.is_empty(), "no call finished");
    Ok((pct(&all, 0.5), pct(&all, 0.99), all.len() as f64 / wall))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rounds = env("ROUNDS", 3);
    let secs = env("SECONDS", 3) as u64;
    let wide = env("CONCURRENCY", 8);
    let rc = ReadCluster::start(None).await?;
    let direct = Channel::from_shared(rc.cluster.nodes[0].grpc_url())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let routed = rc.channel().await?;
    let replica = rc.replica();
    println!(
        "machine: {} CPUs, load average {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    for case in cases(&rc)? {
        // The call works and returns what git prints, before anything is timed.
        let bytes = (case.call)(direct.clone()).await?;
        println!("\n## {} ({bytes} patch bytes per answer)\n", case.name);
        println!("| concurrency | side | p50 ms | p99 ms | calls/s |");
        println!("| --- | --- | --- | --- | --- |");
        for concurrency in [1, wide] {
            let mut figures: Vec<Vec<(Duration, Duration, f64)>> = vec![Vec::new(); 3];
            for _ in 0..rounds {
                let cli = case.cli.clone();
                let dir = replica.clone();
                figures[0].push(
                    measure(concurrency, secs, move || {
                        let (cli, dir) = (cli.clone(), dir.clone());
                        Box::pin(async move {
                            let out = tokio::process::Command::new("git")
                                .current_dir(&dir)
                                .args(&cli)
                                .env("GIT_CONFIG_NOSYSTEM", "1")
                                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                                .output()
                                .await?;
                            ensure!(out.status.success(), "git failed: {out:?}");
                            Ok(())
                        })
                    })
                    .await?,
                );
                for (i, ch) in [(1, direct.clone()), (2, routed.clone())] {
                    let call = case.call.clone();
                    figures[i].push(
                        measure(concurrency, secs, move || {
                            let (call, ch) = (call.clone(), ch.clone());
                            Box::pin(async move { call(ch).await.map(|_| ()) })
                        })
                        .await?,
                    );
                }
            }
            let med: Vec<(f64, f64, f64)> = figures
                .iter()
                .map(|f| {
                    (
                        median(f.iter().map(|x| x.0.as_secs_f64()).collect()),
                        median(f.iter().map(|x| x.1.as_secs_f64()).collect()),
                        median(f.iter().map(|x| x.2).collect()),
                    )
                })
                .collect();
            for (side, (p50, p99, rate)) in ["git CLI", "direct", "router"].iter().zip(&med) {
                println!(
                    "| {concurrency} | {side} | {} | {} | {rate:.0} |",
                    ms(Duration::from_secs_f64(*p50)),
                    ms(Duration::from_secs_f64(*p99))
                );
            }
            println!(
                "\nconcurrency {concurrency}: direct p50 / CLI p50 = {:.2}, router calls/s / direct calls/s = {:.2}\n",
                med[1].0 / med[0].0,
                med[2].2 / med[1].2
            );
        }
    }
    Ok(())
}
