//! The router benchmark (`scripts/bench-router.sh`): the same calls through the router
//! and straight to a node, in one run, against real etcd, three real votingd nodes and
//! real git:
//!
//! (a) accessors (FindDefaultBranchName, RefExists, ListRefs on a small repository) at
//!     concurrency 1 and 16: p50/p99 latency and calls per second, plus the etcd
//!     confirm rounds per read the router made;
//! (b) a small push (PostReceivePack of one new branch) through the router to three
//!     voting replicas, against the same push straight to one node without voting;
//! (c) a full fetch of a large repository (incompressible blobs) over PostUploadPack,
//!     through the router and direct: MB/s.
//!
//! Each figure is the median over ROUNDS rounds (default 3), direct and router
//! alternating within a round. The router runs in this process on a runtime of its own
//! (so its counters can be read); the load runs on another.
//!
//! Environment: ROUNDS, SECONDS (per accessor measurement, default 3), PUSHES (per
//! round and side, default 30), LARGE_MIB (default 64), ETCD_MEMBERS (default 3).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::{
    FindDefaultBranchNameRequest, ListRefsRequest, PostReceivePackRequest, PostUploadPackRequest,
    RefExistsRequest, Repository,
};
use refvote_router::{Config, RouterServer};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git;
use tonic::transport::Channel;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn repo(relative: &str) -> Option<Repository> {
    Some(Repository {
        storage_name: "default".into(),
        relative_path: relative.into(),
        ..Default::default()
    })
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

fn median_d(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn channel(url: String) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(url)?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// One accessor call of the mix (call `i` picks the method).
async fn accessor(ch: &Channel, relative: &str, i: usize) -> anyhow::Result<()> {
    let mut refs = RefServiceClient::new(ch.clone());
    match i % 3 {
        0 => {
            let r = refs
                .find_default_branch_name(FindDefaultBranchNameRequest {
                    repository: repo(relative),
                    head_only: false,
                })
                .await?
                .into_inner();
            ensure!(r.name == b"refs/heads/main", "{r:?}");
        }
        1 => {
            let r = refs
                .ref_exists(RefExistsRequest {
                    repository: repo(relative),
                    r#ref: b"refs/heads/main".to_vec(),
                })
                .await?
                .into_inner();
            ensure!(r.value);
        }
        _ => {
            let mut s = refs
                .list_refs(ListRefsRequest {
                    repository: repo(relative),
                    patterns: vec![b"refs/heads/".to_vec()],
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut n = 0;
            while let Some(m) = s.message().await? {
                n += m.references.len();
            }
            ensure!(n >= 1);
        }
    }
    Ok(())
}

struct Load {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

/// `concurrency` workers calling the accessor mix for `secs`.
async fn accessor_load(
    ch: &Channel,
    relative: &str,
    concurrency: usize,
    secs: u64,
) -> anyhow::Result<Load> {
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let workers = (0..concurrency).map(|w| async move {
        let mut lat = Vec::new();
        let mut i = w;
        while Instant::now() < until {
            let t = Instant::now();
            accessor(ch, relative, i).await?;
            lat.push(t.elapsed());
            i += 1;
        }
        anyhow::Ok(lat)
    });
    let mut lat: Vec<Duration> = futures::future::try_join_all(workers)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let took = started.elapsed();
    lat.sort();
    Ok(Load {
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        per_sec: lat.len() as f64 / took.as_secs_f64(),
    })
}

/// Small commits on top of `main` in `work`, one per branch name; returns the bodies of
/// the receive-pack requests that create them.
fn push_bodies(work: &Path, prefix: &str, n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let main = git::git(work, &["rev-parse", "main"])?;
    let mut bodies = Vec::new();
    for i in 0..n {
        let branch = format!("{prefix}-{i}");
        git::git(work, &["checkout", "--quiet", "-B", &branch, &main])?;
        std::fs::write(work.join(format!("{branch}.txt")), format!("{branch}\n"))?;
        git::git(work, &["add", "-A"])?;
        git::git(work, &["commit", "--quiet", "-m", &branch])?;
        let new = git::git(work, &["rev-parse", "HEAD"])?;
        let line = format!(
            "{} {new} refs/heads/{branch}\0report-status\n",
            "0".repeat(40)
        );
        let mut body = format!("{:04x}{line}0000", line.len() + 4).into_bytes();
        let mut child = std::process::Command::new("git")
            .current_dir(work)
            .args(["pack-objects", "--stdout", "--revs", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        writeln!(child.stdin.take().expect("piped"), "{new}\n^{main}")?;
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "pack-objects");
        body.extend_from_slice(&out.stdout);
        bodies.push(body);
    }
    git::git(work, &["checkout", "--quiet", "main"])?;
    Ok(bodies)
}

async fn push(ch: &Channel, relative: &str, body: Vec<u8>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let req = PostReceivePackRequest {
        repository: repo(relative),
        data: body,
        gl_id: "user-1".into(),
        ..Default::default()
    };
    let mut s = SmartHttpServiceClient::new(ch.clone())
        .post_receive_pack(futures::stream::iter([req]))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend_from_slice(&m.data);
    }
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&out);
    ensure!(text.contains("ok refs/heads/"), "push not accepted: {text}");
    Ok(took)
}

/// A full fetch of `want` (protocol v0, stateless): returns the bytes received.
async fn fetch_all(ch: &Channel, relative: &str, want: &str) -> anyhow::Result<(u64, Duration)> {
    let line = format!("want {want} side-band-64k ofs-delta\n");
    let data = format!("{:04x}{line}00000009done\n", line.len() + 4).into_bytes();
    let t = Instant::now();
    let req = PostUploadPackRequest {
        repository: repo(relative),
        data,
        ..Default::default()
    };
    let mut s = SmartHttpServiceClient::new(ch.clone())
        .max_decoding_message_size(64 << 20)
        .post_upload_pack(futures::stream::iter([req]))
        .await?
        .into_inner();
    let mut bytes = 0u64;
    while let Some(m) = s.message().await? {
        bytes += m.data.len() as u64;
    }
    Ok((bytes, t.elapsed()))
}

/// Incompressible bytes (xorshift).
fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    data
}

fn main() -> anyhow::Result<()> {
    let rounds = env("ROUNDS", 3);
    let secs = env("SECONDS", 3) as u64;
    let pushes = env("PUSHES", 30);
    let large_mib = env("LARGE_MIB", 64);
    let members = env("ETCD_MEMBERS", 3);
    // The router gets a runtime of its own, like a process of its own.
    let router_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    load_rt.block_on(run(&router_rt, rounds, secs, pushes, large_mib, members))
}

async fn run(
    router_rt: &tokio::runtime::Runtime,
    rounds: usize,
    secs: u64,
    pushes: usize,
    large_mib: usize,
    members: usize,
) -> anyhow::Result<()> {
    let c = VoteCluster::start(3, members).await?;
    let work = c.work("w")?;
    work.commit("main", "first")?;
    // (a) a small repository on every node; (b) one for voted pushes and one on node1
    // only, outside refvote, for pushes without voting; (c) a large one.
    c.create_repo("bench/small.git").await?;
    c.create_repo("bench/push.git").await?;
    git::init_bare(&c.nodes[0].repo("bench/direct.git"), &c.nodes[0].hooks)?;
    c.create_repo("bench/large.git").await?;
    for n in &c.nodes {
        for r in ["bench/small.git", "bench/push.git"] {
            let out = git::push(&work.path, &n.repo(r), &["main"], &[]).await?;
            ensure!(out.status.success(), "{out:?}");
        }
    }
    let out = git::push(
        &work.path,
        &c.nodes[0].repo("bench/direct.git"),
        &["main"],
        &[],
    )
    .await?;
    ensure!(out.status.success(), "{out:?}");
    let large = c.work("large")?;
    let files = large_mib.div_ceil(4);
    for i in 0..files {
        std::fs::write(
            large.path.join(format!("blob-{i}.bin")),
            noise(4 << 20, i as u64 + 1),
        )?;
    }
    git::git(&large.path, &["add", "-A"])?;
    git::git(&large.path, &["commit", "--quiet", "-m", "large"])?;
    let large_head = git::git(&large.path, &["rev-parse", "HEAD"])?;
    for n in &c.nodes {
        let out = git::push(&large.path, &n.repo("bench/large.git"), &["main"], &[]).await?;
        ensure!(out.status.success(), "{out:?}");
    }
    let endpoints = c
        .etcd
        .endpoints()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = Config::parse(
        &format!(
            "router_id = \"bench\"\nlisten_addr = \"127.0.0.1:0\"\n[etcd]\nendpoints = [{endpoints}]\n"
        ),
        Path::new("router.toml"),
    )?;
    let router = router_rt
        .spawn(async move { RouterServer::start(&config).await })
        .await??;
    let via = channel(format!("http://{}", router.local_addr())).await?;
    let direct = channel(c.nodes[0].grpc_url()).await?;
    eprintln!("cluster up: {members}-member etcd, 3 votingd, router in-process; {rounds} rounds");
    // Warm both paths (connections, caches).
    for i in 0..30 {
        accessor(&direct, "bench/small.git", i).await?;
        accessor(&via, "bench/small.git", i).await?;
    }

    // The floor the read guarantee adds: one linearizable etcd read of a repository's
    // records (what a confirm round is), from this process.
    let small = refvote_cluster::RepoId::new("default", "bench/small.git")?;
    let keys = c.store.keys().clone();
    let mut rtt = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        c.store
            .txn(etcd_client::Txn::new().and_then([
                refvote_cluster::store::get_op(&keys.repo(&small)),
                refvote_cluster::store::get_prefix_op(&keys.replicas(&small)),
            ]))
            .await?;
        rtt.push(t.elapsed());
    }
    rtt.sort();
    let rtt50 = pct(&rtt, 0.5);

    let mut table = Vec::new();
    for concurrency in [1usize, 16] {
        let (mut d50, mut d99, mut dps) = (vec![], vec![], vec![]);
        let (mut r50, mut r99, mut rps) = (vec![], vec![], vec![]);
        let mut per_read = vec![];
        for _ in 0..rounds {
            let d = accessor_load(&direct, "bench/small.git", concurrency, secs).await?;
            let before = router.read_stats();
            let r = accessor_load(&via, "bench/small.git", concurrency, secs).await?;
            let after = router.read_stats();
            per_read.push(
                (after.confirm_rounds - before.confirm_rounds) as f64
                    / (after.reads - before.reads).max(1) as f64,
            );
            d50.push(d.p50);
            d99.push(d.p99);
            dps.push(d.per_sec);
            r50.push(r.p50);
            r99.push(r.p99);
            rps.push(r.per_sec);
        }
        table.push((
            concurrency,
            median_d(d50),
            median_d(d99),
            median(dps),
            median_d(r50),
            median_d(r99),
            median(rps),
            median(per_read),
        ));
    }

    // (b) small pushes.
    let bodies_direct = push_bodies(&work.path, "d", pushes * rounds)?;
    let bodies_router = push_bodies(&work.path, "r", pushes * rounds)?;
    let (mut pd, mut pr) = (vec![], vec![]);
    let (mut bd, mut br) = (bodies_direct.into_iter(), bodies_router.into_iter());
    for _ in 0..rounds {
        let (mut d, mut r) = (vec![], vec![]);
        for _ in 0..pushes {
            d.push(push(&direct, "bench/direct.git", bd.next().context("body")?).await?);
            r.push(push(&via, "bench/push.git", br.next().context("body")?).await?);
        }
        d.sort();
        r.sort();
        pd.push((pct(&d, 0.5), pct(&d, 0.99)));
        pr.push((pct(&r, 0.5), pct(&r, 0.99)));
    }

    // (c) large fetches.
    let (mut fd, mut fr) = (vec![], vec![]);
    let mut size = 0;
    for _ in 0..rounds {
        let (b, t) = fetch_all(&direct, "bench/large.git", &large_head).await?;
        fd.push(b as f64 / t.as_secs_f64() / 1e6);
        let (b2, t2) = fetch_all(&via, "bench/large.git", &large_head).await?;
        // The same pack; git's progress lines on the side band may differ in length.
        ensure!(
            b2.abs_diff(b) < 64 * 1024,
            "router fetch {b2} bytes, direct {b}"
        );
        fr.push(b2 as f64 / t2.as_secs_f64() / 1e6);
        size = b;
    }

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "(a) accessors (FindDefaultBranchName, RefExists, ListRefs in turn), {secs} s per measurement\n"
    )?;
    writeln!(
        out,
        "| concurrency | direct p50 ms | direct p99 ms | direct calls/s | router p50 ms | router p99 ms | router calls/s | throughput ratio | added p50 ms | etcd confirm rounds per read |"
    )?;
    writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    for (cc, d50, d99, dps, r50, r99, rps, per_read) in table {
        writeln!(
            out,
            "| {cc} | {} | {} | {dps:.0} | {} | {} | {rps:.0} | {:.2} | {} | {per_read:.2} |",
            ms(d50),
            ms(d99),
            ms(r50),
            ms(r99),
            rps / dps,
            ms(r50.saturating_sub(d50)),
        )?;
    }
    writeln!(
        out,
        "\none linearizable etcd read of a repository's records (a confirm round's floor): p50 {} ms, p99 {} ms",
        ms(rtt50),
        ms(pct(&rtt, 0.99))
    )?;
    let p50d = median_d(pd.iter().map(|x| x.0).collect());
    let p99d = median_d(pd.iter().map(|x| x.1).collect());
    let p50r = median_d(pr.iter().map(|x| x.0).collect());
    let p99r = median_d(pr.iter().map(|x| x.1).collect());
    writeln!(
        out,
        "\n(b) small push (one new branch, PostReceivePack), {pushes} per round and side\n"
    )?;
    writeln!(out, "| path | p50 ms | p99 ms |")?;
    writeln!(out, "| --- | --- | --- |")?;
    writeln!(
        out,
        "| straight to one node, no voting | {} | {} |",
        ms(p50d),
        ms(p99d)
    )?;
    writeln!(
        out,
        "| through the router, 3 voting replicas | {} | {} |",
        ms(p50r),
        ms(p99r)
    )?;
    writeln!(
        out,
        "\nrouter p50 / direct p50 = {:.2}",
        p50r.as_secs_f64() / p50d.as_secs_f64()
    )?;
    let (md, mr) = (median(fd), median(fr));
    writeln!(
        out,
        "\n(c) full fetch of a {:.1} MB pack (PostUploadPack): direct {md:.0} MB/s, router {mr:.0} MB/s, ratio {:.2}",
        size as f64 / 1e6,
        mr / md
    )?;
    drop(out);
    // The router stops with its runtime when the benchmark exits.
    drop(router);
    Ok(())
}
