//! The GitLab hooks benchmark (`scripts/bench-gitlab-hooks.sh`): what GitLab's hooks
//! cost a push, measured in one run against one local internal-API server, with real
//! etcd, real votingd nodes, real `refvote-router` processes and real git.
//!
//! Two clusters of three nodes each, started alike, one router each: `plain`, whose
//! nodes have no `[gitlab]` section, and `gitlab`, whose nodes call the stand-in for
//! GitLab's internal API ([`refvote_tests::gitlab::GitlabApi`], a real HTTP server on
//! loopback in this process, allowing everything as GitLab does for an allowed push).
//! Every push is a `PostReceivePack` through the router creating one new branch with
//! one small commit, as workhorse sends it. Three kinds, alternating push by push in
//! each round:
//!
//! - **off**: `plain` cluster, no `gl_id`: no GitLab side at all (the baseline);
//! - **gated, no API**: `plain` cluster, with `gl_id`: the transaction designates a
//!   voter, which records a verdict (custom hooks only, none installed) and runs
//!   post-receive; no HTTP;
//! - **on**: `gitlab` cluster, with `gl_id`: `/allowed`, `/pre_receive` and
//!   `/post_receive` on the stand-in, once per push.
//!
//! Also measured, from this process: one HTTP round trip to the stand-in's `/allowed`
//! (the floor of each of the three calls). Figures are medians over ROUNDS rounds of
//! PUSHES pushes per kind; the ratio to `off` is the median of the per-round ratios.
//! The stand-in's request counts are checked: exactly one `/allowed` and one
//! `/post_receive` per `on` push.
//!
//! Environment: ROUNDS (default 3), PUSHES (default 30), ETCD_MEMBERS (default 3);
//! SHOW_LOGS set prints the `gitlab` side's node and router logs' last lines at the end.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::{PostReceivePackRequest, Repository};
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::git;
use refvote_tests::gitlab::{GitlabApi, allowing, respond};
use refvote_tests::node::NodeOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

const REPO: &str = "bench/push.git";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn median_d(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Small commits on top of `main` in `work`, one per branch name; the bodies of the
/// receive-pack requests that create them (command with `report-status side-band-64k`,
/// flush, pack), as git sends them.
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
            "{} {new} refs/heads/{branch}\0report-status side-band-64k\n",
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

/// One push of `body` through `ch`, as the GitLab user `gl_id` if given; its latency.
async fn push(ch: &Channel, body: Vec<u8>, gl_id: Option<&str>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let req = PostReceivePackRequest {
        repository: Some(Repository {
            storage_name: "default".into(),
            relative_path: REPO.into(),
            gl_repository: "project-1".into(),
            gl_project_path: "group/project".into(),
            ..Default::default()
        }),
        data: body,
        gl_id: gl_id.unwrap_or_default().into(),
        gl_username: gl_id.map(|_| "jane".to_owned()).unwrap_or_default(),
        gl_repository: "project-1".into(),
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

/// One HTTP/1.1 `POST /api/v4/internal/allowed` to the stand-in at `url` on a fresh
/// connection (as the nodes' client does per call); its round trip.
async fn allowed_round_trip(url: &str) -> anyhow::Result<Duration> {
    let addr = url.strip_prefix("http://").context("an http:// URL")?;
    let body = r#"{"action":"git-receive-pack","changes":"","protocol":"http"}"#;
    let request = format!(
        "POST /api/v4/internal/allowed HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let t = Instant::now();
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await?;
    let took = t.elapsed();
    ensure!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    Ok(took)
}

struct Side {
    c: VoteCluster,
    ch: Channel,
    work: git::WorkRepo,
}

async fn side(opts: NodeOptions, members: usize) -> anyhow::Result<Side> {
    let c = Fixture::nodes(3)
        .etcd_members(members)
        .node_options(opts)
        .seeded(REPO)
        .router()
        .start()
        .await?;
    let ch = c.routers[0].channel().await?;
    let work = c.work("w")?;
    Ok(Side { c, ch, work })
}

#[derive(Clone, Copy)]
enum Kind {
    Off,
    Gated,
    On,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Off => "off: no `[gitlab]`, no `gl_id` (baseline)",
            Kind::Gated => "gated, no API: no `[gitlab]`, with `gl_id`",
            Kind::On => "on: `[gitlab]` → the stand-in, with `gl_id`",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(
        env("ROUNDS", 3),
        env("PUSHES", 30),
        env("ETCD_MEMBERS", 3),
    ))
}

async fn run(rounds: usize, pushes: usize, members: usize) -> anyhow::Result<()> {
    let api_dir = tempfile::tempdir()?;
    let api = GitlabApi::start(api_dir.path(), respond(allowing)).await?;
    let plain = side(NodeOptions::default(), members).await?;
    let gitlab = side(NodeOptions::default().config(api.configure()), members).await?;
    let n = pushes * rounds;
    let mut bodies = [
        push_bodies(&plain.work.path, "off", n)?.into_iter(),
        push_bodies(&plain.work.path, "gated", n)?.into_iter(),
        push_bodies(&gitlab.work.path, "on", n)?.into_iter(),
    ];
    // One of each, unmeasured: connections, the routers' first reads.
    for (i, kind) in [Kind::Off, Kind::Gated, Kind::On].into_iter().enumerate() {
        let (ch, gl_id) = match kind {
            Kind::Off => (&plain.ch, None),
            Kind::Gated => (&plain.ch, Some("user-1")),
            Kind::On => (&gitlab.ch, Some("user-1")),
        };
        push(ch, bodies[i].next().context("body")?, gl_id).await?;
    }
    api.clear();
    let mut p50 = [vec![], vec![], vec![]];
    let mut p99 = [vec![], vec![], vec![]];
    let mut ratio = [vec![], vec![], vec![]];
    let mut http = vec![];
    for _ in 0..rounds {
        let mut lat = [vec![], vec![], vec![]];
        for _ in 0..pushes - 1 {
            for (i, kind) in [Kind::Off, Kind::Gated, Kind::On].into_iter().enumerate() {
                let (ch, gl_id) = match kind {
                    Kind::Off => (&plain.ch, None),
                    Kind::Gated => (&plain.ch, Some("user-1")),
                    Kind::On => (&gitlab.ch, Some("user-1")),
                };
                lat[i].push(push(ch, bodies[i].next().context("body")?, gl_id).await?);
            }
            http.push(allowed_round_trip(&api.url).await?);
        }
        for (i, l) in lat.iter_mut().enumerate() {
            l.sort();
            p50[i].push(pct(l, 0.5));
            p99[i].push(pct(l, 0.99));
        }
        for i in 0..3 {
            ratio[i]
                .push(p50[i].last().unwrap().as_secs_f64() / p50[0].last().unwrap().as_secs_f64());
        }
    }
    let on_pushes = rounds * (pushes - 1);
    // The stand-in saw each `on` push once (and the direct round trips).
    let allowed = api.calls("allowed").len();
    let post = api.calls("post_receive").len();
    ensure!(
        allowed == on_pushes + http.len() && post == on_pushes,
        "/allowed {allowed} (expected {} from pushes, {} direct), /post_receive {post} (expected {on_pushes})",
        on_pushes,
        http.len()
    );
    http.sort();

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "small push (one new branch, PostReceivePack through the router), {} measured per round and kind, {rounds} rounds, etcd {members} member(s)\n",
        pushes - 1
    )?;
    writeln!(
        out,
        "| kind | p50 ms | p99 ms | p50 / off (median of rounds) | range | added p50 ms |"
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- | --- |")?;
    let base = median_d(p50[0].clone());
    for (i, kind) in [Kind::Off, Kind::Gated, Kind::On].into_iter().enumerate() {
        let r = &ratio[i];
        let (lo, hi) = r
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        let p = median_d(p50[i].clone());
        writeln!(
            out,
            "| {} | {} | {} | {:.2} | {lo:.2}–{hi:.2} | {} |",
            kind.name(),
            ms(p),
            ms(median_d(p99[i].clone())),
            median(r.clone()),
            ms(p.saturating_sub(base)),
        )?;
    }
    writeln!(
        out,
        "\none HTTP round trip to the stand-in's /allowed from this process (fresh connection): p50 {} ms, p99 {} ms ({} calls)",
        ms(pct(&http, 0.5)),
        ms(pct(&http, 0.99)),
        http.len()
    )?;
    writeln!(
        out,
        "the stand-in received {allowed} /allowed ({on_pushes} from `on` pushes), {} /pre_receive, {post} /post_receive",
        api.calls("pre_receive").len()
    )?;
    if std::env::var_os("SHOW_LOGS").is_some() {
        for n in &gitlab.c.nodes {
            eprintln!("--- {} (gitlab side)\n{}", n.name, n.log_tail(80));
        }
        eprintln!(
            "--- router (gitlab side)\n{}",
            gitlab.c.routers[0].log_tail(80)
        );
    }
    drop(plain.c);
    drop(gitlab.c);
    Ok(())
}
