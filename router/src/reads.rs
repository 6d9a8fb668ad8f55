//! Where a read learns which replicas may serve it (DESIGN.md "Reads").
//!
//! Two sources, kept apart on purpose:
//!
//! - **The watched view**: a background task loads `repos/`, `replicas/` and `nodes/`
//!   in one etcd transaction, then follows them with one watch stream starting at the
//!   next revision. A cancelled watch (compaction) or a broken stream reloads
//!   everything. Reads take the nodes' liveness and addresses from it.
//! - **The confirm step**: before a read chooses a replica it needs one linearizable
//!   etcd round trip that *started after the read arrived*, reading its repository's
//!   record and replica records. Reads in flight share round trips (single flight):
//!   whoever arrives while no round trip runs starts one with its repository; whoever
//!   arrives while one runs joins the *next* batch, which starts when the running one
//!   ends and reads every repository of the batch in one etcd transaction (up to
//!   [`REPOS_PER_TXN`] repositories per transaction, the rest in parallel ones). So N
//!   reads in flight cost at most two rounds of round trips, not N.
//!
//! **The guarantee.** A push is acknowledged only after its finalize transaction
//! (which promotes the replicas that applied it and marks the others outdated) has
//! committed in etcd at some revision W. A read that starts after the acknowledgement
//! gets its replicas from a linearizable read that started after it, so at a revision
//! R ≥ W: a replica that missed the push is not up to date at R and is not chosen,
//! whichever router served the push. The watch alone could not promise this (watches
//! are not linearizable), and progress notifications cannot fill the gap on etcd 3.4
//! (they are not ordered with the stream), so the replica records come from the
//! confirm, never from the watch. Node liveness may lag by the watch's delay; that only
//! costs availability (a call to a node that just died fails over to another replica,
//! a node that just came back is used a moment later), never freshness, because a
//! replica's up-to-date state is in its replica record, not in its node's lease.
//!
//! **Without etcd.** A read whose confirm fails (etcd unreachable within the request
//! timeout) fails `UNAVAILABLE`: another router may still be committing writes. So a
//! read fails within two request timeouts: at most the rest of a round trip that was
//! already running plus its own. With `allow_stale_reads`, such a read is served from
//! the watched view instead, if that view was connected to etcd no longer than
//! `max_stale_read_secs` ago: it may then miss writes acknowledged after the router lost
//! etcd, plus the watch's delivery delay before that (normally milliseconds; a silently
//! cut connection is noticed by the etcd client's keep-alive within a few seconds).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use etcd_client::{EventType, KeyValue, Txn, WatchOptions};
use futures_util::FutureExt;
use refvote_cluster::records::{NodeRecord, ReplicaRecord, RepoRecord};
use refvote_cluster::repository::RepoView;
use refvote_cluster::store::{Entry, by_tail, get_op, get_prefix_op, ranges, revision};
use refvote_cluster::{RepoId, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Repositories one confirm transaction reads (two range reads each, under etcd's
/// default limit of 128 operations per transaction).
pub const REPOS_PER_TXN: usize = 50;

/// How a router serves reads when etcd cannot be reached.
#[derive(Debug, Clone, Copy)]
pub struct StaleReads {
    pub allow: bool,
    /// How long after losing etcd the watched view may still serve reads.
    pub max_age: Duration,
}

/// Why a read has no replicas to go to.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("repository {0} is not registered")]
    NotRegistered(RepoId),
    #[error("{0}")]
    Unconfirmed(String),
}

/// Counters of the read path, for tests and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadStats {
    /// Reads that asked for a confirmed view.
    pub reads: u64,
    /// Confirm rounds run (each one etcd transaction per [`REPOS_PER_TXN`]
    /// repositories).
    pub confirm_rounds: u64,
    /// Reads served from the watched view because etcd could not be reached.
    pub stale_served: u64,
}

/// The read path's view: the watched records and the shared confirm step.
pub struct Reads {
    watched: Arc<RwLock<Watched>>,
    loaded: watch::Receiver<bool>,
    confirmer: Confirmer,
    stale: StaleReads,
    timeout: Duration,
    reads: AtomicU64,
    stale_served: AtomicU64,
    task: JoinHandle<()>,
}

impl Drop for Reads {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reads {
    /// Starts the watch task; reads wait for its first load (up to the request timeout).
    pub fn start(store: Store, stale: StaleReads) -> Reads {
        let watched = Arc::new(RwLock::new(Watched::default()));
        let (loaded_tx, loaded) = watch::channel(false);
        let task = tokio::spawn(follow(store.clone(), watched.clone(), loaded_tx));
        let fetch_store = store.clone();
        let fetch: Fetch = Arc::new(move |repos| {
            let store = fetch_store.clone();
            Box::pin(async move { read_repos(&store, repos).await })
        });
        Reads {
            watched,
            loaded,
            confirmer: Confirmer::new(fetch),
            stale,
            timeout: store.timeout(),
            reads: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
            task,
        }
    }

    pub fn stats(&self) -> ReadStats {
        ReadStats {
            reads: self.reads.load(Ordering::Relaxed),
            confirm_rounds: self.confirmer.rounds(),
            stale_served: self.stale_served.load(Ordering::Relaxed),
        }
    }

    /// The replicas `repo`'s read may use, confirmed at a revision read after this call
    /// began (or stale, see the module doc).
    pub async fn view(&self, repo: &RepoId) -> Result<RepoView, ReadError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let confirmed = self.confirmer.confirm(repo.clone()).await;
        let why = match &*confirmed {
            Ok(c) => {
                let (record, replicas) = c
                    .repos
                    .get(repo)
                    .ok_or_else(|| ReadError::NotRegistered(repo.clone()))?;
                let live_nodes = self.live_nodes().await?;
                return build(c.revision, record, replicas, live_nodes);
            }
            Err(why) => why,
        };
        if self.stale.allow {
            let w = self.watched.read().expect("view lock");
            let fresh = w.loaded
                && w.lost_since
                    .is_none_or(|t| t.elapsed() <= self.stale.max_age);
            if fresh && let Some(view) = w.repo_view(repo) {
                self.stale_served.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%repo, revision = w.revision, error = %why, "etcd unreachable; serving a stale read");
                return view;
            }
        }
        Err(ReadError::Unconfirmed(format!(
            "cannot confirm the replicas of {repo} with etcd ({why}); reads need etcd \
             unless the router sets allow_stale_reads; check the router's etcd connectivity"
        )))
    }

    /// Whether the watched view knows `node` lost its lease (no: while it is not
    /// connected to etcd, it knows nothing).
    pub fn node_gone(&self, node: &str) -> bool {
        let w = self.watched.read().expect("view lock");
        w.loaded && w.lost_since.is_none() && !w.nodes.contains_key(node)
    }

    /// The watched records, for summaries people read (the ops web), never for
    /// routing: `f` sees every repository's record and replica entries and the live
    /// nodes under the view's read lock, so it should be quick. `None` until the view
    /// has loaded once.
    pub fn inspect<T>(&self, f: impl FnOnce(&WatchedRecords<'_>) -> T) -> Option<T> {
        let w = self.watched.read().expect("view lock");
        if !w.loaded {
            return None;
        }
        Some(f(&WatchedRecords {
            repos: &w.repos,
            replicas: &w.replicas,
            nodes: &w.nodes,
            connected: w.lost_since.is_none(),
        }))
    }

    /// The nodes holding their lease, from the watched view once it has loaded.
    async fn live_nodes(&self) -> Result<BTreeMap<String, (NodeRecord, Entry)>, ReadError> {
        if !*self.loaded.borrow() {
            let mut loaded = self.loaded.clone();
            let waited = tokio::time::timeout(self.timeout, loaded.wait_for(|l| *l)).await;
            if !matches!(waited, Ok(Ok(_))) {
                return Err(ReadError::Unconfirmed(
                    "the router has not loaded the nodes from etcd yet; retry shortly".into(),
                ));
            }
        }
        Ok(self.watched.read().expect("view lock").nodes.clone())
    }
}

fn build(
    revision: i64,
    record: &Entry,
    replicas: &BTreeMap<String, Entry>,
    live_nodes: BTreeMap<String, (NodeRecord, Entry)>,
) -> Result<RepoView, ReadError> {
    let corrupt = |e: refvote_cluster::Error| ReadError::Unconfirmed(e.to_string());
    let decoded: RepoRecord = record.decode().map_err(corrupt)?;
    let mut out = BTreeMap::new();
    for (node, e) in replicas {
        let r: ReplicaRecord = e.decode().map_err(corrupt)?;
        out.insert(node.clone(), (r, e.clone()));
    }
    Ok(RepoView {
        revision,
        record: decoded,
        record_entry: record.clone(),
        replicas: out,
        live_nodes,
        lock: None,
    })
}

/// Read access to the watched view ([`Reads::inspect`]).
pub struct WatchedRecords<'a> {
    /// `repos/<segment>` entries by key segment.
    pub repos: &'a HashMap<String, Entry>,
    /// `replicas/<segment>/<node>` entries by key segment, then node.
    pub replicas: &'a HashMap<String, BTreeMap<String, Entry>>,
    /// The nodes holding their lease.
    pub nodes: &'a BTreeMap<String, (NodeRecord, Entry)>,
    /// Whether the watch is following etcd right now (false: what it last saw).
    pub connected: bool,
}

// ---- the watched view ----

/// The records the watch follows, by key.
#[derive(Default)]
struct Watched {
    /// `repos/<segment>` entries by key segment.
    repos: HashMap<String, Entry>,
    /// `replicas/<segment>/<node>` entries by key segment, then node.
    replicas: HashMap<String, BTreeMap<String, Entry>>,
    nodes: BTreeMap<String, (NodeRecord, Entry)>,
    /// The last revision applied.
    revision: i64,
    loaded: bool,
    /// When the watch last lost etcd; `None` while it is connected.
    lost_since: Option<Instant>,
}

impl Watched {
    fn repo_view(&self, repo: &RepoId) -> Option<Result<RepoView, ReadError>> {
        let segment = repo.key_segment();
        let record = self.repos.get(&segment)?;
        let empty = BTreeMap::new();
        let replicas = self.replicas.get(&segment).unwrap_or(&empty);
        Some(build(self.revision, record, replicas, self.nodes.clone()))
    }

    fn apply(&mut self, prefixes: &Prefixes, put: bool, entry: Entry) {
        if let Some(segment) = entry.key.strip_prefix(&prefixes.repos) {
            let segment = segment.to_owned();
            if put {
                self.repos.insert(segment, entry);
            } else {
                self.repos.remove(&segment);
            }
        } else if let Some(tail) = entry.key.strip_prefix(&prefixes.replicas) {
            let Some((segment, node)) = tail.rsplit_once('/') else {
                return;
            };
            let (segment, node) = (segment.to_owned(), node.to_owned());
            if put {
                self.replicas
                    .entry(segment)
                    .or_default()
                    .insert(node, entry);
            } else if let Some(m) = self.replicas.get_mut(&segment) {
                m.remove(&node);
                if m.is_empty() {
                    self.replicas.remove(&segment);
                }
            }
        } else if let Some(node) = entry.key.strip_prefix(&prefixes.nodes) {
            let node = node.to_owned();
            if !put {
                self.nodes.remove(&node);
                return;
            }
            match entry.decode::<NodeRecord>() {
                Ok(r) => {
                    self.nodes.insert(node, (r, entry));
                }
                Err(e) => tracing::warn!(node, error = %e, "unreadable node record ignored"),
            }
        }
    }
}

struct Prefixes {
    repos: String,
    replicas: String,
    nodes: String,
}

fn entry_of(kv: &KeyValue) -> Entry {
    Entry {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

/// The watch task: load, follow, and on any failure mark the view lost and start over.
async fn follow(store: Store, watched: Arc<RwLock<Watched>>, loaded: watch::Sender<bool>) {
    let p = store.keys().prefix().to_owned();
    let prefixes = Prefixes {
        repos: store.keys().repos(),
        replicas: format!("{p}replicas/"),
        nodes: store.keys().nodes(),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let why = match follow_once(&store, &watched, &loaded, &prefixes).await {
            Ok(why) => why,
            Err(e) => format!("{e:#}"),
        };
        {
            let mut w = watched.write().expect("view lock");
            if w.lost_since.is_none() {
                // It was connected: start over quickly.
                backoff = Duration::from_millis(100);
                w.lost_since = Some(Instant::now());
                tracing::warn!(error = why, "the read view lost etcd; reloading");
            }
        }
        store.fail_over();
        store.pause(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Loads the view and follows it until the watch ends; returns why it ended.
async fn follow_once(
    store: &Store,
    watched: &RwLock<Watched>,
    loaded: &watch::Sender<bool>,
    prefixes: &Prefixes,
) -> anyhow::Result<String> {
    let txn = Txn::new().and_then([
        get_prefix_op(&prefixes.repos),
        get_prefix_op(&prefixes.replicas),
        get_prefix_op(&prefixes.nodes),
    ]);
    let resp = store.txn(txn).await?;
    let rev = revision(&resp);
    let mut stream = tokio::time::timeout(store.timeout(), async {
        let mut client = store.client();
        let from = |start| Some(WatchOptions::new().with_prefix().with_start_revision(start));
        let mut s = client.watch(prefixes.repos.as_str(), from(rev + 1)).await?;
        s.watch(prefixes.replicas.as_str(), from(rev + 1)).await?;
        s.watch(prefixes.nodes.as_str(), from(rev + 1)).await?;
        Ok::<_, etcd_client::Error>(s)
    })
    .await
    .map_err(|_| anyhow::anyhow!("opening the watch timed out"))??;
    {
        let mut fresh = Watched {
            revision: rev,
            loaded: true,
            ..Watched::default()
        };
        for range in ranges(&resp) {
            for e in range {
                fresh.apply(prefixes, true, e);
            }
        }
        tracing::debug!(
            revision = rev,
            repos = fresh.repos.len(),
            nodes = fresh.nodes.len(),
            "read view loaded"
        );
        *watched.write().expect("view lock") = fresh;
    }
    loaded.send_replace(true);
    loop {
        let Some(msg) = stream.message().await? else {
            return Ok("the watch stream ended".into());
        };
        if msg.canceled() {
            return Ok(format!(
                "the watch was cancelled (compacted at {}: {})",
                msg.compact_revision(),
                msg.cancel_reason()
            ));
        }
        let mut w = watched.write().expect("view lock");
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            w.apply(prefixes, ev.event_type() == EventType::Put, entry_of(kv));
        }
        if let Some(h) = msg.header() {
            w.revision = w.revision.max(h.revision());
        }
    }
}

// ---- the confirm step ----

/// A confirmed read of some repositories' records at one revision.
#[derive(Debug, Default)]
pub struct Confirmed {
    pub revision: i64,
    /// Registered repositories among those asked: record and replica records by node.
    /// A repository asked for and absent here is not registered.
    pub repos: HashMap<RepoId, (Entry, BTreeMap<String, Entry>)>,
}

type Outcome = Arc<Result<Confirmed, String>>;
type Fetch = Arc<
    dyn Fn(Vec<RepoId>) -> Pin<Box<dyn Future<Output = Result<Confirmed, String>> + Send>>
        + Send
        + Sync,
>;

/// Reads `repos`' records linearizably: one transaction per [`REPOS_PER_TXN`], run in
/// parallel. The revision is the lowest of them, and each is at least the revision of
/// every write acknowledged before the round began.
async fn read_repos(store: &Store, repos: Vec<RepoId>) -> Result<Confirmed, String> {
    let keys = store.keys();
    let txns = repos.chunks(REPOS_PER_TXN).map(|chunk| async move {
        let mut ops = Vec::with_capacity(chunk.len() * 2);
        for r in chunk {
            ops.push(get_op(&keys.repo(r)));
            ops.push(get_prefix_op(&keys.replicas(r)));
        }
        let resp = store.txn(Txn::new().and_then(ops)).await?;
        Ok::<_, refvote_cluster::Error>((chunk, resp))
    });
    let mut out = Confirmed {
        revision: i64::MAX,
        repos: HashMap::new(),
    };
    for result in futures_util::future::join_all(txns).await {
        let (chunk, resp) = result.map_err(|e| e.to_string())?;
        out.revision = out.revision.min(revision(&resp));
        let r = ranges(&resp);
        for (i, repo) in chunk.iter().enumerate() {
            let Some(record) = r[2 * i].first() else {
                continue;
            };
            let replicas = by_tail(&r[2 * i + 1], &keys.replicas(repo));
            out.repos.insert(repo.clone(), (record.clone(), replicas));
        }
    }
    Ok(out)
}

/// One batch of reads waiting for the same round.
struct Batch {
    repos: BTreeSet<RepoId>,
    done: watch::Sender<Option<Outcome>>,
}

#[derive(Default)]
struct Flight {
    running: bool,
    next: Option<Batch>,
}

/// Single-flight confirm rounds: a round only ever serves reads that arrived before it
/// started.
pub struct Confirmer {
    fetch: Fetch,
    flight: Arc<Mutex<Flight>>,
    rounds: Arc<AtomicU64>,
}

impl Confirmer {
    fn new(fetch: Fetch) -> Confirmer {
        Confirmer {
            fetch,
            flight: Arc::default(),
            rounds: Arc::default(),
        }
    }

    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Joins the next round (starting it when none runs) and waits for its result.
    async fn confirm(&self, repo: RepoId) -> Outcome {
        let mut done = {
            let mut f = self.flight.lock().expect("flight lock");
            let batch = f.next.get_or_insert_with(|| Batch {
                repos: BTreeSet::new(),
                done: watch::channel(None).0,
            });
            batch.repos.insert(repo);
            let done = batch.done.subscribe();
            if !f.running {
                f.running = true;
                let batch = f.next.take().expect("just inserted");
                // A task of its own: a read that gives up must not cancel the round
                // the others wait for.
                tokio::spawn(drive(
                    self.fetch.clone(),
                    self.flight.clone(),
                    self.rounds.clone(),
                    batch,
                ));
            }
            done
        };
        match done.wait_for(|o| o.is_some()).await {
            Ok(o) => o.clone().expect("waited for it"),
            Err(_) => Arc::new(Err("the confirm round stopped".into())),
        }
    }
}

/// Runs rounds back to back while reads keep arriving.
async fn drive(fetch: Fetch, flight: Arc<Mutex<Flight>>, rounds: Arc<AtomicU64>, first: Batch) {
    let mut batch = first;
    loop {
        rounds.fetch_add(1, Ordering::Relaxed);
        let repos: Vec<RepoId> = batch.repos.iter().cloned().collect();
        // A panic must not leave `running` set forever (caught here rather than in a
        // task of its own: one hop less on every read's path).
        let outcome = match std::panic::AssertUnwindSafe(fetch(repos))
            .catch_unwind()
            .await
        {
            Ok(o) => o,
            Err(_) => Err("the confirm round failed: it panicked".into()),
        };
        batch.done.send_replace(Some(Arc::new(outcome)));
        let mut f = flight.lock().expect("flight lock");
        match f.next.take() {
            Some(next) => batch = next,
            None => {
                f.running = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fetch that takes 10 ms and records when each round started and what it read.
    /// When each round started and what it read.
    type Rounds = Arc<Mutex<Vec<(tokio::time::Instant, Vec<RepoId>)>>>;

    fn recording(log: Rounds) -> Fetch {
        Arc::new(move |repos: Vec<RepoId>| {
            let log = log.clone();
            Box::pin(async move {
                let started = tokio::time::Instant::now();
                log.lock().unwrap().push((started, repos.clone()));
                tokio::time::sleep(Duration::from_millis(10)).await;
                let mut c = Confirmed {
                    revision: log.lock().unwrap().len() as i64,
                    ..Confirmed::default()
                };
                for r in repos {
                    let e = Entry {
                        key: format!("started-{:?}", started),
                        value: vec![],
                        create_revision: 1,
                        mod_revision: 1,
                        lease: 0,
                    };
                    c.repos.insert(r, (e, BTreeMap::new()));
                }
                Ok(c)
            })
        })
    }

    fn repo(i: usize) -> RepoId {
        RepoId::new("default", &format!("r{i}.git")).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn every_read_is_served_by_a_round_that_started_after_it_arrived() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let confirmer = Arc::new(Confirmer::new(recording(log.clone())));
        // 40 reads arriving 1 ms apart over four 10 ms rounds, two repositories.
        let mut reads = Vec::new();
        for i in 0..40 {
            let c = confirmer.clone();
            reads.push(tokio::spawn(async move {
                let arrived = tokio::time::Instant::now();
                let out = c.confirm(repo(i % 2)).await;
                (arrived, i, out)
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for r in reads {
            let (arrived, i, out) = r.await.unwrap();
            let c = out.as_ref().as_ref().expect("confirmed");
            let round = (c.revision - 1) as usize;
            let (started, repos) = log.lock().unwrap()[round].clone();
            assert!(
                started >= arrived,
                "read {i} served by a round that began before it"
            );
            assert!(
                repos.contains(&repo(i % 2)),
                "read {i}'s repository was read"
            );
        }
        let rounds = log.lock().unwrap().len();
        assert_eq!(rounds as u64, confirmer.rounds());
        // One round per 10 ms of arrivals (plus the first), far fewer than 40 reads.
        assert!((2..=6).contains(&rounds), "{rounds} rounds for 40 reads");
        // The batches read each repository once, not once per read.
        assert!(log.lock().unwrap().iter().all(|(_, r)| r.len() <= 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_round_fails_its_reads_and_the_next_round_still_runs() {
        let calls = Arc::new(AtomicU64::new(0));
        let c2 = calls.clone();
        let fetch: Fetch = Arc::new(move |_repos| {
            let n = c2.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if n == 0 {
                    panic!("first round breaks");
                }
                Ok(Confirmed::default())
            })
        });
        let confirmer = Arc::new(Confirmer::new(fetch));
        let c = confirmer.clone();
        let first = tokio::spawn(async move { c.confirm(repo(1)).await });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let c = confirmer.clone();
        let second = tokio::spawn(async move { c.confirm(repo(1)).await });
        assert!(first.await.unwrap().is_err());
        assert!(second.await.unwrap().is_ok());
        // And a later read starts a new round.
        assert!(confirmer.confirm(repo(2)).await.is_ok());
        assert_eq!(confirmer.rounds(), 3);
    }
}
