//! The read benchmark (`scripts/bench-reads.sh`): read RPCs straight to a node and
//! through the router, against the git command that answers the same question run by
//! this benchmark, all in one run on a real cluster (one etcd member, three votingd
//! nodes, a router process) and the repository `tests/fixtures/read-repo.sh` builds.
//!
//! Each case is a [`Case`]: one gRPC call and the git CLI commands that answer the
//! same question (run one after the other, as a caller without the node would). Every
//! case is measured at concurrency 1 and CONCURRENCY (default 8) for SECONDS (default
//! 3) per side, the three sides (CLI, direct, router) alternating within each of
//! ROUNDS rounds (default 3); each figure is the median over the rounds. The cases
//! (issue 13's list), on a branch `bench` the benchmark adds to the fixture:
//!
//! - FindCommit of a branch: `git cat-file commit <branch>`;
//! - TreeEntry of a file: `git cat-file blob <rev>:<path>`;
//! - GetBlob of a 4 KiB blob: `git cat-file blob <oid>`;
//! - ListLastCommitsForTree of a 200-entry directory (changed over 20 commits):
//!   `git log -1 --format=%H <rev> -- <entry>` for each of the 200 entries;
//! - FindAllBranches with 1,000 branches: `git for-each-ref` of every branch with
//!   the commit fields Gitaly fills;
//! - CommitDiff of a 50-file commit: `git diff --patch --raw -z --find-renames=30%
//!   --no-abbrev --full-index A B`.
//!
//! Then votingd's resident memory (node1's process alone, and with its `git cat-file`
//! children) idle, and with 200 repositories' pools warm: 199 copies of the fixture's
//! repository placed in node1's storage, each read once straight through node1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use futures::future::BoxFuture;
use refvote_proto::gitaly::blob_service_client::BlobServiceClient;
use refvote_proto::gitaly::commit_service_client::CommitServiceClient;
use refvote_proto::gitaly::diff_service_client::DiffServiceClient;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::{
    CommitDiffRequest, FindAllBranchesRequest, FindCommitRequest, GetBlobRequest,
    ListLastCommitsForTreeRequest, TreeEntryRequest,
};
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

/// One read: the gRPC call (returns the bytes it received) and the git commands.
struct Case {
    name: &'static str,
    call: Call,
    cli: Vec<Vec<String>>,
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// What the benchmark adds to the fixture, on a branch `bench`: a 200-entry
/// directory changed over 20 commits, a 4 KiB blob, and 1,000 branches.
const BENCH_SCRIPT: &str = r#"
git checkout --quiet -b bench main
mkdir -p wide
for c in $(seq 1 20); do
    for f in $(seq 1 10); do
        i=$(( (c - 1) * 10 + f ))
        echo "entry $i, commit $c" > "wide/entry-$i.txt"
    done
    git add wide
    git commit --quiet -m "wide $c"
done
seq 1 1000 | sed 's/^/line of a four KiB blob /' | head -c 4096 > blob-4k.txt
git add blob-4k.txt
git commit --quiet -m "a 4 KiB blob"
git checkout --quiet main
for i in $(seq 1 1000); do echo "create refs/heads/many/branch-$i bench~$(( i % 20 ))"; done \
    | git update-ref --stdin
"#;

fn cases(rc: &ReadCluster) -> anyhow::Result<Vec<Case>> {
    let bench = rc.rev("bench")?;
    let blob = rc.rev("bench:blob-4k.txt")?;
    ensure!(
        rc.git(&["cat-file", "blob", &blob])?.len() == 4096,
        "a 4 KiB blob"
    );
    let entries: Vec<String> =
        String::from_utf8(rc.git(&["ls-tree", "--name-only", "-z", "bench:wide"])?)?
            .split('\0')
            .filter(|s| !s.is_empty())
            .map(|s| format!("wide/{s}"))
            .collect();
    ensure!(entries.len() == 200, "a 200-entry directory");
    // FindAllBranches lists remote-tracking branches too.
    let branches = rc.git(&[
        "for-each-ref",
        "--format=%(refname)",
        "refs/heads/",
        "refs/remotes/",
    ])?;
    let branch_count = branches.iter().filter(|b| **b == b'\n').count();
    ensure!(branch_count > 1000, "1,000 branches");

    let b = bench.clone();
    let find_commit: Call = Arc::new(move |ch: Channel| {
        let b = b.clone();
        Box::pin(async move {
            let c = CommitServiceClient::new(ch)
                .find_commit(FindCommitRequest {
                    repository: repo(REPO),
                    revision: b"bench".to_vec(),
                    trailers: false,
                })
                .await?
                .into_inner()
                .commit;
            ensure!(
                c.as_ref().is_some_and(|c| c.id == b),
                "FindCommit answered {c:?}"
            );
            Ok(c.map_or(0, |c| c.body.len()))
        })
    });
    let tree_entry: Call = Arc::new(move |ch: Channel| {
        Box::pin(async move {
            let mut stream = CommitServiceClient::new(ch)
                .tree_entry(TreeEntryRequest {
                    repository: repo(REPO),
                    revision: b"bench".to_vec(),
                    path: b"lib/app.rb".to_vec(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut bytes = 0;
            while let Some(m) = stream.message().await? {
                bytes += m.data.len();
            }
            ensure!(bytes > 0, "TreeEntry answered nothing");
            Ok(bytes)
        })
    });
    let o = blob.clone();
    let get_blob: Call = Arc::new(move |ch: Channel| {
        let o = o.clone();
        Box::pin(async move {
            let mut stream = BlobServiceClient::new(ch)
                .get_blob(GetBlobRequest {
                    repository: repo(REPO),
                    oid: o,
                    limit: -1,
                })
                .await?
                .into_inner();
            let mut bytes = 0;
            while let Some(m) = stream.message().await? {
                bytes += m.data.len();
            }
            ensure!(bytes == 4096, "GetBlob answered {bytes} bytes");
            Ok(bytes)
        })
    });
    let b = bench.clone();
    let last_commits: Call = Arc::new(move |ch: Channel| {
        let b = b.clone();
        Box::pin(async move {
            let mut stream = CommitServiceClient::new(ch)
                .list_last_commits_for_tree(ListLastCommitsForTreeRequest {
                    repository: repo(REPO),
                    revision: b,
                    path: b"wide/".to_vec(),
                    limit: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut n = 0;
            while let Some(m) = stream.message().await? {
                n += m.commits.len();
            }
            ensure!(n == 200, "ListLastCommitsForTree answered {n} entries");
            Ok(n)
        })
    });
    let find_all_branches: Call = Arc::new(move |ch: Channel| {
        Box::pin(async move {
            let mut stream = RefServiceClient::new(ch)
                .find_all_branches(FindAllBranchesRequest {
                    repository: repo(REPO),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut n = 0;
            while let Some(m) = stream.message().await? {
                n += m.branches.len();
            }
            ensure!(n == branch_count, "FindAllBranches answered {n} branches");
            Ok(n)
        })
    });

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
    let per_entry = entries
        .iter()
        .map(|e| args(&["log", "-1", "--format=%H", &bench, "--", e]))
        .collect();
    Ok(vec![
        Case {
            name: "FindCommit",
            call: find_commit,
            cli: vec![args(&["cat-file", "commit", "bench"])],
        },
        Case {
            name: "TreeEntry (a 40-line file)",
            call: tree_entry,
            cli: vec![args(&["cat-file", "blob", "bench:lib/app.rb"])],
        },
        Case {
            name: "GetBlob (4 KiB)",
            call: get_blob,
            cli: vec![args(&["cat-file", "blob", &blob])],
        },
        Case {
            name: "ListLastCommitsForTree (200-entry directory)",
            call: last_commits,
            cli: per_entry,
        },
        Case {
            name: "FindAllBranches (1,000 branches)",
            call: find_all_branches,
            cli: vec![args(&[
                "for-each-ref",
                "--format=%(refname)%00%(objectname)%00%(contents:subject)%00%(authorname)%00%(authoremail)%00%(authordate:unix)%00%(committername)%00%(committeremail)%00%(committerdate:unix)%00%(contents)%00%(tree)%00%(parent)",
                "refs/heads/",
                "refs/remotes/",
            ])],
        },
        Case {
            name: "CommitDiff (50-file commit)",
            call: commit_diff,
            cli: vec![args(&[
                "diff",
                "--patch",
                "--raw",
                "-z",
                "--find-renames=30%",
                "--no-abbrev",
                "--full-index",
                &left,
                &right,
            ])],
        },
    ])
}

/// Latencies and calls per second of `concurrency` loops of `one` for `secs`.
async fn measure<F>(
    concurrency: usize,
    secs: u64,
    one: F,
) -> anyhow::Result<(Duration, Duration, f64)>
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
    let rc = ReadCluster::start(Some(BENCH_SCRIPT)).await?;
    let direct = Channel::from_shared(rc.cluster.nodes[0].grpc_url())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let routed = rc.channel().await?;
    let replica = rc.replica();
    let idle = memory(&rc)?;
    println!(
        "machine: {} CPUs, load average {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for case in cases(&rc)? {
        // The call works and returns what git prints, before anything is timed.
        let bytes = (case.call)(direct.clone()).await?;
        println!("\n## {} ({bytes} bytes or items per answer)\n", case.name);
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
                            for command in &cli {
                                let out = tokio::process::Command::new("git")
                                    .current_dir(&dir)
                                    .args(command)
                                    .env("GIT_CONFIG_NOSYSTEM", "1")
                                    .env("GIT_CONFIG_GLOBAL", "/dev/null")
                                    .output()
                                    .await?;
                                ensure!(out.status.success(), "git failed: {out:?}");
                            }
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
    warm_pools(&rc, &direct, 200).await?;
    let warm = memory(&rc)?;
    println!("\n## votingd resident memory (node1)\n");
    println!("| state | votingd RSS MiB | git cat-file processes | their RSS MiB (summed) |");
    println!("| --- | --- | --- | --- |");
    for (state, m) in [
        ("started, no read yet (pools empty)", &idle),
        ("200 repositories' pools warm", &warm),
    ] {
        println!(
            "| {state} | {:.1} | {} | {:.1} |",
            m.own as f64 / MIB,
            m.children,
            m.children_rss as f64 / MIB
        );
    }
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

/// Resident memory of node1's votingd and of its `git cat-file` children.
struct Memory {
    own: u64,
    children: usize,
    children_rss: u64,
}

fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn memory(rc: &ReadCluster) -> anyhow::Result<Memory> {
    let pid = rc.cluster.nodes[0]
        .pid()
        .ok_or_else(|| anyhow::anyhow!("node1 runs"))?;
    let own = rss(pid).ok_or_else(|| anyhow::anyhow!("no RSS for votingd {pid}"))?;
    let (mut children, mut children_rss) = (0, 0);
    for entry in std::fs::read_dir("/proc")? {
        let Ok(child) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read_to_string(format!("/proc/{child}/cmdline")).unwrap_or_default();
        if ppid == Some(pid) && cmdline.contains("cat-file") {
            children += 1;
            children_rss += rss(child).unwrap_or(0);
        }
    }
    Ok(Memory {
        own,
        children,
        children_rss,
    })
}

/// Places `count - 1` copies of the fixture's repository in node1's storage beside it
/// and reads each once straight through node1 (FindCommit, TreeEntry, GetBlob), so
/// `count` repositories have a warm pool there.
async fn warm_pools(rc: &ReadCluster, direct: &Channel, count: usize) -> anyhow::Result<()> {
    let node = &rc.cluster.nodes[0];
    let source = node.repo(REPO);
    let blob = rc.rev("bench:blob-4k.txt")?;
    for i in 1..count {
        let relative = format!("group/warm-{i}.git");
        let target = node.repo(&relative);
        if !target.exists() {
            let out = std::process::Command::new("cp")
                .arg("-a")
                .arg(&source)
                .arg(&target)
                .output()?;
            ensure!(out.status.success(), "copying the repository: {out:?}");
        }
    }
    for i in 0..count {
        let relative = if i == 0 {
            REPO.to_owned()
        } else {
            format!("group/warm-{i}.git")
        };
        let r = Some(refvote_proto::gitaly::Repository {
            storage_name: "default".into(),
            relative_path: relative,
            ..Default::default()
        });
        let c = CommitServiceClient::new(direct.clone())
            .find_commit(FindCommitRequest {
                repository: r.clone(),
                revision: b"bench".to_vec(),
                trailers: false,
            })
            .await?
            .into_inner();
        ensure!(c.commit.is_some(), "FindCommit in copy {i}");
        let mut stream = BlobServiceClient::new(direct.clone())
            .get_blob(GetBlobRequest {
                repository: r,
                oid: blob.clone(),
                limit: -1,
            })
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
    }
    Ok(())
}
