//! The load-balancer benchmark (`scripts/bench-nginx.sh`): real `git` over smart HTTP,
//! straight to one router and through a real nginx (the shipped
//! `install/nginx/refvote.conf`) in front of two routers, in one run, against real
//! etcd and three real votingd nodes:
//!
//! (a) `git clone --bare` of a repository holding LARGE_MIB of incompressible blobs
//!     (repacked on every node, as housekeeping leaves a served repository): MiB/s of
//!     the pack received, direct to router1 and through nginx alternating in each of
//!     ROUNDS rounds (the side going first alternates too); the median per side and
//!     the ratio;
//! (b) small pushes, one new commit on a branch per `git push`, PUSHES per round and
//!     side, alternating push by push: p50 per round (the median over rounds is
//!     reported), p99 over all, and the p50 nginx adds;
//! (c) the limit run: a third router with `upload_pack_per_repository = 8` and
//!     `max_queue_wait_ms = LIMIT_WAIT_MS`, and CLONES concurrent `git clone`s of a
//!     small repository straight to it: how many were served and how many got 429
//!     (checked against the router's `refvote_router_limited_total`), the time to a
//!     429 as git saw it, the peak queue and slots in use (the router's metrics) and
//!     its RSS, both sampled every 50 ms.
//!
//! Prints markdown, with the load average at the start and the end. Every process is
//! a child started on loopback and stopped by pid when the run ends (the cluster's
//! and nginx's drops).
//!
//! Environment: ROUNDS (default 3), LARGE_MIB (64), PUSHES (30), CLONES (64),
//! LIMIT_WAIT_MS (1000), ETCD_MEMBERS (3).

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::metrics::scrape;
use refvote_tests::nginx::Nginx;
use refvote_tests::router::{Router, RouterOptions};

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
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn median_d(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
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

/// A git client command with no system or user configuration and no proxy, so what is
/// measured is git against loopback and nothing of this machine's setup.
fn git_client(home: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("git");
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", home)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .kill_on_drop(true);
    cmd
}

/// The bytes of the packs under a bare repository's `objects/pack`.
fn pack_bytes(bare: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(bare.join("objects/pack"))? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|e| e == "pack") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// `git clone --bare url` into a fresh directory under `scratch`, checked against
/// `head`; the pack's size and the time the clone took. The clone is removed.
async fn clone_large(
    scratch: &Path,
    url: &str,
    head: &str,
    n: usize,
) -> anyhow::Result<(u64, Duration)> {
    let dir = scratch.join(format!("clone-{n}"));
    let t = Instant::now();
    let out = git_client(scratch)
        .args(["clone", "--bare", "--quiet", url])
        .arg(&dir)
        .output()
        .await?;
    let took = t.elapsed();
    ensure!(out.status.success(), "git clone {url}: {out:?}");
    ensure!(
        git::rev(&dir, "refs/heads/main").as_deref() == Some(head),
        "clone of {url} is not at {head}"
    );
    let bytes = pack_bytes(&dir)?;
    std::fs::remove_dir_all(&dir)?;
    Ok((bytes, took))
}

/// `git push url <sha>:refs/heads/<branch>`: how long git took.
async fn push(work: &Path, url: &str, sha: &str, branch: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let out = git_client(work)
        .current_dir(work)
        .args(["push", "--porcelain", "--quiet", url])
        .arg(format!("{sha}:refs/heads/{branch}"))
        .output()
        .await?;
    let took = t.elapsed();
    ensure!(out.status.success(), "git push to {url}: {out:?}");
    Ok(took)
}

/// `n` commits in a row on `branch` (from `main`), one small file each.
fn commit_chain(work: &WorkRepo, branch: &str, n: usize) -> anyhow::Result<Vec<String>> {
    git::git(&work.path, &["checkout", "--quiet", "-B", branch, "main"])?;
    let mut shas = Vec::new();
    for i in 0..n {
        std::fs::write(
            work.path.join(format!("{branch}.txt")),
            format!("{branch} {i}\n"),
        )?;
        git::git(&work.path, &["add", "-A"])?;
        git::git(
            &work.path,
            &["commit", "--quiet", "-m", &format!("{branch} {i}")],
        )?;
        shas.push(git::git(&work.path, &["rev-parse", "HEAD"])?);
    }
    git::git(&work.path, &["checkout", "--quiet", "main"])?;
    Ok(shas)
}

/// How many lines of nginx's access log name each upstream (`$upstream_addr`).
fn upstream_counts(log: &str, since: usize, routers: &[&Router]) -> Vec<usize> {
    routers
        .iter()
        .map(|r| {
            let addr = r.http_addr().to_string();
            log.lines()
                .skip(since)
                .filter(|l| l.contains(&addr))
                .count()
        })
        .collect()
}

/// One clone of the limit run: how long git ran, and how it ended.
enum Ending {
    Served,
    /// git reported the 429; its first line of stderr.
    Shed(String),
    Failed(String),
}

struct Sampled {
    rss_peak: u64,
    queued_peak: f64,
    in_progress_peak: f64,
    samples: usize,
}

/// Samples `pid`'s RSS and the router's queue gauges every 50 ms until `done` (at most
/// 10 minutes).
async fn sample(pid: u32, metrics: SocketAddr, done: Arc<AtomicBool>) -> Sampled {
    let mut s = Sampled {
        rss_peak: 0,
        queued_peak: 0.0,
        in_progress_peak: 0.0,
        samples: 0,
    };
    let until = Instant::now() + Duration::from_secs(600);
    while !done.load(Ordering::Relaxed) && Instant::now() < until {
        let next = tokio::time::Instant::now() + Duration::from_millis(50);
        s.rss_peak = s.rss_peak.max(rss_kib(pid));
        if let Ok(m) = scrape(metrics).await {
            let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
            s.queued_peak = s.queued_peak.max(get("refvote_router_limit_queued"));
            s.in_progress_peak = s
                .in_progress_peak
                .max(get("refvote_router_limit_in_progress"));
        }
        s.samples += 1;
        tokio::time::sleep_until(next).await;
    }
    s
}

/// The upload-pack refusals `router` counted (queue timeouts and full queues).
async fn shed_count(router: &Router) -> anyhow::Result<f64> {
    let m = scrape(router.metrics_addr()).await?;
    Ok(["queue_timeout", "queue_full"]
        .iter()
        .map(|r| {
            m.get(&format!(
                "refvote_router_limited_total{{class=\"upload_pack\",reason=\"{r}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
        })
        .sum())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let rounds = env("ROUNDS", 3).max(1);
    let large_mib = env("LARGE_MIB", 64).max(1);
    let pushes = env("PUSHES", 30).max(1);
    let clones = env("CLONES", 64).max(1);
    let limit_wait_ms = env("LIMIT_WAIT_MS", 1000).max(1) as u64;
    let members = env("ETCD_MEMBERS", 3);
    let load_start = loadavg();
    let started = Instant::now();

    let mut c: VoteCluster = Fixture::nodes(3)
        .etcd_members(members)
        .seeded("bench/small.git")
        .start()
        .await?;

    // The repository pushed to: one commit on main, on every node.
    c.create_repo("bench/push.git").await?;
    let work = c.work("pusher")?;
    work.commit("main", "pusher")?;
    for n in &c.nodes {
        let out = git::push(&work.path, &n.repo("bench/push.git"), &["main"], &[]).await?;
        ensure!(out.status.success(), "{out:?}");
    }

    // The large repository, on every node before any router starts, then repacked
    // (a pushed pack of this few objects is unpacked into loose objects, which every
    // clone would deflate again).
    c.create_repo("bench/large.git").await?;
    let large = c.work("large")?;
    for i in 0..large_mib.div_ceil(4) {
        let size = (4 << 20).min((large_mib << 20) - i * (4 << 20));
        std::fs::write(
            large.path.join(format!("blob-{i}.bin")),
            noise(size, i as u64 + 1),
        )?;
    }
    git::git(&large.path, &["add", "-A"])?;
    git::git(&large.path, &["commit", "--quiet", "-m", "large"])?;
    let large_head = git::git(&large.path, &["rev-parse", "HEAD"])?;
    for n in &c.nodes {
        let repo = n.repo("bench/large.git");
        let out = git::push(&large.path, &repo, &["main"], &[]).await?;
        ensure!(out.status.success(), "{out:?}");
        git::git(&repo, &["repack", "-a", "-d", "-q"])?;
    }

    // router1 and router2 behind nginx; router3 with the clone limit, on its own.
    let endpoints = c.etcd.endpoints();
    let limited = RouterOptions::http().config(move |cfg| {
        cfg.limits.upload_pack_per_repository = 8;
        cfg.limits.max_queue_size = clones;
        cfg.limits.max_queue_wait_ms = limit_wait_ms;
    });
    for (name, opts) in [
        ("router1", RouterOptions::http()),
        ("router2", RouterOptions::http()),
        ("router3", limited),
    ] {
        let r = Router::start_with(name, c.dir.path(), &endpoints, &opts).await?;
        c.routers.push(r);
    }
    let http: Vec<_> = c.routers[..2].iter().map(Router::http_addr).collect();
    let grpc: Vec<_> = c.routers[..2].iter().map(Router::addr).collect();
    let nginx = Nginx::start(c.dir.path(), &http, &grpc).await?;
    let (r1, r2, r3) = (&c.routers[0], &c.routers[1], &c.routers[2]);
    eprintln!(
        "cluster up: {members}-member etcd, 3 votingd, 3 routers, nginx; {rounds} rounds, \
         {large_mib} MiB, {pushes} pushes per round and side, {clones} clones"
    );
    let scratch = c.path("scratch");
    std::fs::create_dir_all(&scratch)?;

    // (a) clones of the large repository.
    let direct_url = r1.http_url("bench/large.git");
    let nginx_url = nginx.http_url("bench/large.git");
    // Warm both paths (page cache, connections); not measured.
    let (size, _) = clone_large(&scratch, &direct_url, &large_head, 0).await?;
    let (size2, _) = clone_large(&scratch, &nginx_url, &large_head, 1).await?;
    ensure!(size == size2, "the packs differ: {size} and {size2} bytes");
    let log_mark = nginx.access_log().lines().count();
    let (mut cd, mut cn, mut ratios) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        let mut rate = [0.0; 2];
        for k in 0..2 {
            // Round 0: direct first; round 1: nginx first; ...
            let side = (k + round) % 2;
            let url = [&direct_url, &nginx_url][side];
            let (bytes, took) = clone_large(&scratch, url, &large_head, 2 + round * 2 + k).await?;
            ensure!(bytes == size, "clone of {url}: {bytes} bytes, not {size}");
            rate[side] = bytes as f64 / (1 << 20) as f64 / took.as_secs_f64();
        }
        cd.push(rate[0]);
        cn.push(rate[1]);
        ratios.push(rate[1] / rate[0]);
    }
    let clone_spread = upstream_counts(&nginx.access_log(), log_mark, &[r1, r2]);

    // (b) small pushes, one new commit on a branch each.
    let push_direct = r1.http_url("bench/push.git");
    let push_nginx = nginx.http_url("bench/push.git");
    let chains = [
        commit_chain(&work, "bench-direct", pushes * rounds + 1)?,
        commit_chain(&work, "bench-nginx", pushes * rounds + 1)?,
    ];
    let urls = [&push_direct, &push_nginx];
    let branches = ["bench-direct", "bench-nginx"];
    // Warm: each branch created (not measured), so every measured push updates one.
    for side in 0..2 {
        push(&work.path, urls[side], &chains[side][0], branches[side]).await?;
    }
    let log_mark = nginx.access_log().lines().count();
    let mut all: [Vec<Duration>; 2] = [vec![], vec![]];
    let mut p50s: [Vec<Duration>; 2] = [vec![], vec![]];
    let mut added = vec![];
    let mut next = 1;
    for round in 0..rounds {
        let mut lat: [Vec<Duration>; 2] = [vec![], vec![]];
        for i in 0..pushes {
            for k in 0..2 {
                let side = (k + round + i) % 2;
                let sha = &chains[side][next];
                lat[side].push(push(&work.path, urls[side], sha, branches[side]).await?);
            }
            next += 1;
        }
        for side in 0..2 {
            lat[side].sort();
            p50s[side].push(pct(&lat[side], 0.5));
            all[side].extend(lat[side].iter().copied());
        }
        added.push(pct(&lat[1], 0.5).as_secs_f64() - pct(&lat[0], 0.5).as_secs_f64());
    }
    let push_spread = upstream_counts(&nginx.access_log(), log_mark, &[r1, r2]);
    for side in 0..2 {
        all[side].sort();
        let tip = git::rev(
            &c.nodes[0].repo("bench/push.git"),
            &format!("refs/heads/{}", branches[side]),
        );
        ensure!(
            tip.as_deref() == chains[side].last().map(String::as_str),
            "{} is not at its last pushed commit",
            branches[side]
        );
    }

    // (c) the limit run: CLONES concurrent clones of a small repository on router3.
    let pid = r3.pid().context("router3 runs")?;
    let small_head =
        git::rev(&c.nodes[0].repo("bench/small.git"), "refs/heads/main").context("seeded")?;
    let shed_before = shed_count(r3).await?;
    let rss_before = rss_kib(pid);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(pid, r3.metrics_addr(), done.clone()));
    let small_url = r3.http_url("bench/small.git");
    let limit_dir = c.path("limit");
    std::fs::create_dir_all(&limit_dir)?;
    let burst = Instant::now();
    let runs = (0..clones).map(|i| {
        let (url, dir, home) = (
            small_url.clone(),
            limit_dir.join(format!("c{i}")),
            &limit_dir,
        );
        let head = small_head.clone();
        async move {
            let t = Instant::now();
            let out = git_client(home)
                .args(["clone", "--bare", "--quiet", &url])
                .arg(&dir)
                .output()
                .await?;
            let took = t.elapsed();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let ending = if out.status.success() {
                match git::rev(&dir, "refs/heads/main") {
                    Some(h) if h == head => Ending::Served,
                    other => Ending::Failed(format!("cloned main {other:?}, not {head}")),
                }
            } else if stderr.contains("429") {
                Ending::Shed(stderr.lines().next().unwrap_or_default().to_owned())
            } else {
                Ending::Failed(stderr)
            };
            anyhow::Ok((took, ending))
        }
    });
    let results = futures::future::join_all(runs).await;
    let burst_took = burst.elapsed();
    done.store(true, Ordering::Relaxed);
    let sampled = sampler.await?;
    let shed_counted = shed_count(r3).await? - shed_before;
    let (mut served, mut shed, mut failed) = (vec![], vec![], vec![]);
    let mut shed_line = String::new();
    for r in results {
        let (took, ending) = r?;
        match ending {
            Ending::Served => served.push(took),
            Ending::Shed(line) => {
                shed.push(took);
                shed_line = line;
            }
            Ending::Failed(why) => failed.push(why),
        }
    }
    ensure!(
        failed.is_empty(),
        "{} clones failed other than by 429: {failed:?}",
        failed.len()
    );
    ensure!(
        shed_counted == shed.len() as f64,
        "git saw {} 429s, router3 counted {shed_counted}",
        shed.len()
    );
    served.sort();
    shed.sort();

    // The report.
    let load_end = loadavg();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{members}-member etcd, 3 votingd, routers 1 and 2 behind nginx ({}), router3 \
         limited; {} cores; load average {load_start} at the start, {load_end} at the end; \
         {:.0} s in all\n",
        refvote_tests::nginx::binary()?.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    )?;
    writeln!(
        out,
        "(a) `git clone --bare` of {large_mib} MiB of incompressible blobs (a {:.1} MiB pack), \
         {rounds} rounds alternating\n",
        size as f64 / (1 << 20) as f64
    )?;
    writeln!(
        out,
        "| path | median MiB/s | range | nginx / direct (median of rounds) | range |"
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- |")?;
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let (dlo, dhi) = range(&cd);
    let (nlo, nhi) = range(&cn);
    let (rlo, rhi) = range(&ratios);
    writeln!(
        out,
        "| direct to router1 | {:.1} | {dlo:.1}–{dhi:.1} | 1.00 | |",
        median(cd.clone())
    )?;
    writeln!(
        out,
        "| nginx → router1/router2 | {:.1} | {nlo:.1}–{nhi:.1} | {:.2} | {rlo:.2}–{rhi:.2} |",
        median(cn.clone()),
        median(ratios.clone())
    )?;
    writeln!(
        out,
        "\nnginx sent the measured clones' requests to router1 {} times, router2 {} times",
        clone_spread[0], clone_spread[1]
    )?;
    writeln!(
        out,
        "\n(b) small push (`git push` of one new commit on a branch), {pushes} per round \
         and side, {rounds} rounds alternating\n"
    )?;
    writeln!(
        out,
        "| path | p50 ms (median of rounds) | p99 ms (all {} pushes) | added p50 ms (median of rounds) | range |",
        all[0].len()
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- |")?;
    let (alo, ahi) = range(&added);
    writeln!(
        out,
        "| direct to router1 | {} | {} | 0.0 | |",
        ms(median_d(p50s[0].clone())),
        ms(pct(&all[0], 0.99))
    )?;
    writeln!(
        out,
        "| nginx → router1/router2 | {} | {} | {:.1} | {:.1}–{:.1} |",
        ms(median_d(p50s[1].clone())),
        ms(pct(&all[1], 0.99)),
        median(added.clone()) * 1000.0,
        alo * 1000.0,
        ahi * 1000.0
    )?;
    writeln!(
        out,
        "\nnginx sent the measured pushes' requests to router1 {} times, router2 {} times",
        push_spread[0], push_spread[1]
    )?;
    writeln!(
        out,
        "\n(c) {clones} concurrent `git clone`s of a one-commit repository straight to router3 \
         (upload_pack_per_repository = 8, max_queue_wait_ms = {limit_wait_ms})\n"
    )?;
    writeln!(
        out,
        "| served | 429 | time to 429 ms min / median / max | served clone ms median / max | peak queued | peak in progress | RSS KiB before / peak | all done after ms |"
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |")?;
    let three = |v: &[Duration]| match v {
        [] => "–".to_owned(),
        v => format!(
            "{} / {} / {}",
            ms(v[0]),
            ms(pct(v, 0.5)),
            ms(v[v.len() - 1])
        ),
    };
    let two = |v: &[Duration]| match v {
        [] => "–".to_owned(),
        v => format!("{} / {}", ms(pct(v, 0.5)), ms(v[v.len() - 1])),
    };
    writeln!(
        out,
        "| {} | {} | {} | {} | {} | {} | {rss_before} / {} | {} |",
        served.len(),
        shed.len(),
        three(&shed),
        two(&served),
        sampled.queued_peak,
        sampled.in_progress_peak,
        sampled.rss_peak.max(rss_before),
        ms(burst_took)
    )?;
    writeln!(
        out,
        "\n{} samples of RSS and the queue gauges; router3 counted {shed_counted} refusals{}",
        sampled.samples,
        if shed_line.is_empty() {
            String::new()
        } else {
            format!("; git printed: `{shed_line}`")
        }
    )?;
    drop(out);
    // nginx first, then the routers, nodes and etcd (the cluster's drop), each by pid.
    drop(nginx);
    drop(c);
    Ok(())
}
