//! The sidechannel benchmark (`scripts/bench-sidechannel.sh`): clone throughput as
//! GitLab's clients fetch today, through the router and straight to a node, in one
//! run, against real etcd, three real votingd nodes, a real `refvote-router` process
//! and real git.
//!
//! A client dials each address exactly as gitlab-shell and workhorse do (backchannel,
//! yamux, gRPC on the first stream; [`refvote_tests::gitlab_client`]) and fetches the
//! whole of a large repository (incompressible blobs, protocol v0, `want` + `done`):
//!
//! - `PostUploadPackWithSidechannel` (workhorse): the request body up the sidechannel,
//!   the raw answer down;
//! - `SSHUploadPackWithSidechannel` (gitlab-shell): the same wants on stdin, the
//!   side-band answer demultiplexed;
//! - and, as the reference the router benchmark measures, plain `PostUploadPack` over
//!   a plain HTTP/2 connection (the pack in protobuf messages).
//!
//! Each round fetches every variant straight from node1 and through the router,
//! alternating; MB/s is over the bytes received, each figure the median over ROUNDS
//! rounds (default 5), with the router/direct ratio per round and its median.
//!
//! Environment: ROUNDS (default 5), LARGE_MIB (default 64), ETCD_MEMBERS (default 3).

use std::io::Write;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::ensure;
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::{PostUploadPackRequest, Repository};
use refvote_tests::cluster::VoteCluster;
use refvote_tests::git;
use refvote_tests::gitlab_client::GitlabClient;
use refvote_tests::router::{Router, RouterOptions};
use tokio::io::AsyncWrite;
use tonic::transport::Channel;

const REPO: &str = "bench/large.git";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Incompressible bytes (xorshift), as the router benchmark's large repository.
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

/// A writer that only counts what it is given.
#[derive(Default)]
struct Count(u64);

impl AsyncWrite for Count {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0 += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What a v0 client sends for a full fetch of `want`: one want line with
/// capabilities, a flush, `done`.
fn wants(want: &str) -> Vec<u8> {
    let line = format!("want {want} side-band-64k ofs-delta\n");
    format!("{:04x}{line}00000009done\n", line.len() + 4).into_bytes()
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// workhorse: PostUploadPackWithSidechannel.
    Http,
    /// gitlab-shell: SSHUploadPackWithSidechannel.
    Ssh,
    /// plain PostUploadPack, the pack in protobuf messages.
    Plain,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Http => "PostUploadPackWithSidechannel (workhorse)",
            Variant::Ssh => "SSHUploadPackWithSidechannel (gitlab-shell)",
            Variant::Plain => "PostUploadPack, plain gRPC (reference)",
        }
    }
}

/// One address's two connections: a backchannel one and a plain one.
struct Target {
    gitlab: GitlabClient,
    plain: Channel,
}

/// One full fetch: the bytes received and the time it took.
async fn fetch(t: &Target, v: Variant, want: &str) -> anyhow::Result<(u64, Duration)> {
    let body = wants(want);
    let start = Instant::now();
    let bytes = match v {
        Variant::Http => {
            let mut out = Count::default();
            t.gitlab
                .http_upload_pack(REPO, "", &body[..], &mut out)
                .await?;
            out.0
        }
        Variant::Ssh => {
            let (mut out, mut err) = (Count::default(), Count::default());
            t.gitlab
                .ssh_upload_pack(REPO, "", &body[..], &mut out, &mut err)
                .await?;
            out.0 + err.0
        }
        Variant::Plain => {
            let req = PostUploadPackRequest {
                repository: Some(Repository {
                    storage_name: "default".into(),
                    relative_path: REPO.into(),
                    ..Default::default()
                }),
                data: body,
                ..Default::default()
            };
            let mut s = SmartHttpServiceClient::new(t.plain.clone())
                .max_decoding_message_size(64 << 20)
                .post_upload_pack(futures::stream::iter([req]))
                .await?
                .into_inner();
            let mut n = 0u64;
            while let Some(m) = s.message().await? {
                n += m.data.len() as u64;
            }
            n
        }
    };
    Ok((bytes, start.elapsed()))
}

async fn target(addr: std::net::SocketAddr) -> anyhow::Result<Target> {
    Ok(Target {
        gitlab: GitlabClient::dial(addr, None, None).await?,
        plain: Channel::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?,
    })
}

fn main() -> anyhow::Result<()> {
    let rounds = env("ROUNDS", 5);
    let large_mib = env("LARGE_MIB", 64);
    let members = env("ETCD_MEMBERS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(rounds, large_mib, members))
}

async fn run(rounds: usize, large_mib: usize, members: usize) -> anyhow::Result<()> {
    let c = VoteCluster::start(3, members).await?;
    c.create_repo(REPO).await?;
    let large = c.work("large")?;
    for i in 0..large_mib.div_ceil(4) {
        std::fs::write(
            large.path.join(format!("blob-{i}.bin")),
            noise(4 << 20, i as u64 + 1),
        )?;
    }
    git::git(&large.path, &["add", "-A"])?;
    git::git(&large.path, &["commit", "--quiet", "-m", "large"])?;
    let head = git::git(&large.path, &["rev-parse", "HEAD"])?;
    for n in &c.nodes {
        let out = git::push(&large.path, &n.repo(REPO), &["main"], &[]).await?;
        ensure!(out.status.success(), "{out:?}");
    }
    // The work tree's copy is no longer needed; the nodes hold the repository.
    std::fs::remove_dir_all(&large.path)?;
    let router = Router::start_with(
        "router1",
        c.dir.path(),
        &c.etcd.endpoints(),
        &RouterOptions::default(),
    )
    .await?;
    let direct = target(c.nodes[0].grpc_addr()).await?;
    let via = target(router.addr()).await?;
    eprintln!(
        "cluster up: {members}-member etcd, 3 votingd, refvote-router; {rounds} rounds of {large_mib} MiB"
    );
    let variants = [Variant::Http, Variant::Ssh, Variant::Plain];
    // Warm both paths (connections, the router's backchannel to node1, page cache).
    for v in variants {
        fetch(&direct, v, &head).await?;
        fetch(&via, v, &head).await?;
    }
    let mut rows = Vec::new();
    for v in variants {
        let (mut d, mut r, mut ratio) = (vec![], vec![], vec![]);
        let mut size = 0;
        for _ in 0..rounds {
            let (b, t) = fetch(&direct, v, &head).await?;
            let (b2, t2) = fetch(&via, v, &head).await?;
            // The same pack; git's progress lines on the side band may differ.
            ensure!(
                b2.abs_diff(b) < 64 * 1024,
                "{}: router {b2} bytes, direct {b}",
                v.name()
            );
            let (md, mr) = (
                b as f64 / t.as_secs_f64() / 1e6,
                b2 as f64 / t2.as_secs_f64() / 1e6,
            );
            d.push(md);
            r.push(mr);
            ratio.push(mr / md);
            size = b;
        }
        let spread = |v: &[f64]| {
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(0.0, f64::max);
            format!("{lo:.2}–{hi:.2}")
        };
        rows.push((
            v,
            size,
            median(d.clone()),
            median(r.clone()),
            median(ratio.clone()),
            spread(&ratio),
        ));
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "full fetch of {REPO} ({large_mib} MiB of incompressible blobs), {rounds} rounds, direct = node1, router = refvote-router to an up-to-date replica\n"
    )?;
    writeln!(
        out,
        "| RPC | bytes received | direct MB/s | router MB/s | router / direct (median of rounds) | range |"
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- | --- |")?;
    for (v, size, md, mr, ratio, spread) in rows {
        writeln!(
            out,
            "| {} | {size} | {md:.1} | {mr:.1} | {ratio:.2} | {spread} |",
            v.name()
        )?;
    }
    drop(out);
    drop(router);
    Ok(())
}
