//! DESIGN.md §5's exact-timing scenarios 4, 5 and 6, each on a real cluster
//! ([`ChaosCluster`]: a 3-member etcd, three votingd nodes, routers serving gRPC and git
//! smart HTTP, every process real, every link a cuttable proxy), with the moments that
//! matter forced through fault-point holds ([`Hold`]) rather than hoped for:
//!
//! 4. three pushes to one branch through three routers started behind one barrier,
//!    round after round: each finishes within [`PROMPT`], the outcomes are ones git
//!    allows (successes form a chain of fast-forwards ending at the branch's value,
//!    nothing reported failed is left on it), the up-to-date replicas agree, and at
//!    least a majority of the replicas is still up to date right after every round;
//! 5. deletes of a ref packed on one replica and loose on the others (`git push
//!    --delete` and `DeleteRefs`) commit everywhere and outdate nobody; a `DeleteRefs`
//!    with one replica's refs directory immutable (`chattr +i`, since the tests run as
//!    root) commits on the other two, outdates that one only, and repair brings it back
//!    once the directory is writable again;
//! 6. `RemoveRepositoryReplicas`, `CreateRepositoryReplicas` and
//!    `SynchronizeRepositoryReplicas` called while a push's transaction exists and no
//!    voter has been called yet (the router held at `after-begin`) wait for it and lose
//!    nothing; and the etcd leader SIGKILLed while every voter's vote is stored and
//!    none decided (`after-vote-recorded`), and while the router is about to finalize
//!    (`before-finalize`), leaves an outcome the replicas bear out.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use refvote_cluster::RepoId;
use refvote_cluster::faults;
use refvote_cluster::records::JobRecord;
use refvote_cluster::repository::RepoView;
use refvote_proto::admin::admin_service_client::AdminServiceClient;
use refvote_proto::admin::{
    CreateRepositoryReplicasRequest, GetRepositoryReplicasRequest, RemoveRepositoryReplicasRequest,
    RepositoryName, SynchronizeRepositoryReplicasRequest,
};
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::{DeleteRefsRequest, FindBranchRequest, PostReceivePackRequest};
use refvote_tests::chaos::history::Outcome;
use refvote_tests::chaos::workload::{classify, classify_status};
use refvote_tests::chaos::{ChaosCluster, REPO, repository};
use refvote_tests::etcd::Etcd;
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::hold::Hold;
use refvote_tests::proc::{wait_for, wait_until};
use tonic::transport::Channel;

/// Every push of scenario 4 must finish within this, measured from the barrier.
const PROMPT: Duration = Duration::from_secs(5);
/// Any single push or admin call: past this the test fails instead of hanging.
const CALL_LIMIT: Duration = Duration::from_secs(60);
/// Repairs and open transactions settle within this.
const SETTLE: Duration = Duration::from_secs(40);
/// A held task is reached within this.
const REACH: Duration = Duration::from_secs(20);

/// The cluster, its repository, a work repository with `main` pushed through router 1.
async fn cluster(routers: usize) -> anyhow::Result<(ChaosCluster, RepoId, WorkRepo)> {
    let c = ChaosCluster::start(3, routers).await?;
    let id = c.create_repo().await?;
    let work = WorkRepo::new(&c.dir.path().join("work").join("w"))?;
    work.commit("main", "first")?;
    let (outcome, text, _) = push(&work.path, &c.http[0], &["main"]).await?;
    ensure!(outcome == Outcome::Ack, "the first push failed: {text}");
    Ok((c, id, work))
}

/// `git push` through a router's smart HTTP; what the client was told, git's output,
/// and how long it took.
async fn push(
    work: &Path,
    url: &str,
    refspecs: &[&str],
) -> anyhow::Result<(Outcome, String, Duration)> {
    let t0 = Instant::now();
    let out = tokio::time::timeout(CALL_LIMIT, git::push(work, Path::new(url), refspecs, &[]))
        .await
        .with_context(|| format!("git push {refspecs:?} still running after {CALL_LIMIT:?}"))??;
    let took = t0.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome = match out.status.success() {
        true => Outcome::Ack,
        false => classify(&text).0,
    };
    Ok((outcome, text, took))
}

/// A push in a task of its own, so the test can act while it is held.
fn spawn_push(
    work: &Path,
    url: &str,
    refspec: &str,
) -> tokio::task::JoinHandle<anyhow::Result<(Outcome, String, Duration)>> {
    let (work, url, refspec) = (work.to_owned(), url.to_owned(), refspec.to_owned());
    tokio::spawn(async move { push(&work, &url, &[&refspec]).await })
}

fn name() -> Option<RepositoryName> {
    Some(RepositoryName {
        virtual_storage: "default".into(),
        relative_path: REPO.into(),
    })
}

/// The assigned replicas recorded up to date (at the repository's generation).
fn up_to_date(view: &RepoView) -> Vec<String> {
    view.record
        .assigned
        .iter()
        .filter(|n| {
            view.replicas
                .get(*n)
                .is_some_and(|(r, _)| r.is_up_to_date(&view.record))
        })
        .cloned()
        .collect()
}

/// The repository's records, retried while etcd elects a leader.
async fn view(c: &ChaosCluster, id: &RepoId) -> anyhow::Result<RepoView> {
    wait_for("the repository's records", Duration::from_secs(15), || {
        let (store, id) = (c.store.clone(), id.clone());
        async move { Ok(store.repo_view(&id).await?) }
    })
    .await
}

fn disk(c: &ChaosCluster, node: &str, refname: &str) -> Option<String> {
    let n = c.nodes.iter().find(|n| n.name == node).expect("known node");
    git::rev(&n.repo(REPO), refname)
}

/// The branch's commit as a read through `ch` sees it.
async fn read_branch(ch: &Channel, branch: &str) -> anyhow::Result<Option<String>> {
    let resp = RefServiceClient::new(ch.clone())
        .find_branch(FindBranchRequest {
            repository: Some(repository()),
            name: branch.as_bytes().to_vec(),
        })
        .await
        .with_context(|| format!("FindBranch {branch}"))?;
    Ok(resp
        .into_inner()
        .branch
        .and_then(|b| b.target_commit)
        .map(|c| c.id))
}

/// Whether `a` is `b` or an ancestor of it (both in `work`).
fn is_ancestor(work: &Path, a: &str, b: &str) -> anyhow::Result<bool> {
    let st = std::process::Command::new("git")
        .current_dir(work)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .args(["merge-base", "--is-ancestor", a, b])
        .status()?;
    match st.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!("git merge-base --is-ancestor {a} {b} failed: {st}"),
    }
}

/// Every replica level: all up to date, no open transaction, one set of refs on disk.
/// Returns how long the settling took.
async fn level(c: &ChaosCluster, id: &RepoId) -> anyhow::Result<Duration> {
    let took = c.settle(id, SETTLE).await.with_context(|| logs(c))?;
    let view = view(c, id).await?;
    let refs: BTreeSet<String> = view
        .record
        .assigned
        .iter()
        .map(|n| {
            let node = c.nodes.iter().find(|x| &x.name == n).expect("known node");
            git::refs(&node.repo(REPO))
        })
        .collect();
    ensure!(refs.len() == 1, "replicas' refs differ on disk: {refs:#?}");
    Ok(took)
}

fn logs(c: &ChaosCluster) -> String {
    let mut s = String::new();
    for n in &c.nodes {
        s.push_str(&format!("--- {} ---\n{}\n", n.name, n.log_tail(25)));
    }
    for r in &c.routers {
        s.push_str(&format!("--- {} ---\n{}\n", r.name, r.log_tail(25)));
    }
    s
}

// ---------------------------------------------------------------------------------
// Scenario 4
// ---------------------------------------------------------------------------------

/// The body git sends to receive-pack to move `refname` from `old` to `new`.
fn receive_pack_body(work: &Path, old: &str, new: &str, refname: &str) -> anyhow::Result<Vec<u8>> {
    let line = format!("{old} {new} {refname}\0report-status\n");
    let mut body = format!("{:04x}{line}0000", line.len() + 4).into_bytes();
    let mut child = std::process::Command::new("git")
        .current_dir(work)
        .args(["pack-objects", "--stdout", "--revs", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        writeln!(stdin, "{new}\n^{old}")?;
    }
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "pack-objects failed");
    body.extend_from_slice(&out.stdout);
    Ok(body)
}

/// `PostReceivePack` with `body`: receive-pack's report, or the call's status.
async fn post_receive_pack(ch: Channel, body: Vec<u8>) -> Result<String, tonic::Status> {
    let frames: Vec<PostReceivePackRequest> = body
        .chunks(64 * 1024)
        .enumerate()
        .map(|(i, data)| PostReceivePackRequest {
            repository: if i == 0 { Some(repository()) } else { None },
            data: data.to_vec(),
            gl_id: "user-1".into(),
            ..Default::default()
        })
        .collect();
    let mut stream = SmartHttpServiceClient::new(ch)
        .post_receive_pack(futures::stream::iter(frames))
        .await?
        .into_inner();
    let mut report = Vec::new();
    while let Some(m) = stream.next().await {
        report.extend_from_slice(&m?.data);
    }
    Ok(String::from_utf8_lossy(&report).into_owned())
}

/// What a `PostReceivePack` client was told about `refname`.
fn receive_pack_outcome(r: &Result<String, tonic::Status>, refname: &str) -> Outcome {
    match r {
        Ok(report) if report.contains(&format!("ok {refname}")) => Outcome::Ack,
        // An answer with the ref refused comes only from a transaction that committed
        // nothing anywhere (the router answers from a promoted replica otherwise).
        Ok(report) if report.contains(&format!("ng {refname}")) => Outcome::Failed,
        Ok(_) => Outcome::Unknown,
        // The router's "changed nothing": no key of the transaction was committed.
        Err(s) if s.message().contains("changed nothing") => Outcome::Failed,
        Err(s) => classify_status(s).0,
    }
}

/// One push of a round: its commit, what its client was told (and the detail), how
/// long it took from the barrier, and when it started relative to the first.
struct Raced {
    commit: String,
    outcome: Outcome,
    detail: String,
    took: Duration,
    started: Instant,
}

/// Scenario 4, round kind A: three commits each on `base`, sent at once as raw
/// `PostReceivePack` calls (what Workhorse sends for a push), one per router.
async fn race_receive_pack(
    work: &WorkRepo,
    channels: &[Channel],
    round: usize,
    base: &str,
) -> anyhow::Result<Vec<Raced>> {
    let mut bodies = Vec::new();
    let mut commits = Vec::new();
    for k in 0..3 {
        let branch = format!("r{round}-{k}");
        git::git(&work.path, &["checkout", "--quiet", "-B", &branch, base])?;
        let commit = work.commit(&branch, &format!("round {round} writer {k}"))?;
        bodies.push(receive_pack_body(
            &work.path,
            base,
            &commit,
            "refs/heads/race",
        )?);
        commits.push(commit);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let tasks: Vec<_> = (0..3)
        .map(|k| {
            let (ch, body, barrier) = (channels[k].clone(), bodies[k].clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let started = Instant::now();
                let r = tokio::time::timeout(CALL_LIMIT, post_receive_pack(ch, body)).await;
                (started, started.elapsed(), r)
            })
        })
        .collect();
    let mut raced = Vec::new();
    for (k, t) in tasks.into_iter().enumerate() {
        let (started, took, r) = t.await?;
        let r = r.map_err(|_| anyhow::anyhow!("push {k} still running after {CALL_LIMIT:?}"))?;
        raced.push(Raced {
            commit: commits[k].clone(),
            outcome: receive_pack_outcome(&r, "refs/heads/race"),
            detail: match &r {
                Ok(report) => report.replace('\n', " | "),
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            },
            took,
            started,
        });
    }
    Ok(raced)
}

/// Scenario 4, round kind B: a chain of three commits (each on the one before), pushed
/// at once by three `git push` processes, one per router, each reading the branch's
/// value itself: they may serialize as fast-forwards.
async fn race_git_push(
    c: &ChaosCluster,
    work: &WorkRepo,
    round: usize,
    base: &str,
) -> anyhow::Result<Vec<Raced>> {
    let branch = format!("r{round}");
    git::git(&work.path, &["checkout", "--quiet", "-B", &branch, base])?;
    let mut commits = Vec::new();
    for k in 0..3 {
        commits.push(work.commit(&branch, &format!("round {round} link {k}"))?);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let tasks: Vec<_> = (0..3)
        .map(|k| {
            let (work, url, barrier) = (work.path.clone(), c.http[k].clone(), barrier.clone());
            let refspec = format!("{}:refs/heads/race", commits[k]);
            tokio::spawn(async move {
                barrier.wait().await;
                let started = Instant::now();
                (started, push(&work, &url, &[&refspec]).await)
            })
        })
        .collect();
    let mut raced = Vec::new();
    for (k, t) in tasks.into_iter().enumerate() {
        let (started, r) = t.await?;
        let (outcome, text, took) = r?;
        raced.push(Raced {
            commit: commits[k].clone(),
            outcome,
            detail: text.replace('\n', " | "),
            took,
            started,
        });
    }
    Ok(raced)
}

/// The checks after a round; returns the branch's new value.
async fn check_round(
    c: &ChaosCluster,
    id: &RepoId,
    work: &WorkRepo,
    channels: &[Channel],
    round: usize,
    base: &str,
    raced: &[Raced],
) -> anyhow::Result<(String, usize)> {
    // Right after the round, before any repair can help: a majority stays up to date.
    let view = view(c, id).await?;
    let up = up_to_date(&view);
    let first = raced.iter().map(|r| r.started).min().expect("three pushes");
    let spread = raced
        .iter()
        .map(|r| r.started - first)
        .max()
        .unwrap_or_default();
    let took: Vec<_> = raced.iter().map(|r| r.took).collect();
    let outcomes: Vec<_> = raced.iter().map(|r| &r.outcome).collect();
    eprintln!(
        "round {round}: started within {spread:?}; took {took:?}; outcomes {outcomes:?}; up to date right after: {up:?}"
    );
    for r in raced.iter().filter(|r| r.outcome != Outcome::Ack) {
        eprintln!("  {:?}: {}", r.outcome, r.detail);
    }
    let all = || {
        raced
            .iter()
            .enumerate()
            .map(|(k, r)| {
                format!(
                    "push {k} {}: {:?} in {:?}: {}",
                    r.commit, r.outcome, r.took, r.detail
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    for (k, r) in raced.iter().enumerate() {
        ensure!(
            r.took <= PROMPT,
            "round {round}: push {k} took {:?} (more than {PROMPT:?})\n{}\n{}",
            r.took,
            all(),
            logs(c)
        );
    }
    ensure!(
        up.len() >= view.record.threshold(),
        "round {round}: only {up:?} up to date right after the round, {} needed: {view:?}\n{}",
        view.record.threshold(),
        all()
    );
    let values: BTreeSet<Option<String>> =
        up.iter().map(|n| disk(c, n, "refs/heads/race")).collect();
    ensure!(
        values.len() == 1,
        "round {round}: up-to-date replicas {up:?} disagree on the branch: {values:?}\n{}",
        all()
    );
    let now = values
        .into_iter()
        .next()
        .flatten()
        .with_context(|| format!("round {round}: the branch vanished\n{}", all()))?;
    // What git allows: every success is on the branch (they form a chain of
    // fast-forwards), nothing reported failed is its value, and its value is the base
    // or one of the pushed commits.
    for r in raced {
        match r.outcome {
            Outcome::Ack => ensure!(
                is_ancestor(&work.path, &r.commit, &now)?,
                "round {round}: acknowledged {} is not on the branch ({now})\n{}",
                r.commit,
                all()
            ),
            Outcome::Failed => ensure!(
                r.commit != now,
                "round {round}: {} was reported failed but is the branch's value\n{}",
                r.commit,
                all()
            ),
            _ => {}
        }
    }
    ensure!(
        now == base || raced.iter().any(|r| r.commit == now),
        "round {round}: the branch is at {now}, neither the base nor a pushed commit"
    );
    // A read through every router sees it at once.
    for (k, ch) in channels.iter().enumerate() {
        let read = read_branch(ch, "race").await?;
        ensure!(
            read.as_deref() == Some(now.as_str()),
            "round {round}: router {} reads {read:?}, the replicas hold {now}",
            k + 1
        );
    }
    Ok((now, up.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pushes_to_one_branch_through_three_routers_at_once_finish_promptly_and_keep_a_majority()
-> anyhow::Result<()> {
    let (c, id, work) = cluster(3).await?;
    let mut channels = Vec::new();
    for r in &c.routers {
        channels.push(r.channel().await?);
    }
    let main = git::git(&work.path, &["rev-parse", "main"])?;
    let (outcome, text, _) = push(&work.path, &c.http[0], &["main:refs/heads/race"]).await?;
    ensure!(outcome == Outcome::Ack, "{text}");
    let mut base = main;
    let (mut winners, mut none_won, mut one_behind) = (0usize, 0usize, 0usize);
    let mut slowest = Duration::ZERO;
    const ROUNDS: usize = 6;
    for round in 0..ROUNDS {
        let raced = match round % 2 {
            0 => race_receive_pack(&work, &channels, round, &base).await?,
            _ => race_git_push(&c, &work, round, &base).await?,
        };
        let (now, up) = check_round(&c, &id, &work, &channels, round, &base, &raced).await?;
        one_behind += usize::from(up < 3);
        let acked = raced.iter().filter(|r| r.outcome == Outcome::Ack).count();
        if round % 2 == 0 {
            // Three commits on one base: at most one can be a fast-forward.
            ensure!(
                acked <= 1,
                "round {round}: {acked} divergent pushes acknowledged"
            );
        }
        winners += acked;
        none_won += usize::from(acked == 0);
        slowest = slowest.max(raced.iter().map(|r| r.took).max().unwrap_or_default());
        // Every replica level again before the next round (repair of the losers).
        let settled = level(&c, &id).await?;
        for n in &c.nodes {
            ensure!(
                disk(&c, &n.name, "refs/heads/race").as_deref() == Some(now.as_str()),
                "round {round}: after repair {} holds another value than {now}",
                n.name
            );
        }
        eprintln!("round {round}: level again after {settled:?}");
        base = now;
    }
    eprintln!(
        "{ROUNDS} rounds: {winners} pushes acknowledged, {none_won} rounds with no winner, \
         {one_behind} rounds leaving a replica outdated, slowest push {slowest:?}"
    );
    Ok(())
}

/// Found by the test above, fixed by the order between racing transactions (DESIGN.md
/// §9, `refvote_cluster::decide::race`): git on one server lets exactly one of three
/// racing pushes from one base win, and so does refvote. Each push's git locks the
/// branch first on a different replica and holds that lock while it waits for votes;
/// without an order each got 1 of the 2 votes it needs and all three aborted (about one
/// raw round in five). Now the voters that see the race abort every push but the one
/// whose transaction was created first, whose git waits for the locks the others
/// release (`core.filesRefLockTimeout`), and it commits everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_racing_pushes_from_one_base_always_have_a_winner() -> anyhow::Result<()> {
    let (c, id, work) = cluster(3).await?;
    let mut channels = Vec::new();
    for r in &c.routers {
        channels.push(r.channel().await?);
    }
    let (outcome, text, _) = push(&work.path, &c.http[0], &["main:refs/heads/race"]).await?;
    ensure!(outcome == Outcome::Ack, "{text}");
    let mut base = git::git(&work.path, &["rev-parse", "main"])?;
    for round in 0..10 {
        let raced = race_receive_pack(&work, &channels, round, &base).await?;
        let (now, _) = check_round(&c, &id, &work, &channels, round, &base, &raced).await?;
        let acked = raced.iter().filter(|r| r.outcome == Outcome::Ack).count();
        ensure!(
            acked == 1,
            "round {round}: {acked} of three racing pushes won\n{}",
            logs(&c)
        );
        level(&c, &id).await?;
        base = now;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Scenario 5
// ---------------------------------------------------------------------------------

/// Directories made immutable with `chattr +i` (root ignores permission bits, not
/// this); made mutable again when dropped, so a failing test leaves nothing behind.
struct Immutable(Vec<PathBuf>);

fn chattr(flag: &str, path: &Path) -> anyhow::Result<()> {
    let st = std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .status()
        .context("running chattr")?;
    ensure!(
        st.success(),
        "chattr {flag} {} failed: {st}",
        path.display()
    );
    Ok(())
}

impl Immutable {
    fn set(paths: &[PathBuf]) -> anyhow::Result<Immutable> {
        let mut done = Immutable(Vec::new());
        for p in paths {
            chattr("+i", p)?;
            done.0.push(p.clone());
        }
        Ok(done)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            if let Err(e) = chattr("-i", p) {
                eprintln!("cannot make {} writable again: {e:#}", p.display());
            }
        }
    }
}

/// `DeleteRefs` of `refname` through `ch`.
async fn delete_refs(
    ch: &Channel,
    refname: &str,
) -> Result<refvote_proto::gitaly::DeleteRefsResponse, tonic::Status> {
    Ok(RefServiceClient::new(ch.clone())
        .delete_refs(DeleteRefsRequest {
            repository: Some(repository()),
            refs: vec![refname.as_bytes().to_vec()],
            ..Default::default()
        })
        .await?
        .into_inner())
}

fn packed_on(c: &ChaosCluster, node: usize, branch: &str) -> bool {
    !c.nodes[node]
        .repo(REPO)
        .join("refs/heads")
        .join(branch)
        .exists()
}

/// A delete of `branch` with `delete` (packed on node `packed` only) committed on every
/// replica and outdated nobody: the generation advanced and all three are up to date at
/// it right after the call.
async fn packed_delete_commits_everywhere<F, Fut>(
    c: &ChaosCluster,
    id: &RepoId,
    work: &WorkRepo,
    branch: &str,
    packed: usize,
    delete: F,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    work.commit(branch, &format!("{branch}, to be deleted"))?;
    let (outcome, text, _) = push(&work.path, &c.http[0], &[branch]).await?;
    ensure!(outcome == Outcome::Ack, "{text}");
    git::git(&c.nodes[packed].repo(REPO), &["pack-refs", "--all"])?;
    for (i, _) in c.nodes.iter().enumerate() {
        ensure!(
            packed_on(c, i, branch) == (i == packed),
            "{branch} should be packed on node{} only",
            packed + 1
        );
    }
    let before = view(c, id).await?.record.generation;
    delete().await?;
    let after = view(c, id).await?;
    ensure!(
        after.record.generation > before,
        "the delete of {branch} changed no generation: {after:?}"
    );
    ensure!(
        up_to_date(&after).len() == 3,
        "a delete of {branch} packed on node{} only outdated a replica: {after:?}",
        packed + 1
    );
    let refname = format!("refs/heads/{branch}");
    for n in &c.nodes {
        ensure!(
            git::rev(&n.repo(REPO), &refname).is_none(),
            "{} still has {branch}",
            n.name
        );
    }
    for (k, r) in c.routers.iter().enumerate() {
        let read = read_branch(&r.channel().await?, branch).await?;
        ensure!(read.is_none(), "router {} still reads {branch}", k + 1);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_of_refs_packed_on_one_replica_commit_everywhere_and_an_unwritable_replica_alone_is_outdated()
-> anyhow::Result<()> {
    let (c, id, work) = cluster(2).await?;
    let ch = c.routers[0].channel().await?;

    // `git push --delete`, the ref packed on node1 and loose on node2 and node3.
    let (url, path) = (c.http[0].clone(), work.path.clone());
    packed_delete_commits_everywhere(&c, &id, &work, "old1", 0, || async move {
        let (outcome, text, _) = push(&path, &url, &["--delete", "old1"]).await?;
        ensure!(outcome == Outcome::Ack, "git push --delete old1: {text}");
        Ok(())
    })
    .await?;
    // `DeleteRefs`, the ref packed on node2 only.
    git::git(&work.path, &["checkout", "--quiet", "main"])?;
    let ch2 = ch.clone();
    packed_delete_commits_everywhere(&c, &id, &work, "old2", 1, || async move {
        let r = delete_refs(&ch2, "refs/heads/old2").await?;
        ensure!(r.git_error.is_empty(), "DeleteRefs old2: {r:?}");
        Ok(())
    })
    .await?;

    // DeleteRefs with node3's refs directory immutable: git cannot take the ref's
    // lock there, so node3 never votes; node1 and node2 commit.
    git::git(&work.path, &["checkout", "--quiet", "main"])?;
    let doomed = work.commit("doomed", "doomed")?;
    let (outcome, text, _) = push(&work.path, &c.http[0], &["doomed"]).await?;
    ensure!(outcome == Outcome::Ack, "{text}");
    ensure!(!packed_on(&c, 2, "doomed"), "doomed is not loose on node3");
    let refs = c.nodes[2].repo(REPO).join("refs");
    let guard = Immutable::set(&[refs.clone(), refs.join("heads")])?;
    ensure!(
        std::fs::write(refs.join("heads").join("probe.lock"), b"").is_err(),
        "chattr +i did not make node3's refs/heads unwritable"
    );
    let before = view(&c, &id).await?.record.generation;
    let answer = delete_refs(&ch, "refs/heads/doomed").await;
    let after = view(&c, &id).await?;
    eprintln!("DeleteRefs with node3's refs unwritable answered {answer:?}");
    let answer = answer.with_context(|| logs(&c))?;
    ensure!(
        answer.git_error.is_empty(),
        "two of three deleted the ref, yet the answer says {answer:?}"
    );
    ensure!(
        after.record.generation > before,
        "no generation change: {after:?}"
    );
    ensure!(
        up_to_date(&after) == ["node1", "node2"],
        "node3 alone must be outdated right after the call: {after:?}"
    );
    let (r3, _) = &after.replicas["node3"];
    eprintln!("node3's record right after: {r3:?}");
    ensure!(
        !r3.reason.is_empty(),
        "node3 is outdated with no reason: {r3:?}"
    );
    for n in ["node1", "node2"] {
        ensure!(
            disk(&c, n, "refs/heads/doomed").is_none(),
            "{n} still has doomed"
        );
    }
    ensure!(
        disk(&c, "node3", "refs/heads/doomed").as_deref() == Some(doomed.as_str()),
        "node3's doomed changed though its refs were unwritable"
    );
    let refs_of = |n: usize| git::refs(&c.nodes[n].repo(REPO));
    ensure!(
        refs_of(0) == refs_of(1),
        "node1 and node2 disagree:\n{}\n--\n{}",
        refs_of(0),
        refs_of(1)
    );
    for (k, r) in c.routers.iter().enumerate() {
        let read = read_branch(&r.channel().await?, "doomed").await?;
        ensure!(read.is_none(), "router {} still reads doomed", k + 1);
    }
    // A repair of node3 cannot succeed while its refs are unwritable, and must not
    // pretend to: once an attempt failed, node3 is still outdated with the old ref.
    let failed = wait_for(
        "a failed repair attempt of node3",
        Duration::from_secs(15),
        || async {
            let (jobs, _) = c.store.get_prefix(&c.store.keys().jobs()).await?;
            for j in jobs {
                let job: JobRecord = j.decode()?;
                if job.node == "node3" && job.attempts > 0 {
                    return Ok(job);
                }
            }
            bail!("no failed attempt yet")
        },
    )
    .await?;
    eprintln!(
        "node3's repair while its refs are unwritable: {}",
        failed.last_error
    );
    let still = view(&c, &id).await?;
    ensure!(
        up_to_date(&still) == ["node1", "node2"],
        "node3 recorded up to date though its refs are unwritable: {still:?}"
    );
    ensure!(
        disk(&c, "node3", "refs/heads/doomed").is_some(),
        "node3's doomed vanished though its refs were unwritable"
    );
    // Writable again: repair brings node3 level.
    drop(guard);
    let took = level(&c, &id).await?;
    ensure!(
        disk(&c, "node3", "refs/heads/doomed").is_none(),
        "repair left doomed on node3"
    );
    eprintln!("node3 repaired {took:?} after its refs were writable again");
    Ok(())
}

// ---------------------------------------------------------------------------------
// Scenario 6
// ---------------------------------------------------------------------------------

/// Restarts router `r` with a hold armed at its first arrival at `point`.
async fn hold_router(c: &mut ChaosCluster, r: usize, point: &str) -> anyhow::Result<Hold> {
    let hold = Hold::new(point, 1)?;
    let router = &mut c.routers[r];
    router.stop()?;
    router.env = hold.env();
    router.launch().await?;
    Ok(hold)
}

/// Who holds the repository's write lock, as `GetRepositoryReplicas` says.
async fn locked_by(ch: &Channel) -> anyhow::Result<String> {
    Ok(AdminServiceClient::new(ch.clone())
        .get_repository_replicas(GetRepositoryReplicasRequest { repository: name() })
        .await?
        .into_inner()
        .locked_by)
}

/// One admin call issued while a push through router 1 is held right after its
/// transaction was created: the call takes the lock and waits for the transaction
/// (it has not answered 300 ms after the lock is seen, while the push is still held);
/// released, the push is acknowledged and the call succeeds. Returns the pushed commit.
async fn admin_during_push<T, F, Fut>(
    c: &mut ChaosCluster,
    id: &RepoId,
    work: &WorkRepo,
    operation: &str,
    call: F,
) -> anyhow::Result<(String, T)>
where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
    T: std::fmt::Debug + Send + 'static,
{
    let hold = hold_router(c, 0, faults::AFTER_BEGIN).await?;
    let commit = work.commit("adm", operation)?;
    let pushing = spawn_push(&work.path, &c.http[0], "adm");
    hold.wait_reached(REACH).await.with_context(|| logs(c))?;
    let (open, _) = c.store.get_prefix(&c.store.keys().txrepo(id)).await?;
    ensure!(
        open.len() == 1,
        "the held push's transaction is not open: {open:?}"
    );
    let admin_ch = c.routers[1].channel().await?;
    let calling = tokio::spawn(tokio::time::timeout(CALL_LIMIT, call(admin_ch)));
    let ch2 = c.routers[1].channel().await?;
    wait_until(
        &format!("{operation} holds the repository's lock"),
        Duration::from_secs(10),
        || {
            let ch2 = ch2.clone();
            let operation = operation.to_owned();
            async move { locked_by(&ch2).await.is_ok_and(|l| l.contains(&operation)) }
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !calling.is_finished(),
        "{operation} answered while a transaction of the repository was still open: {:?}",
        calling.await
    );
    ensure!(!pushing.is_finished(), "the held push finished");
    hold.release();
    let (outcome, text, _) = pushing.await??;
    ensure!(
        outcome == Outcome::Ack,
        "the push whose transaction began before {operation} failed: {text}\n{}",
        logs(c)
    );
    let answer = calling
        .await?
        .map_err(|_| anyhow::anyhow!("{operation} still running after {CALL_LIMIT:?}"))?
        .with_context(|| format!("{operation}\n{}", logs(c)))?;
    Ok((commit, answer))
}

/// The assigned replicas, all up to date, all holding `commit` on `adm`, with one set
/// of refs on disk, and a read through router 3 (2) sees it.
async fn all_hold(
    c: &ChaosCluster,
    id: &RepoId,
    assigned: &[&str],
    commit: &str,
) -> anyhow::Result<()> {
    let took = level(c, id).await?;
    let view = view(c, id).await?;
    ensure!(
        view.record.assigned == assigned,
        "assigned {:?}, expected {assigned:?}",
        view.record.assigned
    );
    for n in assigned {
        ensure!(
            disk(c, n, "refs/heads/adm").as_deref() == Some(commit),
            "{n} lost the acknowledged push {commit}"
        );
    }
    let read = read_branch(&c.routers.last().expect("routers").channel().await?, "adm").await?;
    ensure!(
        read.as_deref() == Some(commit),
        "a read sees {read:?}, not {commit}"
    );
    eprintln!("replicas {assigned:?} level with {commit} ({took:?})");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_issued_right_after_a_push_began_wait_for_it_and_lose_nothing()
-> anyhow::Result<()> {
    let (mut c, id, work) = cluster(3).await?;

    let (commit, removed) = admin_during_push(
        &mut c,
        &id,
        &work,
        "RemoveRepositoryReplicas",
        |ch| async move {
            AdminServiceClient::new(ch)
                .remove_repository_replicas(RemoveRepositoryReplicasRequest {
                    repository: name(),
                    nodes: vec!["node3".into()],
                })
                .await
                .map(|r| r.into_inner())
        },
    )
    .await?;
    ensure!(removed.removed == ["node3"], "{removed:?}");
    ensure!(
        !c.nodes[2].repo(REPO).exists(),
        "node3's copy is still on disk"
    );
    all_hold(&c, &id, &["node1", "node2"], &commit).await?;

    let (commit, added) = admin_during_push(
        &mut c,
        &id,
        &work,
        "CreateRepositoryReplicas",
        |ch| async move {
            AdminServiceClient::new(ch)
                .create_repository_replicas(CreateRepositoryReplicasRequest {
                    repository: name(),
                    replica_count: 0,
                    nodes: vec!["node3".into()],
                })
                .await
                .map(|r| r.into_inner())
        },
    )
    .await?;
    ensure!(added.added == ["node3"], "{added:?}");
    // The copy was made after the push committed: the new replica has it.
    all_hold(&c, &id, &["node1", "node2", "node3"], &commit).await?;

    // node3 diverges on disk (a ref nobody voted on), so the synchronization has work
    // to do once the push is through.
    let main = git::git(&work.path, &["rev-parse", "main"])?;
    git::git(
        &c.nodes[2].repo(REPO),
        &["update-ref", "refs/heads/stray", &main],
    )?;
    let (commit, synced) = admin_during_push(
        &mut c,
        &id,
        &work,
        "SynchronizeRepositoryReplicas",
        |ch| async move {
            AdminServiceClient::new(ch)
                .synchronize_repository_replicas(SynchronizeRepositoryReplicasRequest {
                    repository: name(),
                })
                .await
                .map(|r| r.into_inner())
        },
    )
    .await?;
    eprintln!(
        "synchronized from {} onto {:?}",
        synced.source, synced.synchronized
    );
    ensure!(synced.synchronized == ["node3"], "{synced:?}");
    ensure!(
        disk(&c, "node3", "refs/heads/stray").is_none(),
        "node3 kept the ref nobody voted on"
    );
    all_hold(&c, &id, &["node1", "node2", "node3"], &commit).await?;
    Ok(())
}

/// The index of the etcd member that is the leader (asked of each member directly).
async fn etcd_leader(etcd: &Etcd) -> anyhow::Result<usize> {
    wait_for("an etcd leader", Duration::from_secs(15), || async {
        for i in 0..etcd.len() {
            let Ok(mut client) = etcd.member_client(i).await else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            let me = status.header().map(|h| h.member_id());
            if status.leader() != 0 && me == Some(status.leader()) {
                return Ok(i);
            }
        }
        bail!("no member says it is the leader")
    })
    .await
}

/// SIGKILLs the etcd leader; returns its index.
async fn kill_leader(c: &mut ChaosCluster) -> anyhow::Result<usize> {
    let leader = etcd_leader(&c.etcd).await?;
    c.etcd.kill(leader)?;
    Ok(leader)
}

/// The outcome of a push to `branch` of `commit` against the replicas: acknowledged
/// means on a majority of up-to-date replicas at once; after the repairs settle every
/// replica agrees, a read through the last router sees the same, an acknowledged push is
/// visible and a failed one is not. Returns whether the update is visible.
async fn outcome_holds(
    c: &ChaosCluster,
    id: &RepoId,
    branch: &str,
    commit: &str,
    outcome: &Outcome,
    text: &str,
) -> anyhow::Result<bool> {
    let refname = format!("refs/heads/{branch}");
    if *outcome == Outcome::Ack {
        let now = view(c, id).await?;
        let with: Vec<String> = up_to_date(&now)
            .into_iter()
            .filter(|n| disk(c, n, &refname).as_deref() == Some(commit))
            .collect();
        ensure!(
            with.len() >= now.record.threshold(),
            "acknowledged, yet {branch} is on only {with:?} of the up-to-date replicas: {now:?}"
        );
    }
    level(c, id).await?;
    let values: BTreeSet<Option<String>> =
        c.nodes.iter().map(|n| disk(c, &n.name, &refname)).collect();
    ensure!(
        values.len() == 1,
        "replicas disagree on {branch}: {values:?}"
    );
    let value = values.into_iter().next().flatten();
    ensure!(
        value.is_none() || value.as_deref() == Some(commit),
        "{branch} is at {value:?}, neither absent nor {commit}"
    );
    let visible = value.is_some();
    let read = read_branch(&c.routers.last().expect("routers").channel().await?, branch).await?;
    ensure!(
        read == value,
        "a read sees {read:?}, the replicas hold {value:?}"
    );
    match outcome {
        Outcome::Ack => ensure!(visible, "acknowledged but not visible: {text}"),
        Outcome::Failed => ensure!(!visible, "reported failed but visible: {text}"),
        _ => {}
    }
    Ok(visible)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_leader_killed_during_a_decision_or_a_finalize_leaves_an_outcome_the_replicas_bear_out()
-> anyhow::Result<()> {
    let (mut c, id, work) = cluster(2).await?;

    // During a decision: every voter stops right after its vote is stored, so no
    // decision exists yet when the leader dies; released, they decide through the new
    // leader.
    let mut holds = Vec::new();
    for n in &mut c.nodes {
        let hold = Hold::new(faults::AFTER_VOTE_RECORDED, 1)?;
        n.stop()?;
        n.env = hold.env();
        n.launch().await?;
        holds.push(hold);
    }
    level(&c, &id).await?;
    git::git(&work.path, &["checkout", "--quiet", "main"])?;
    let commit = work.commit("d1", "decided while the leader dies")?;
    let pushing = spawn_push(&work.path, &c.http[0], "d1");
    for (k, h) in holds.iter().enumerate() {
        h.wait_reached(REACH)
            .await
            .with_context(|| format!("node{}\n{}", k + 1, logs(&c)))?;
    }
    let decided = c
        .store
        .get_prefix("/refvote/tx/")
        .await?
        .0
        .iter()
        .filter(|e| e.key.contains("/decided/"))
        .count();
    ensure!(decided == 0, "a key was decided while every voter was held");
    let t0 = Instant::now();
    let leader = kill_leader(&mut c).await?;
    for h in &holds {
        h.release();
    }
    let (outcome, text, _) = pushing.await??;
    eprintln!(
        "etcd leader m{} killed during the decision: push {outcome:?} {:?} after the kill",
        leader + 1,
        t0.elapsed()
    );
    let visible = outcome_holds(&c, &id, "d1", &commit, &outcome, &text).await?;
    eprintln!(
        "  visible after settling: {visible}; git said: {}",
        text.replace('\n', " | ")
    );
    c.etcd.restart(leader)?;
    c.etcd.wait_healthy(Duration::from_secs(30)).await?;

    // During a finalize: every voter reported, the router stops before finalizing; the
    // leader dies; released, the router finalizes through the new leader (or, if etcd
    // does not answer in time, says "outcome unknown" and retries in the background).
    let hold = hold_router(&mut c, 0, faults::BEFORE_FINALIZE).await?;
    git::git(&work.path, &["checkout", "--quiet", "main"])?;
    let commit = work.commit("d2", "finalized while the leader dies")?;
    let pushing = spawn_push(&work.path, &c.http[0], "d2");
    hold.wait_reached(REACH).await.with_context(|| logs(&c))?;
    let t0 = Instant::now();
    let leader = kill_leader(&mut c).await?;
    hold.release();
    let (outcome, text, _) = pushing.await??;
    eprintln!(
        "etcd leader m{} killed before the finalize: push {outcome:?} {:?} after the kill",
        leader + 1,
        t0.elapsed()
    );
    let visible = outcome_holds(&c, &id, "d2", &commit, &outcome, &text).await?;
    eprintln!(
        "  visible after settling: {visible}; git said: {}",
        text.replace('\n', " | ")
    );
    c.etcd.restart(leader)?;
    c.etcd.wait_healthy(Duration::from_secs(30)).await?;
    // The cluster writes normally afterwards.
    let commit = work.commit("d2", "after the leader came back")?;
    let (outcome, text, _) = push(&work.path, &c.http[1], &["d2"]).await?;
    ensure!(outcome == Outcome::Ack, "{text}\n{}", logs(&c));
    outcome_holds(&c, &id, "d2", &commit, &outcome, &text).await?;

    // What a client hears when the finalize does not land (as when etcd did not answer
    // it during the election above, seen in about one run in three): "outcome
    // unknown", without claiming the write reached too few replicas (it reached all
    // three; regression: the message said it "reached fewer than a majority"). The
    // router's first finalize fails on purpose here; its retry ends the transaction.
    let router = &mut c.routers[0];
    router.stop()?;
    router.env = vec![(faults::ENV.into(), faults::FAIL_FINALIZE.into())];
    router.launch().await?;
    let commit = work.commit("d2", "finalize not answered")?;
    let (outcome, text, _) = push(&work.path, &c.http[0], &["d2"]).await?;
    ensure!(
        outcome == Outcome::Unknown
            && text.contains("outcome unknown")
            && text.contains("finalize failed")
            && !text.contains("fewer than a majority"),
        "{text}"
    );
    ensure!(
        outcome_holds(&c, &id, "d2", &commit, &outcome, &text).await?,
        "every replica voted for it, yet the write is not visible"
    );
    Ok(())
}

/// Regression, found by the leader-kill test above: a router lost its lease after an
/// etcd leader change. One keep-alive that hung (its member had no leader, or was gone)
/// took a whole renewal period, and the session then slept another period before
/// trying elsewhere, so a 3 s lease was given up after one failed attempt; the router
/// refused writes ("holds no etcd lease") until a new lease was granted. Here the
/// member the session talks to is frozen (SIGSTOP: connections stay open, nothing
/// answers) for two lease lifetimes; the session must keep its one lease throughout
/// by renewing through the other members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_its_lease_while_the_member_it_talks_to_is_frozen() -> anyhow::Result<()> {
    use refvote_cluster::session::Session;
    use refvote_cluster::{Store, StoreConfig};
    let mut etcd = Etcd::start(3).await?;
    let leader = etcd_leader(&etcd).await?;
    let follower = (leader + 1) % 3;
    // The follower first: it is the endpoint the session uses.
    let mut endpoints = vec![etcd.endpoint(follower)];
    endpoints.extend((0..3).filter(|&i| i != follower).map(|i| etcd.endpoint(i)));
    let store = Store::connect(&StoreConfig {
        endpoints,
        prefix: "/refvote/".into(),
        request_timeout: Duration::from_secs(1),
        tls: None,
    })
    .await?;
    let ttl = Duration::from_secs(3);
    let session = Session::start(store, ttl, |_| async { Ok(()) });
    let lease = session
        .wait_for_lease(Duration::from_secs(10))
        .await
        .context("no lease granted")?;
    // Let the keep-alive stream open on the follower.
    tokio::time::sleep(ttl / 2).await;
    let mut changes = session.subscribe();
    changes.mark_unchanged();
    etcd.pause(follower)?;
    let frozen = tokio::time::timeout(2 * ttl, changes.changed()).await;
    etcd.resume(follower)?;
    ensure!(
        frozen.is_err(),
        "the lease changed while one etcd member of three was frozen: {lease} -> {:?}",
        session.lease()
    );
    ensure!(session.lease() == Some(lease), "lease {lease} lost");
    Ok(())
}
