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
pub mod history;
pub mod schedule;
pub mod workload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use refvote_cluster::{RepoId, Store, StoreConfig};
use refvote_proto::gitaly::Repository;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;

use tonic::transport::Channel;

use self::history::History;
use crate::etcd::Etcd;
use crate::faultnet::{Link, LinkState};
use crate::node::{Node, NodeOptions};
use crate::proc::{free_port, loopback_ip};
use crate::router::{Router, RouterOptions};

/// The relative path every workload client uses.
pub const REPO: &str = "chaos/project.git";

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

/// The cluster under test. Every process is stopped by pid when it is dropped.
pub struct ChaosCluster {
    pub etcd: Etcd,
    pub nodes: Vec<Node>,
    pub routers: Vec<Router>,
    /// `node_etcd[n][m]`: node n's link to etcd member m.
    pub node_etcd: Vec<Vec<Link>>,
    /// `to_node[n]`: the link routers and peers reach node n through.
    pub to_node: Vec<Link>,
    /// `router_etcd[r][m]`: router r's link to etcd member m.
    pub router_etcd: Vec<Vec<Link>>,
    /// `http[r]`: the repository's URL on router r's git smart HTTP port.
    pub http: Vec<String>,
    /// The suite's own view of etcd, straight to the members (never cut).
    pub store: Store,
    pub lease_ttl: Duration,
    pub dir: tempfile::TempDir,
}

impl ChaosCluster {
    pub async fn start(nodes: usize, routers: usize) -> anyhow::Result<ChaosCluster> {
        let dir = tempfile::Builder::new()
            .prefix("refvote-chaos-")
            .tempdir()?;
        let etcd = Etcd::start(3).await?;
        let member_addrs: Vec<SocketAddr> = etcd
            .endpoints()
            .iter()
            .map(|e| e.trim_start_matches("http://").parse())
            .collect::<Result<_, _>>()
            .context("etcd endpoint")?;
        let opts = NodeOptions::default();
        let lease_ttl = Duration::from_secs(opts.lease_ttl_secs);
        let (mut started, mut node_etcd, mut to_node) = (Vec::new(), Vec::new(), Vec::new());
        for i in 1..=nodes {
            let name = format!("node{i}");
            let mut links = Vec::new();
            for (m, addr) in member_addrs.iter().enumerate() {
                links.push(Link::start(&format!("{name}->etcd{m}"), *addr).await?);
            }
            let ip = loopback_ip();
            let grpc = SocketAddr::from((ip, free_port(ip)?));
            let front = Link::start(&format!("*->{name}"), grpc).await?;
            let endpoints: Vec<String> = links
                .iter()
                .map(|l| format!("http://{}", l.addr()))
                .collect();
            let node_opts = NodeOptions {
                grpc_addr: Some(grpc),
                advertise_addr: Some(front.addr()),
                ..opts.clone()
            };
            started.push(Node::start(&name, dir.path(), &endpoints, &node_opts).await?);
            node_etcd.push(links);
            to_node.push(front);
        }
        let (mut rs, mut router_etcd, mut http) = (Vec::new(), Vec::new(), Vec::new());
        for r in 1..=routers {
            let name = format!("router{r}");
            let mut links = Vec::new();
            for (m, addr) in member_addrs.iter().enumerate() {
                links.push(Link::start(&format!("{name}->etcd{m}"), *addr).await?);
            }
            let endpoints: Vec<String> = links
                .iter()
                .map(|l| format!("http://{}", l.addr()))
                .collect();
            let router = Router::start_with(
                &name,
                dir.path(),
                &endpoints,
                &RouterOptions {
                    http: true,
                    // Every node holds a replica: 2 of 3, or 3 of 5, must agree.
                    replication_factor: Some(nodes),
                    ..RouterOptions::default()
                },
            )
            .await?;
            http.push(router.http_url(REPO));
            rs.push(router);
            router_etcd.push(links);
        }
        let store = Store::connect(&StoreConfig {
            endpoints: etcd.endpoints(),
            prefix: "/refvote/".into(),
            request_timeout: Duration::from_secs(2),
            tls: None,
        })
        .await?;
        Ok(ChaosCluster {
            etcd,
            nodes: started,
            routers: rs,
            node_etcd,
            to_node,
            router_etcd,
            http,
            store,
            lease_ttl,
            dir,
        })
    }

    /// Creates [`REPO`] through router 1.
    pub async fn create_repo(&self) -> anyhow::Result<RepoId> {
        let ch = self.routers[0].channel().await?;
        RepositoryServiceClient::new(ch)
            .create_repository(refvote_proto::gitaly::CreateRepositoryRequest {
                repository: Some(repository()),
                ..Default::default()
            })
            .await
            .context("CreateRepository through the router")?;
        Ok(RepoId::new("default", REPO)?)
    }

    /// Heals every link and brings every process back: the state the checker needs.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        for l in self
            .node_etcd
            .iter()
            .chain(self.router_etcd.iter())
            .flatten()
            .chain(self.to_node.iter())
        {
            if l.state() != LinkState::Up {
                l.set(LinkState::Up);
            }
        }
        for i in 0..self.etcd.len() {
            if !self.etcd.is_running(i) {
                self.etcd.restart(i)?;
            } else {
                let _ = self.etcd.resume(i);
            }
        }
        self.etcd.wait_healthy(Duration::from_secs(30)).await?;
        for n in &mut self.nodes {
            n.env.clear();
            if n.is_running() {
                let _ = n.resume();
            } else {
                n.launch().await?;
            }
        }
        for r in &mut self.routers {
            r.env.clear();
            if !r.is_running() {
                r.launch().await?;
            }
        }
        Ok(())
    }

    /// Waits until every replica of `repo` is up to date (repairs done), at most
    /// `timeout`. Returns how long it took.
    pub async fn settle(&self, repo: &RepoId, timeout: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < timeout {
            match self.store.repo_view(repo).await {
                Ok(view) => {
                    let behind: Vec<String> = view
                        .record
                        .assigned
                        .iter()
                        .filter(|n| {
                            !view
                                .replicas
                                .get(*n)
                                .is_some_and(|(r, _)| r.is_up_to_date(&view.record))
                        })
                        .map(|n| format!("{n}: {:?}", view.replicas.get(n).map(|(r, _)| r)))
                        .collect();
                    let txrepo = self.store.keys().txrepo(repo);
                    let txs = match self.store.get_prefix(&txrepo).await {
                        Ok((entries, _)) => entries.len(),
                        Err(_) => 1,
                    };
                    if behind.is_empty() && txs == 0 {
                        return Ok(t0.elapsed());
                    }
                    last = format!("behind: {behind:?}; open transactions: {txs}");
                }
                Err(e) => last = format!("etcd: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::bail!("replicas did not settle within {timeout:?}: {last}")
    }
}

/// The workload's repository as clients name it.
pub fn repository() -> Repository {
    Repository {
        storage_name: "default".into(),
        relative_path: REPO.into(),
        ..Default::default()
    }
}

/// splitmix64: a small, seedable generator, so a run is repeatable from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next_u64() % (hi - lo).max(1))
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
    let poller = tokio::spawn(poll_outdated(
        cluster.store.clone(),
        repo.clone(),
        repairs.clone(),
        stop.clone(),
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
    check::check(
        &history.ops(),
        &history.faults(),
        &replicas,
        &commits,
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
                "FAULT [{:>8.3}s..{:>8.3}s] {} on {}\n",
                f.injected.as_secs_f64(),
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

/// Samples the repository's replicas every 250 ms and records, for each time one was
/// not up to date, how long it took to be up to date again.
async fn poll_outdated(
    store: Store,
    repo: RepoId,
    repairs: Arc<Mutex<Vec<Duration>>>,
    _stop: Arc<AtomicBool>,
) {
    // Runs until the settle step aborts it, so late repairs count too.
    let mut since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut n = 0u64;
    while n < 1_000_000 {
        n += 1;
        if let Ok(view) = store.repo_view(&repo).await {
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
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
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

/// Every assigned replica's refs (read from its storage with git), checksum (from its
/// node, directly) and whether etcd says it is up to date.
pub async fn read_replicas(
    cluster: &ChaosCluster,
    repo: &RepoId,
) -> anyhow::Result<BTreeMap<String, (check::Refs, String, bool)>> {
    let view = cluster.store.repo_view(repo).await?;
    let mut out = BTreeMap::new();
    for name in &view.record.assigned {
        let node = cluster
            .nodes
            .iter()
            .find(|n| &n.name == name)
            .context("assigned node unknown to the suite")?;
        let refs: check::Refs = crate::git::refs(&node.repo(REPO))
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(oid, name)| (name.to_owned(), oid.to_owned()))
            .collect();
        let ch = Channel::from_shared(node.grpc_url())?.connect().await?;
        let checksum = RepositoryServiceClient::new(ch)
            .calculate_checksum(refvote_proto::gitaly::CalculateChecksumRequest {
                repository: Some(Repository {
                    storage_name: "default".into(),
                    relative_path: REPO.into(),
                    ..Default::default()
                }),
            })
            .await
            .map(|r| r.into_inner().checksum)
            .unwrap_or_else(|s| format!("error: {}", s.message()));
        let up_to_date = view
            .replicas
            .get(name)
            .is_some_and(|(r, _)| r.is_up_to_date(&view.record));
        out.insert(name.clone(), (refs, checksum, up_to_date));
    }
    Ok(out)
}
