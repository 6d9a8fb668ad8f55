//! Exact-timing crash scenarios 1-3 of DESIGN.md §5, each on its own fault-suite
//! cluster (`ChaosCluster`: a 3-member etcd, three votingd nodes, two routers, every
//! connection through a cuttable link), all real processes. The moment of each fault is
//! placed with fault points and holds (`REFVOTE_FAULT_POINT`, `REFVOTE_FAULT_HOLD`), not
//! with sleeps:
//!
//! 1. a voter's votingd dies right after its vote is stored while a second replica is
//!    cut off: the client hears success only if a majority of replicas was promoted;
//!    the update ends on a majority and visible (rolled forward by repair) or nowhere;
//! 2. the router dies after the first voter answered and before finalize, while other
//!    branches are pushed on a 50 ms schedule through the other router: no replica's
//!    refs ever move back, and the replica that missed the write is never recorded at
//!    its generation without it;
//! 3. a voter's votingd is paused past its lease during a push and resumed after
//!    finalize: reads through the other router right after never go to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use refvote_cluster::faults;
use refvote_cluster::records::{ReplicaRecord, TxOutcome, TxRecord};
use refvote_cluster::{RepoId, Store};
use refvote_proto::gitaly::FindBranchRequest;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_tests::chaos::check::Refs;
use refvote_tests::chaos::history::Outcome;
use refvote_tests::chaos::workload::classify;
use refvote_tests::chaos::{ChaosCluster, read_replicas, repository};
use refvote_tests::faultnet::LinkState;
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::hold::Hold;
use refvote_tests::proc::wait_until;
use tonic::transport::Channel;

/// The longest any one push may take here (a finalize waits at most for a lease to
/// lapse, plus its bounded waits).
const PUSH_LIMIT: Duration = Duration::from_secs(60);
/// The longest the replicas may take to be level and up to date after the faults.
const SETTLE_LIMIT: Duration = Duration::from_secs(45);

const NODES: [&str; 3] = ["node1", "node2", "node3"];

/// `git push <url> <refspec>` from `work`; whether git succeeded, and what it printed.
async fn push(work: PathBuf, url: String, refspec: String) -> anyhow::Result<(bool, String)> {
    let env = [("GIT_TERMINAL_PROMPT".to_owned(), "0".to_owned())];
    let out = tokio::time::timeout(
        PUSH_LIMIT,
        git::push(&work, Path::new(&url), &[&refspec], &env),
    )
    .await
    .with_context(|| format!("git push {refspec} to {url} did not end within {PUSH_LIMIT:?}"))??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// The last lines of every process's log, for failure messages.
fn logs(c: &ChaosCluster) -> String {
    let mut s = String::new();
    for n in &c.nodes {
        s.push_str(&format!("--- {}:\n{}\n", n.name, n.log_tail(40)));
    }
    for r in &c.routers {
        s.push_str(&format!("--- {}:\n{}\n", r.name, r.log_tail(40)));
    }
    s
}

/// Cuts (or heals) every link of node `i`: from routers and peers, and to etcd.
fn cut_node(c: &ChaosCluster, i: usize, state: LinkState) {
    c.to_node[i].set(state);
    for l in &c.node_etcd[i] {
        l.set(state);
    }
}

/// Restarts node `i` (SIGTERM, then a new process) with `env` added.
async fn relaunch_node(
    c: &mut ChaosCluster,
    i: usize,
    env: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let n = &mut c.nodes[i];
    n.stop()?;
    n.env = env;
    n.launch().await
}

/// Restarts router `i` with `env` added.
async fn relaunch_router(
    c: &mut ChaosCluster,
    i: usize,
    env: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let r = &mut c.routers[i];
    r.stop()?;
    r.env = env;
    r.launch().await
}

/// Arms fault point `point` (the process aborts at its first arrival there).
fn crash_at(point: &str) -> Vec<(String, String)> {
    vec![(faults::ENV.to_owned(), format!("{point}:1"))]
}

/// The open transaction of `repo` created by `creator`, once there is one.
async fn open_tx_of(
    store: &Store,
    repo: &RepoId,
    creator: &str,
    within: Duration,
) -> anyhow::Result<TxRecord> {
    let prefix = store.keys().txrepo(repo);
    let deadline = Instant::now() + within;
    loop {
        let (entries, _) = store.get_prefix(&prefix).await?;
        for e in &entries {
            let id = e.key.strip_prefix(&prefix).unwrap_or(&e.key);
            if let Ok(record) = store.tx_record(id).await
                && record.creator == creator
            {
                return Ok(record);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no open transaction of {repo} by {creator} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The outcome of transaction `tx`, once it is finalized.
async fn outcome_of(store: &Store, tx: &str, within: Duration) -> anyhow::Result<TxOutcome> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(o) = store.outcome(tx).await? {
            return Ok(o);
        }
        ensure!(
            Instant::now() < deadline,
            "transaction {tx} was not finalized within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until node `i`'s process has exited (a fault point aborted it).
async fn exited(c: &mut ChaosCluster, i: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while c.nodes[i].is_running() {
        ensure!(
            Instant::now() < deadline,
            "{} still runs {within:?} later",
            c.nodes[i].name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Whether `log` shows the process aborting at `point` (the line `faults::point` prints).
fn crashed_at(log: &str, point: &str) -> bool {
    log.contains(&format!("refvote fault point {point}: aborting"))
}

/// The replicas etcd says are up to date (record up to date at the repository's
/// generation, one revision).
async fn up_to_date(c: &ChaosCluster, repo: &RepoId) -> anyhow::Result<Vec<String>> {
    let view = c.store.repo_view(repo).await?;
    Ok(view
        .replicas
        .iter()
        .filter(|(_, (r, _))| r.is_up_to_date(&view.record))
        .map(|(n, _)| n.clone())
        .collect())
}

/// `branch` on node `node`'s replica, read from its storage.
fn on_disk(c: &ChaosCluster, node: &str, branch: &str) -> Option<String> {
    let n = c.nodes.iter().find(|n| n.name == node).expect("known node");
    git::rev(
        &n.repo(refvote_tests::chaos::REPO),
        &format!("refs/heads/{branch}"),
    )
}

/// A branch's commit as a read through `ch` returns it (`None`: no such branch).
async fn find_branch(ch: &Channel, branch: &str) -> Result<Option<String>, tonic::Status> {
    match RefServiceClient::new(ch.clone())
        .find_branch(FindBranchRequest {
            repository: Some(repository()),
            name: branch.as_bytes().to_vec(),
        })
        .await
    {
        Ok(r) => Ok(r
            .into_inner()
            .branch
            .and_then(|b| b.target_commit)
            .map(|c| c.id)),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

/// Waits until every replica is up to date with no transaction open, then checks that
/// they are level: the same refs on disk, the same checksum from each node, and each
/// replica record's checksum (when it has one) the node's. Returns the refs.
async fn converged(c: &ChaosCluster, repo: &RepoId) -> anyhow::Result<Refs> {
    c.settle(repo, SETTLE_LIMIT)
        .await
        .with_context(|| logs(c))?;
    let replicas = read_replicas(c, repo).await?;
    let view = c.store.repo_view(repo).await?;
    let mut level: Option<(&String, &Refs, &String)> = None;
    let mut recorded = 0;
    for (name, (refs, checksum, up)) in &replicas {
        ensure!(*up, "{name} is not up to date after settling");
        ensure!(
            !checksum.starts_with("error"),
            "{name}'s checksum: {checksum}"
        );
        if let Some((rec, _)) = view.replicas.get(name)
            && !rec.checksum.is_empty()
            && rec.generation == view.record.generation
        {
            ensure!(
                &rec.checksum == checksum,
                "{name} is recorded up to date with checksum {} but has {checksum}",
                rec.checksum
            );
            recorded += 1;
        }
        match level {
            None => level = Some((name, refs, checksum)),
            Some((first, first_refs, first_sum)) => {
                ensure!(
                    refs == first_refs,
                    "replicas differ after settling: {first} has {first_refs:?}, {name} has {refs:?}"
                );
                ensure!(
                    checksum == first_sum,
                    "{first} and {name} have the same refs but checksums {first_sum} and {checksum}"
                );
            }
        }
    }
    eprintln!(
        "level: {} replicas, same refs and checksum; {recorded} with a recorded checksum, equal",
        replicas.len()
    );
    Ok(level.context("no replica")?.1.clone())
}

/// A fresh cluster with the repository created and `main` pushed through router 2.
async fn cluster_with_main(work: &WorkRepo) -> anyhow::Result<(ChaosCluster, RepoId)> {
    let c = ChaosCluster::start(3, 2).await?;
    let repo = c.create_repo().await?;
    work.commit("main", "base")?;
    let (ok, text) = push(work.path.clone(), c.http[1].clone(), "main".into()).await?;
    ensure!(ok, "the first push failed: {text}\n{}", logs(&c));
    Ok((c, repo))
}

/// Scenario 1. node1's votingd aborts right after its vote is stored; node2 is cut off
/// (every link black-holed) right after the transaction is created, so it is a voter
/// that never hears of the write. node1's and node3's votes decide the update, but only
/// node3 applies it: one replica of three promoted, so the client must not hear
/// success, and must not hear a definite refusal either (the update exists). Then the
/// same crash with node2 reachable: two replicas promoted, and the client hears success.
/// Both times the client's answer matches the outcome in etcd, and after healing the
/// update is on every replica (rolled forward), level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario1_a_voter_killed_after_its_vote_with_another_cut_off_is_not_acknowledged()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let work = WorkRepo::new(&dir.path().join("work"))?;
    let (mut c, repo) = cluster_with_main(&work).await?;

    // --- One replica crashed after voting, another cut off: no majority promoted.
    relaunch_node(&mut c, 0, crash_at(faults::AFTER_VOTE_RECORDED)).await?;
    let hold = Hold::new(faults::AFTER_BEGIN, 1)?;
    relaunch_router(&mut c, 0, hold.env()).await?;
    c.settle(&repo, SETTLE_LIMIT).await?;
    let before = c.store.repo_view(&repo).await?.record.generation;
    let value = work.commit("s1", "scenario 1")?;
    let pushing = tokio::spawn(push(work.path.clone(), c.http[0].clone(), "s1".into()));
    hold.wait_reached(Duration::from_secs(30))
        .await
        .with_context(|| logs(&c))?;
    let tx = open_tx_of(&c.store, &repo, "router1", Duration::from_secs(5)).await?;
    ensure!(
        tx.voters == NODES,
        "precondition: every replica votes, got {:?}",
        tx.voters
    );
    cut_node(&c, 1, LinkState::Blackhole);
    hold.release();
    let (ok, text) = pushing.await??;
    exited(&mut c, 0, Duration::from_secs(10)).await?;
    ensure!(
        crashed_at(&c.nodes[0].log_tail(200), faults::AFTER_VOTE_RECORDED),
        "precondition: node1 did not die at {}:\n{}",
        faults::AFTER_VOTE_RECORDED,
        c.nodes[0].log_tail(30)
    );
    let outcome = outcome_of(&c.store, &tx.id, Duration::from_secs(10)).await?;
    let promoted = up_to_date(&c, &repo).await?;
    eprintln!(
        "scenario 1, node2 cut off: push ok={ok}, outcome {outcome:?}, up to date {promoted:?}\n{text}"
    );
    // The rule: success only with threshold replicas promoted, each holding the update.
    if ok {
        ensure!(
            promoted.len() >= tx.threshold,
            "the client heard success with only {promoted:?} up to date"
        );
    }
    for n in &promoted {
        ensure!(
            on_disk(&c, n, "s1").as_deref() == Some(value.as_str()),
            "{n} is up to date without the update"
        );
    }
    ensure!(
        ok == outcome.acknowledged,
        "the client heard ok={ok}, etcd's outcome says {outcome:?}"
    );
    // What this timing must give: node1 died before applying, node2 never heard of the
    // write; node3 alone applied it.
    ensure!(
        outcome.committed && outcome.promoted == ["node3"],
        "expected the update committed and only node3 promoted: {outcome:?}"
    );
    // etcd's records say the same: the repository moved one generation; only node3's
    // replica reached it, the two without the update stayed behind, outdated.
    let view = c.store.repo_view(&repo).await?;
    ensure!(
        view.record.generation == before + 1 && outcome.generation == before + 1,
        "generation {before} -> {} (outcome {})",
        view.record.generation,
        outcome.generation
    );
    for n in NODES {
        let (r, _) = &view.replicas[n];
        let reached = r.generation > before;
        ensure!(
            reached == (n == "node3") && r.is_up_to_date(&view.record) == reached,
            "{n}'s record after the write: {r:?}"
        );
    }
    ensure!(
        !ok,
        "the client heard success with one replica of three promoted:\n{text}"
    );
    ensure!(
        classify(&text).0 == Outcome::Unknown,
        "the update exists on node3, yet the client heard a definite refusal:\n{text}"
    );
    for n in ["node1", "node2"] {
        ensure!(
            on_disk(&c, n, "s1").is_none(),
            "{n} applied an update it cannot have applied"
        );
    }

    cut_node(&c, 1, LinkState::Up);
    c.nodes[0].env.clear();
    c.nodes[0].launch().await?;
    let refs = converged(&c, &repo).await?;
    ensure!(
        refs.get("refs/heads/s1") == Some(&value),
        "the update was not rolled forward: {refs:?}"
    );
    for ch in [c.routers[0].channel().await?, c.routers[1].channel().await?] {
        ensure!(find_branch(&ch, "s1").await?.as_deref() == Some(value.as_str()));
    }

    // --- The same crash with the other two reachable: a majority promoted, success.
    relaunch_node(&mut c, 0, crash_at(faults::AFTER_VOTE_RECORDED)).await?;
    let hold = Hold::new(faults::AFTER_BEGIN, 1)?;
    relaunch_router(&mut c, 0, hold.env()).await?;
    c.settle(&repo, SETTLE_LIMIT).await?;
    let value = work.commit("s1", "scenario 1, second")?;
    let pushing = tokio::spawn(push(work.path.clone(), c.http[0].clone(), "s1".into()));
    hold.wait_reached(Duration::from_secs(30))
        .await
        .with_context(|| logs(&c))?;
    let tx = open_tx_of(&c.store, &repo, "router1", Duration::from_secs(5)).await?;
    ensure!(tx.voters == NODES, "precondition: {:?}", tx.voters);
    hold.release();
    let (ok, text) = pushing.await??;
    exited(&mut c, 0, Duration::from_secs(10)).await?;
    let outcome = outcome_of(&c.store, &tx.id, Duration::from_secs(10)).await?;
    let promoted = up_to_date(&c, &repo).await?;
    eprintln!(
        "scenario 1, all reachable: push ok={ok}, outcome {outcome:?}, up to date {promoted:?}"
    );
    ensure!(
        ok == outcome.acknowledged,
        "the client heard ok={ok}, etcd's outcome says {outcome:?}"
    );
    ensure!(
        ok && outcome.promoted == ["node2", "node3"],
        "two replicas applied the update, the client must hear success:\n{text}\n{outcome:?}"
    );
    ensure!(promoted.len() >= tx.threshold, "{promoted:?}");
    for n in &promoted {
        ensure!(
            on_disk(&c, n, "s1").as_deref() == Some(value.as_str()),
            "{n}"
        );
    }
    c.nodes[0].env.clear();
    c.nodes[0].launch().await?;
    let refs = converged(&c, &repo).await?;
    ensure!(refs.get("refs/heads/s1") == Some(&value), "{refs:?}");
    Ok(())
}

/// What the background pushers did: every commit each tried, in order (recorded before
/// its push), and how many pushes were acknowledged.
#[derive(Default)]
struct Pushed {
    tried: BTreeMap<String, Vec<String>>,
    /// Each acknowledged commit with the moment git reported success.
    acked: BTreeMap<String, Vec<(String, Instant)>>,
}

/// Background branches: together they start a push every [`PUSH_EVERY`].
const BACKGROUND: [&str; 4] = ["bg0", "bg1", "bg2", "bg3"];
const PUSH_EVERY: Duration = Duration::from_millis(50);

/// Pushes a new commit on `branch` through `url` until `stop`, at the slots
/// `start + slot * PUSH_EVERY + n * BACKGROUND.len() * PUSH_EVERY`; a slot that comes
/// while the branch's previous push still runs is skipped (one push per branch at a
/// time, so each branch only moves forward).
fn pusher(
    dir: PathBuf,
    url: String,
    slot: usize,
    pushed: Arc<Mutex<Pushed>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let branch = BACKGROUND[slot].to_owned();
    let work = WorkRepo::new(&dir)?;
    let period = PUSH_EVERY * BACKGROUND.len() as u32;
    let start = Instant::now() + PUSH_EVERY * slot as u32;
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) && i < 5000 {
        i += 1;
        let now = Instant::now();
        let next = if now <= start {
            start
        } else {
            let n = (now - start).as_micros().div_ceil(period.as_micros());
            start + period * n as u32
        };
        std::thread::sleep(next - now);
        let oid = work.commit(&branch, &format!("{branch} {i}"))?;
        pushed
            .lock()
            .expect("poisoned")
            .tried
            .entry(branch.clone())
            .or_default()
            .push(oid.clone());
        if push_blocking(&dir, &url, &format!("HEAD:refs/heads/{branch}"))? {
            pushed
                .lock()
                .expect("poisoned")
                .acked
                .entry(branch.clone())
                .or_default()
                .push((oid, Instant::now()));
        }
    }
    Ok(())
}

/// A blocking `git push` with a deadline (killed past it); whether it succeeded.
fn push_blocking(work: &Path, url: &str, refspec: &str) -> anyhow::Result<bool> {
    let mut child = std::process::Command::new("git")
        .current_dir(work)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["push", "--quiet", url, refspec])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + PUSH_LIMIT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One look at the cluster: every replica record (read first), then every replica's
/// refs on disk (read after, so a record that says a replica has a generation was
/// written before these refs were read).
struct Sample {
    at: Duration,
    /// When the sample's etcd read began.
    started: Instant,
    records: BTreeMap<String, ReplicaRecord>,
    /// The replicas up to date at that read (record and repository generation at one
    /// revision): the ones reads may go to.
    up_to_date: Vec<String>,
    refs: BTreeMap<String, Refs>,
}

async fn refs_on_disk(path: &Path) -> anyhow::Result<Refs> {
    let out = tokio::process::Command::new("git")
        .current_dir(path)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .args(["for-each-ref", "--format=%(objectname) %(refname)"])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "git for-each-ref in {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(oid, name)| (name.to_owned(), oid.to_owned()))
        .collect())
}

/// Samples the replicas until `stop`, pausing 50 ms between samples.
async fn monitor(
    store: Store,
    repo: RepoId,
    paths: Vec<(String, PathBuf)>,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let t0 = Instant::now();
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) && samples.len() < 20_000 {
        let started = Instant::now();
        if let Ok(view) = store.repo_view(&repo).await {
            let mut refs = BTreeMap::new();
            for (name, path) in &paths {
                if let Ok(r) = refs_on_disk(path).await {
                    refs.insert(name.clone(), r);
                }
            }
            let up_to_date = view
                .replicas
                .iter()
                .filter(|(_, (r, _))| r.is_up_to_date(&view.record))
                .map(|(n, _)| n.clone())
                .collect();
            samples.push(Sample {
                at: started - t0,
                started,
                up_to_date,
                records: view
                    .replicas
                    .into_iter()
                    .map(|(n, (r, _))| (n, r))
                    .collect(),
                refs,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    samples
}

/// Scenario 2. Four branches take turns starting a push every 50 ms through router 2
/// throughout (each branch one push at a time, so each only moves forward). A push
/// of branch `k` through router 1: router 1 is held after creating its transaction
/// (every replica a voter), node3's votingd is killed (so node3 misses the write), then
/// router 1 aborts the moment the first voter's call answers (fault point
/// `after-first-answer`: that replica applied and confirmed the write), before
/// finalize. The reaper finalizes. node3 comes back and is repaired under the load.
/// Every 50 ms the test reads every replica's record and then its refs on disk:
/// no ref ever moves back on any replica, no replica is ever recorded at the write's
/// generation (or later) without the write, and a replica recorded up to date never
/// lacks a push acknowledged before. (This found repairs applying a source bundle
/// that git had written without a ref that moved meanwhile: see
/// `a_repair_never_applies_a_bundle_that_lacks_a_ref_the_source_has`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario2_a_router_killed_before_finalize_under_load_leaves_reads_monotonic()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let work = WorkRepo::new(&dir.path().join("work"))?;
    let (mut c, repo) = cluster_with_main(&work).await?;
    let main = git::rev(&work.path, "refs/heads/main").context("main")?;

    let hold = Hold::new(faults::AFTER_BEGIN, 1)?;
    let mut env = hold.env();
    env.extend(crash_at(faults::AFTER_FIRST_ANSWER));
    relaunch_router(&mut c, 0, env).await?;

    let stop_monitor = Arc::new(AtomicBool::new(false));
    let paths = c
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.repo(refvote_tests::chaos::REPO)))
        .collect();
    let monitoring = tokio::spawn(monitor(
        c.store.clone(),
        repo.clone(),
        paths,
        stop_monitor.clone(),
    ));
    let pushed = Arc::new(Mutex::new(Pushed::default()));
    let stop_pushing = Arc::new(AtomicBool::new(false));
    let branches = BACKGROUND;
    let mut pushers = Vec::new();
    for (slot, b) in branches.iter().enumerate() {
        let (d, url, p, s) = (
            dir.path().join(b),
            c.http[1].clone(),
            pushed.clone(),
            stop_pushing.clone(),
        );
        pushers.push(std::thread::spawn(move || pusher(d, url, slot, p, s)));
    }
    let acked = |p: &Mutex<Pushed>| -> usize {
        p.lock()
            .expect("poisoned")
            .acked
            .values()
            .map(Vec::len)
            .sum()
    };
    let warm = pushed.clone();
    wait_until("the background pushes run", Duration::from_secs(30), || {
        let n = {
            let p = warm.lock().expect("poisoned");
            branches
                .iter()
                .all(|b| p.acked.get(*b).is_some_and(|v| v.len() >= 2))
        };
        async move { n }
    })
    .await
    .with_context(|| logs(&c))?;

    let value = work.commit("k", "scenario 2")?;
    let pushing = tokio::spawn(push(work.path.clone(), c.http[0].clone(), "k".into()));
    hold.wait_reached(Duration::from_secs(30))
        .await
        .with_context(|| logs(&c))?;
    let tx = open_tx_of(&c.store, &repo, "router1", Duration::from_secs(5)).await?;
    ensure!(tx.voters == NODES, "precondition: {:?}", tx.voters);
    c.nodes[2].kill()?;
    let acked_at_kill = acked(&pushed);
    hold.release();

    // Router 1 dies at its first voter's answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.routers[0].is_running() {
        ensure!(
            Instant::now() < deadline,
            "router1 never reached {}\n{}",
            faults::AFTER_FIRST_ANSWER,
            logs(&c)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let confirmed = c
        .store
        .get_prefix(&c.store.keys().all_confirmed(&tx.id))
        .await?
        .0
        .len();
    let finalized_early = c.store.outcome(&tx.id).await?;
    ensure!(
        crashed_at(&c.routers[0].log_tail(200), faults::AFTER_FIRST_ANSWER),
        "precondition: router1 did not die at {}:\n{}",
        faults::AFTER_FIRST_ANSWER,
        c.routers[0].log_tail(30)
    );
    ensure!(
        confirmed >= 1 && finalized_early.is_none(),
        "precondition: router1 died after a confirmation ({confirmed}) and before finalize ({finalized_early:?})"
    );
    let (ok, text) = pushing.await??;
    ensure!(
        !ok,
        "the client heard success from a router that died before finalize:\n{text}"
    );
    let outcome = outcome_of(&c.store, &tx.id, Duration::from_secs(30))
        .await
        .with_context(|| logs(&c))?;
    eprintln!("scenario 2: router1 died with {confirmed} confirmation(s); reaped: {outcome:?}");
    ensure!(
        outcome.reaped
            && outcome.committed
            && outcome.promoted == ["node1", "node2"]
            && outcome.outdated.iter().any(|n| n == "node3"),
        "expected the reaper to commit the update on node1 and node2 and outdate node3: {outcome:?}"
    );
    let generation = outcome.generation;

    // node3 comes back and is repaired while the pushes go on.
    c.nodes[2].launch().await?;
    let store = c.store.clone();
    let repo2 = repo.clone();
    wait_until("node3 repaired under load", Duration::from_secs(40), || {
        let (store, repo) = (store.clone(), repo2.clone());
        async move {
            store.repo_view(&repo).await.is_ok_and(|v| {
                v.replicas
                    .get("node3")
                    .is_some_and(|(r, _)| r.is_up_to_date(&v.record))
            })
        }
    })
    .await
    .with_context(|| logs(&c))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_pushing.store(true, Ordering::Relaxed);
    for p in pushers {
        tokio::task::spawn_blocking(move || p.join())
            .await?
            .map_err(|_| anyhow::anyhow!("a pusher panicked"))??;
    }
    c.routers[0].env.clear();
    c.routers[0].launch().await?;
    let refs = converged(&c, &repo).await?;
    stop_monitor.store(true, Ordering::Relaxed);
    let samples = monitoring.await?;
    let pushed = std::mem::take(&mut *pushed.lock().expect("poisoned"));

    // The update, and every acknowledged background push, is on every replica.
    ensure!(refs.get("refs/heads/k") == Some(&value), "{refs:?}");
    let acked_total: usize = pushed.acked.values().map(Vec::len).sum();
    ensure!(
        acked_total > acked_at_kill,
        "no background push was acknowledged after the kill ({acked_total} in all)"
    );
    for b in branches {
        let order = &pushed.tried[b];
        let (last, _) = pushed.acked[b].last().expect("warmed up");
        let final_pos = refs
            .get(&format!("refs/heads/{b}"))
            .and_then(|v| order.iter().position(|o| o == v));
        let acked_pos = order.iter().position(|o| o == last);
        ensure!(
            final_pos >= acked_pos,
            "{b} ended at {final_pos:?}, behind its last acknowledged push {acked_pos:?}"
        );
    }

    // Every sample: per replica, per branch, never back; never at the write's
    // generation without it.
    let mut orders: BTreeMap<String, Vec<String>> = pushed
        .tried
        .iter()
        .map(|(b, o)| (format!("refs/heads/{b}"), o.clone()))
        .collect();
    orders.insert("refs/heads/main".into(), vec![main]);
    orders.insert("refs/heads/k".into(), vec![value.clone()]);
    let mut violations = Vec::new();
    let mut last: BTreeMap<(String, String), usize> = BTreeMap::new();
    let (mut node3_missing, mut node3_behind) = (0, 0);
    for s in &samples {
        for (node, refs) in &s.refs {
            for (name, oid) in refs {
                let Some(pos) = orders
                    .get(name)
                    .and_then(|o| o.iter().position(|x| x == oid))
                else {
                    violations.push(format!(
                        "{:?}: {node} has {name} at {oid}, which nobody pushed",
                        s.at
                    ));
                    continue;
                };
                let key = (node.clone(), name.clone());
                if let Some(&before) = last.get(&key)
                    && pos < before
                {
                    violations.push(format!(
                        "{:?}: {name} on {node} moved back from push {before} to push {pos}",
                        s.at
                    ));
                }
                last.insert(key, pos);
            }
            for ((n, name), _) in last.iter().filter(|((n, _), _)| n == node) {
                if !refs.contains_key(name) {
                    violations.push(format!("{:?}: {name} vanished from {n}", s.at));
                }
            }
            // A replica reads may use holds every push acknowledged before the look.
            if s.up_to_date.contains(node) {
                for (b, acks) in &pushed.acked {
                    let Some((oid, _)) = acks.iter().rev().find(|(_, t)| *t < s.started) else {
                        continue;
                    };
                    let name = format!("refs/heads/{b}");
                    let order = &orders[&name];
                    let want = order.iter().position(|o| o == oid);
                    let has = refs
                        .get(&name)
                        .and_then(|v| order.iter().position(|o| o == v));
                    if has < want {
                        violations.push(format!(
                            "{:?}: {node} is up to date but has {name} at push {has:?}, behind push {want:?} acknowledged before",
                            s.at
                        ));
                    }
                }
            }
            let has_write = refs.get("refs/heads/k") == Some(&value);
            if let Some(rec) = s.records.get(node) {
                if rec.generation >= generation && !has_write {
                    violations.push(format!(
                        "{:?}: {node} is recorded at generation {} (the write's is {generation}) without the write: {rec:?}",
                        s.at, rec.generation
                    ));
                }
                if node == "node3" && !has_write {
                    node3_missing += 1;
                    if rec.generation < generation {
                        node3_behind += 1;
                    }
                }
            }
        }
    }
    let tried_total: usize = pushed.tried.values().map(Vec::len).sum();
    eprintln!(
        "scenario 2: {} samples over {:?}; node3 lacked the write in {node3_missing} ({node3_behind} recorded behind it); {tried_total} background pushes, {acked_total} acknowledged ({acked_at_kill} before the kill)",
        samples.len(),
        samples.last().map(|s| s.at)
    );
    if !violations.is_empty() {
        let kept = c.dir.path().to_owned();
        std::mem::forget(std::mem::replace(&mut c.dir, tempfile::tempdir()?));
        bail!(
            "{} violations (logs kept in {}):\n{}",
            violations.len(),
            kept.display(),
            violations.join("\n")
        );
    }
    // The checks had something to check: node3 was seen without the write.
    ensure!(
        samples.len() >= 20 && node3_missing > 0,
        "the monitor saw too little: {} samples, node3 without the write in {node3_missing}",
        samples.len()
    );
    Ok(())
}

/// Scenario 3. A push through router 1; right after its transaction exists (every
/// replica a voter), node3's votingd is SIGSTOPped. node1 and node2 apply the write;
/// router 1 drops node3 once its lease lapses and finalizes: success, node3 outdated.
/// node3 is resumed at once (after finalize, paused longer than its lease), and reads
/// through router 2 start immediately: every one returns the pushed commit (node3,
/// which lacks it, is never read). Then repair brings node3 level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario3_a_voter_paused_past_its_lease_is_never_read_after_it_resumes()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let work = WorkRepo::new(&dir.path().join("work"))?;
    let (mut c, repo) = cluster_with_main(&work).await?;
    let hold = Hold::new(faults::AFTER_BEGIN, 1)?;
    relaunch_router(&mut c, 0, hold.env()).await?;
    c.settle(&repo, SETTLE_LIMIT).await?;
    // Connected before the pause, so the reads after the resume start at once.
    let reader = c.routers[1].channel().await?;
    let old = find_branch(&reader, "p").await?;
    ensure!(old.is_none(), "p exists before the push: {old:?}");

    let value = work.commit("p", "scenario 3")?;
    let pushing = tokio::spawn(push(work.path.clone(), c.http[0].clone(), "p".into()));
    hold.wait_reached(Duration::from_secs(30))
        .await
        .with_context(|| logs(&c))?;
    let tx = open_tx_of(&c.store, &repo, "router1", Duration::from_secs(5)).await?;
    ensure!(tx.voters == NODES, "precondition: {:?}", tx.voters);
    c.nodes[2].pause()?;
    let paused = Instant::now();
    hold.release();
    let result = pushing.await;
    let (ok, text) = match result {
        Ok(Ok(r)) => r,
        other => {
            c.nodes[2].resume()?;
            bail!("the push did not end: {other:?}\n{}", logs(&c));
        }
    };
    if !ok {
        c.nodes[2].resume()?;
        bail!(
            "the push failed though two replicas were reachable:\n{text}\n{}",
            logs(&c)
        );
    }
    let outcome = outcome_of(&c.store, &tx.id, Duration::from_secs(5)).await?;
    ensure!(
        outcome.acknowledged && outcome.promoted == ["node1", "node2"],
        "{outcome:?}"
    );
    // Paused longer than its lease: etcd no longer lists node3 (and at least the TTL
    // passed since the pause).
    let node3_key = c.store.keys().node("node3");
    let store = c.store.clone();
    wait_until("node3's lease lapsed", Duration::from_secs(10), || {
        let (store, key) = (store.clone(), node3_key.clone());
        async move { matches!(store.get(&key).await, Ok(None)) }
    })
    .await?;
    if let Some(rest) = c.lease_ttl.checked_sub(paused.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let view = c.store.repo_view(&repo).await?;
    ensure!(
        !view.replicas["node3"].0.is_up_to_date(&view.record),
        "the paused replica is up to date: {view:?}"
    );
    ensure!(on_disk(&c, "node3", "p").is_none(), "node3 has the update");

    // When node3 is up to date again (repaired), as etcd says: reads that started
    // before then had an outdated replica to avoid.
    let (store, repo2) = (c.store.clone(), repo.clone());
    let repaired = tokio::spawn(async move {
        let deadline = Instant::now() + SETTLE_LIMIT;
        while Instant::now() < deadline {
            if let Ok(v) = store.repo_view(&repo2).await
                && v.replicas
                    .get("node3")
                    .is_some_and(|(r, _)| r.is_up_to_date(&v.record))
            {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    });
    c.nodes[2].resume()?;
    let resumed = Instant::now();
    const READS: usize = 60;
    let mut wrong = Vec::new();
    let mut starts = Vec::new();
    for i in 0..READS {
        starts.push(Instant::now());
        match find_branch(&reader, "p").await {
            Ok(Some(v)) if v == value => {}
            other => wrong.push(format!(
                "read {i}, {:?} after resume: {other:?}",
                resumed.elapsed()
            )),
        }
    }
    let reads_took = resumed.elapsed();
    let repaired = repaired.await?;
    let before_repair = starts
        .iter()
        .filter(|t| repaired.is_none_or(|r| **t < r))
        .count();
    eprintln!(
        "scenario 3: node3 paused {:?}; {READS} reads through router2 in {reads_took:?} after resume, {before_repair} of them before node3 was repaired ({:?} after resume)",
        resumed - paused,
        repaired.map(|r| r - resumed)
    );
    ensure!(
        wrong.is_empty(),
        "reads after the resume returned something else than {value}:\n{}",
        wrong.join("\n")
    );
    ensure!(
        before_repair >= 1,
        "node3 was repaired before the first read: nothing showed reads avoid it"
    );

    let refs = converged(&c, &repo).await?;
    ensure!(refs.get("refs/heads/p") == Some(&value), "{refs:?}");
    ensure!(on_disk(&c, "node3", "p").as_deref() == Some(value.as_str()));
    Ok(())
}
