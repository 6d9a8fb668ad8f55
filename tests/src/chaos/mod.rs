//! The fault-injection suite (DESIGN.md §5): a real cluster (3-member etcd, 3 or 5
//! votingd nodes, 2 routers) with a cuttable [`Link`] on every connection between
//! processes, a workload of real git pushes, gRPC writes (branch, commit and ref
//! mutators) and gRPC reads through both routers whose every operation is recorded,
//! faults scheduled at random from a seed, and a checker that reads the history and
//! the replicas once the faults stop.
//!
//! The same code runs the short randomized run CI does (`tests/tests/faults.rs`) and the
//! long soak (`scripts/soak.sh`); a failure prints the seed and the operations that
//! broke the rule, so the run can be repeated.

pub mod check;
mod cluster;
pub mod history;
pub mod recovery;
mod rng;
pub mod schedule;
pub mod workload;

pub use cluster::{ChaosCluster, read_replicas};
pub use rng::Rng;
pub use workload::{REPO, repository};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refvote_cluster::{RepoId, Store};
use tonic::transport::Channel;

use self::history::History;

/// What a run does.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    pub seed: u64,
    /// How long faults are injected (the workload runs that long, plus the settling).
    pub duration: Duration,
    pub nodes: usize,
    pub writers: usize,
    pub readers: usize,
    /// Fault kinds the schedule picks from.
    pub kinds: Vec<schedule::FaultKind>,
}

impl ChaosConfig {
    /// A seed from the environment (`REFVOTE_FAULT_SEED`) or the clock.
    pub fn seed_from_env() -> u64 {
        std::env::var("REFVOTE_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
    }
}

/// One whole run: cluster, workload, faults for `config.duration`, healing, settling,
/// checking. The report holds the violations (none, if refvote is right) and the
/// figures.
pub async fn run(config: &ChaosConfig) -> anyhow::Result<check::Report> {
    let mut cluster = ChaosCluster::start(config.nodes, 2).await?;
    let repo = cluster.create_repo().await?;
    let history = Arc::new(History::new());
    let stop = Arc::new(AtomicBool::new(false));

    let urls: Vec<String> = cluster.http.clone();
    let mut writers = Vec::new();
    for k in 0..config.writers {
        let (h, s, urls) = (history.clone(), stop.clone(), urls.clone());
        let dir = cluster.dir.path().join("work").join(format!("w{k}"));
        let seed = config.seed;
        writers.push(std::thread::spawn(move || {
            workload::writer(k, dir, urls, h, s, seed)
        }));
    }
    let mut channels = Vec::new();
    for r in &cluster.routers {
        channels.push(
            Channel::from_shared(r.grpc_url())?
                .tcp_nodelay(true)
                .connect_lazy(),
        );
    }
    let mut readers = Vec::new();
    for k in 0..config.readers {
        readers.push(tokio::spawn(workload::reader(
            k,
            channels.clone(),
            config.writers,
            history.clone(),
            stop.clone(),
            config.seed,
        )));
    }
    readers.push(tokio::spawn(workload::grpc_writer(
        channels.clone(),
        history.clone(),
        stop.clone(),
    )));
    let repairs = Arc::new(Mutex::new(Vec::new()));
    let synced = Arc::new(Mutex::new(Vec::new()));
    let poller = tokio::spawn(poll_outdated(
        cluster.store.clone(),
        repo.clone(),
        history.clone(),
        repairs.clone(),
        synced.clone(),
    ));

    // Faults for the configured time; the one in progress finishes.
    let faults_stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let s = faults_stop.clone();
        let d = config.duration;
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            s.store(true, Ordering::Relaxed);
        })
    };
    let faults = schedule::run(
        &mut cluster,
        &config.kinds,
        history.clone(),
        faults_stop,
        config.seed,
    )
    .await;
    timer.abort();
    cluster.heal_all().await?;
    faults?;
    // A little fault-free load, so every branch gets writes after the last fault.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        tokio::task::spawn_blocking(move || w.join())
            .await?
            .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    for r in readers {
        r.await?;
    }
    let run_end = history.now();
    let settle = cluster.settle(&repo, Duration::from_secs(60)).await;
    poller.abort();

    let mut report = check::Report {
        seed: config.seed,
        repairs: repairs.lock().expect("poisoned").clone(),
        ..Default::default()
    };
    match settle {
        Ok(d) => report.settle = d,
        Err(e) => report.violations.push(format!("diverged: {e:#}")),
    }
    let replicas = read_replicas(&cluster, &repo).await?;
    let commits = grpc_commits(&cluster, &repo).await?;
    let synced = synced.lock().expect("poisoned").clone();
    check::check(
        &history.ops(),
        &history.faults(),
        &replicas,
        &commits,
        &synced,
        run_end,
        &mut report,
    );
    // `REFVOTE_KEEP_LOGS=1` keeps the history and logs of a run that passed too.
    let keep = std::env::var_os("REFVOTE_KEEP_LOGS").is_some();
    if !report.violations.is_empty() || keep {
        // The history, for whoever repeats the run from its seed.
        let path = cluster.dir.path().join("history.txt");
        let mut text = String::new();
        for f in history.faults() {
            text.push_str(&format!(
                "FAULT [{:>8.3}s..{:>8.3}s, ready {:>8.3}s] {} on {}\n",
                f.injected.as_secs_f64(),
                f.ended.as_secs_f64(),
                f.healed.as_secs_f64(),
                f.kind,
                f.target
            ));
        }
        for op in history.ops() {
            text.push_str(&format!("{op}\n"));
        }
        std::fs::write(&path, &text)?;
        if !report.violations.is_empty() {
            eprintln!("history of seed {}:\n{text}", config.seed);
        }
        // Keep the cluster's logs for the post-mortem.
        let kept = cluster.dir.path().to_owned();
        std::mem::forget(std::mem::replace(
            &mut cluster.dir,
            tempfile::Builder::new()
                .prefix("refvote-chaos-")
                .tempdir()?,
        ));
        eprintln!("logs kept in {}", kept.display());
    }
    Ok(report)
}

/// Samples the repository's replicas every 100 ms and records, for each time one was
/// not up to date, how long it took to be up to date again (`repairs`), and each
/// sample's time and whether every replica was up to date on a live node (`synced`).
async fn poll_outdated(
    store: Store,
    repo: RepoId,
    history: Arc<History>,
    repairs: Arc<Mutex<Vec<Duration>>>,
    synced: Arc<Mutex<Vec<(Duration, bool)>>>,
) {
    // Runs until the settle step aborts it, so late repairs count too.
    let mut since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut n = 0u64;
    while n < 10_000_000 {
        n += 1;
        if let Ok(view) = store.repo_view(&repo).await {
            let at = history.now();
            for node in &view.record.assigned {
                let ok = view
                    .replicas
                    .get(node)
                    .is_some_and(|(r, _)| r.is_up_to_date(&view.record));
                match (ok, since.get(node)) {
                    (false, None) => {
                        since.insert(node.clone(), Instant::now());
                    }
                    (true, Some(t)) => {
                        repairs.lock().expect("poisoned").push(t.elapsed());
                        since.remove(node);
                    }
                    _ => {}
                }
            }
            let all = view.up_to_date_live().len() == view.record.assigned.len();
            synced.lock().expect("poisoned").push((at, all));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Message → id of every commit in the final history of the gRPC writer's branch, read
/// with git on the first assigned replica (the checker compares the replicas).
async fn grpc_commits(
    cluster: &ChaosCluster,
    repo: &RepoId,
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let view = cluster.store.repo_view(repo).await?;
    let Some(node) = view
        .record
        .assigned
        .first()
        .and_then(|name| cluster.nodes.iter().find(|n| &n.name == name))
    else {
        return Ok(Default::default());
    };
    let branch = format!("refs/heads/{}", workload::GRPC_BRANCH);
    let path = node.repo(REPO);
    if crate::git::rev(&path, &branch).is_none() {
        return Ok(Default::default());
    }
    let log = crate::git::git(&path, &["log", "--format=%H %s", &branch, "--"])?;
    Ok(log
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(oid, subject)| (subject.to_owned(), oid.to_owned()))
        .collect())
}
