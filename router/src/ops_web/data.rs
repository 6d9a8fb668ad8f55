//! What the ops web shows, read for each page: etcd's members, the lease holders
//! (nodes, routers), repository summaries from the router's watched view of etcd (in
//! memory: the overview never reads every repository from etcd), the repair jobs and
//! open transactions, one node's replicas, and the search's paged range read of
//! `repos/`. Every structure here is also the page's JSON under `/api/`; where
//! `votingctl --json` prints the same thing the fields are its own (the types of
//! `refvote_cluster::summary`).
//!
//! Reading only: the admin jobs go through the admin service (`actions`).

use std::collections::BTreeMap;

use etcd_client::GetOptions;
use refvote_cluster::records::{NodeRecord, ReplicaRecord, RepoRecord};
use refvote_cluster::repair::RepairJob;
use refvote_cluster::store::{Entry, entries};
use refvote_cluster::summary::{Holder, Member, RepoSummary, summarize};
use refvote_cluster::{RepoId, Store};
use serde::Serialize;

use crate::reads::{Reads, WatchedRecords};

/// Degraded repositories the overview lists by name (the counts cover all).
pub const DEGRADED_LISTED: usize = 100;
/// Repair jobs a page lists.
pub const JOBS_LISTED: usize = 500;
/// A node's replicas its page lists.
pub const NODE_REPLICAS_LISTED: usize = 500;
/// Repositories per search page.
pub const SEARCH_PAGE: usize = 50;

/// Repositories counted by state. A degraded repository (some replica not up to date
/// on a live node) also counts under each of the reasons that apply.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ByState {
    /// Every replica up to date on a live node.
    pub up_to_date: usize,
    pub degraded: usize,
    /// With a replica recorded outdated (or missing).
    pub outdated: usize,
    /// With a replica being repaired.
    pub repairing: usize,
    /// With no up-to-date replica on a live node: reads and writes fail.
    pub dataloss: usize,
}

impl ByState {
    pub fn add(&mut self, s: &RepoSummary) {
        if s.available >= s.replicas.len() && !s.dataloss {
            self.up_to_date += 1;
            return;
        }
        self.degraded += 1;
        if s.outdated > 0 {
            self.outdated += 1;
        }
        if s.repairing > 0 {
            self.repairing += 1;
        }
        if s.dataloss {
            self.dataloss += 1;
        }
    }
}

/// A repair job as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub repo: String,
    pub node: String,
    pub generation: u64,
    pub reason: String,
    pub attempts: u32,
    pub last_error: String,
    pub last_attempt_unix_ms: u64,
    /// Back-off: not tried again before this (Unix milliseconds).
    pub not_before_unix_ms: u64,
    /// The router working on it right now, if any.
    pub claimed_by: String,
}

impl From<&RepairJob> for Job {
    fn from(j: &RepairJob) -> Job {
        Job {
            repo: j.job.repo.to_string(),
            node: j.job.node.clone(),
            generation: j.job.generation,
            reason: j.job.reason.clone(),
            attempts: j.job.attempts,
            last_error: j.job.last_error.clone(),
            last_attempt_unix_ms: j.job.last_attempt_unix_ms,
            not_before_unix_ms: j.job.not_before_unix_ms,
            claimed_by: j.claimed_by.clone().unwrap_or_default(),
        }
    }
}

/// The overview. Its first six fields are `votingctl status --json`'s `cluster_view`
/// (with `degraded` cut at [`DEGRADED_LISTED`]).
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    pub etcd_members: Vec<Member>,
    pub nodes: Vec<Holder>,
    pub routers: Vec<Holder>,
    pub repositories: usize,
    pub degraded: Vec<RepoSummary>,
    pub repair_jobs: usize,
    pub by_state: ByState,
    /// Transactions open right now (all repositories).
    pub open_transactions: i64,
    /// The first [`JOBS_LISTED`] repair jobs.
    pub repair_queue: Vec<Job>,
    /// This router's watched view follows etcd right now (false: the repository
    /// counts are what it last saw).
    pub view_current: bool,
    /// Every live router's background verifier (`votingctl status --json`'s
    /// `verifiers`).
    pub verifiers: Vec<refvote_cluster::verifier::VerifierStatus>,
}

/// The summary of the repository with key segment `segment` in the watched view.
fn summary_of(w: &WatchedRecords<'_>, record: &Entry, segment: &str) -> Option<RepoSummary> {
    let record: RepoRecord = record.decode().ok()?;
    let mut replicas: BTreeMap<String, ReplicaRecord> = BTreeMap::new();
    if let Some(entries) = w.replicas.get(segment) {
        for (node, e) in entries {
            if let Ok(r) = e.decode() {
                replicas.insert(node.clone(), r);
            }
        }
    }
    Some(summarize(&record, &replicas, |n| w.nodes.contains_key(n)))
}

/// Every repository counted by state from the watched view, and the first
/// [`DEGRADED_LISTED`] degraded ones by name.
pub fn census(reads: &Reads) -> Option<(usize, ByState, Vec<RepoSummary>, bool)> {
    reads.inspect(|w| {
        let mut by_state = ByState::default();
        let mut degraded = Vec::new();
        for (segment, entry) in w.repos {
            let Some(s) = summary_of(w, entry, segment) else {
                continue;
            };
            by_state.add(&s);
            if (s.available < s.replicas.len() || s.dataloss) && degraded.len() < DEGRADED_LISTED {
                degraded.push(s);
            }
        }
        degraded.sort_by(|a, b| a.repo.cmp(&b.repo));
        (w.repos.len(), by_state, degraded, w.connected)
    })
}

/// Summaries of the named repositories from the watched view (those it knows).
pub fn summaries(reads: &Reads, repos: &[RepoId]) -> Vec<RepoSummary> {
    reads
        .inspect(|w| {
            repos
                .iter()
                .filter_map(|r| {
                    let segment = r.key_segment();
                    summary_of(w, w.repos.get(&segment)?, &segment)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Repositories with no up-to-date replica on a live node.
pub fn dataloss(reads: &Reads, limit: usize) -> Vec<RepoSummary> {
    let mut out: Vec<RepoSummary> = reads
        .inspect(|w| {
            w.repos
                .iter()
                .filter_map(|(segment, e)| summary_of(w, e, segment))
                .filter(|s| s.dataloss)
                .take(limit)
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.repo.cmp(&b.repo));
    out
}

async fn ttl(store: &Store, lease: i64) -> i64 {
    store
        .request(|mut c| async move { c.lease_time_to_live(lease, None).await })
        .await
        .map(|r| r.ttl())
        .unwrap_or(-1)
}

/// etcd's members, the leader marked.
pub async fn members(store: &Store) -> refvote_cluster::Result<Vec<Member>> {
    let (list, leader) = store
        .request(|mut c| async move {
            let list = c.member_list().await?;
            let status = c.status().await?;
            Ok((list, status.leader()))
        })
        .await?;
    Ok(list
        .members()
        .iter()
        .map(|m| Member {
            name: m.name().to_owned(),
            client_urls: m.client_urls().to_vec(),
            leader: m.id() == leader,
        })
        .collect())
}

/// The nodes and the routers holding their leases.
pub async fn holders(store: &Store) -> refvote_cluster::Result<(Vec<Holder>, Vec<Holder>)> {
    let keys = store.keys();
    let (node_entries, _) = store.get_prefix(&keys.nodes()).await?;
    let mut nodes = Vec::new();
    for e in &node_entries {
        let r: NodeRecord = e.decode()?;
        nodes.push(Holder {
            name: r.name,
            address: r.address,
            lease: format!("{:x}", e.lease),
            ttl_secs: ttl(store, e.lease).await,
        });
    }
    let routers_prefix = format!("{}routers/", keys.prefix());
    let (router_entries, _) = store.get_prefix(&routers_prefix).await?;
    let mut routers = Vec::new();
    for e in &router_entries {
        routers.push(Holder {
            name: e.key.trim_start_matches(&routers_prefix).to_owned(),
            address: String::from_utf8_lossy(&e.value).into_owned(),
            lease: format!("{:x}", e.lease),
            ttl_secs: ttl(store, e.lease).await,
        });
    }
    Ok((nodes, routers))
}

/// How many transactions are open (a count-only range read of their index).
pub async fn open_transactions(store: &Store) -> refvote_cluster::Result<i64> {
    let prefix = store.keys().txrepo_all();
    let resp = store
        .request(|mut c| {
            let prefix = prefix.clone();
            async move {
                c.get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
            }
        })
        .await?;
    Ok(resp.count())
}

pub async fn overview(store: &Store, reads: &Reads) -> refvote_cluster::Result<Overview> {
    let etcd_members = members(store).await?;
    let (nodes, routers) = holders(store).await?;
    let jobs = store.repair_jobs().await?;
    let open = open_transactions(store).await?;
    let (repositories, by_state, degraded, view_current) =
        census(reads).unwrap_or((0, ByState::default(), Vec::new(), false));
    Ok(Overview {
        etcd_members,
        nodes,
        routers,
        repositories,
        degraded,
        repair_jobs: jobs.len(),
        by_state,
        open_transactions: open,
        repair_queue: jobs.iter().take(JOBS_LISTED).map(Job::from).collect(),
        view_current,
        verifiers: store.verifier_statuses().await?,
    })
}

/// One replica on a node's page.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReplica {
    pub repo: String,
    pub state: String,
    pub generation: u64,
    pub up_to_date: bool,
    pub reason: String,
}

/// A node's page.
#[derive(Debug, Clone, Serialize)]
pub struct NodeDetail {
    pub name: String,
    /// Holds its etcd lease.
    pub live: bool,
    pub address: String,
    pub storages: Vec<String>,
    pub version: String,
    pub lease: String,
    pub ttl_secs: i64,
    /// Replicas recorded on the node (all of them).
    pub replicas_total: usize,
    pub up_to_date: usize,
    /// The first [`NODE_REPLICAS_LISTED`], by repository.
    pub replicas: Vec<NodeReplica>,
    pub repair_jobs: Vec<Job>,
}

/// `node`'s page; `None` when etcd knows neither a registration nor a replica of it.
pub async fn node(
    store: &Store,
    reads: &Reads,
    node: &str,
) -> refvote_cluster::Result<Option<NodeDetail>> {
    let entry = store.get(&store.keys().node(node)).await?;
    let record: Option<NodeRecord> = entry.as_ref().map(Entry::decode).transpose()?;
    let (total, up, mut replicas) = reads
        .inspect(|w| {
            let (mut total, mut up, mut list) = (0, 0, Vec::new());
            for (segment, by_node) in w.replicas {
                let Some(e) = by_node.get(node) else {
                    continue;
                };
                let (Ok(r), Some(Ok(repo))) = (
                    e.decode::<ReplicaRecord>(),
                    w.repos.get(segment).map(Entry::decode::<RepoRecord>),
                ) else {
                    continue;
                };
                total += 1;
                let current = r.is_up_to_date(&repo);
                up += usize::from(current);
                if list.len() < NODE_REPLICAS_LISTED {
                    list.push(NodeReplica {
                        repo: repo.repo.to_string(),
                        state: refvote_cluster::summary::state_name(r.state).into(),
                        generation: r.generation,
                        up_to_date: current,
                        reason: r.reason,
                    });
                }
            }
            (total, up, list)
        })
        .unwrap_or((0, 0, Vec::new()));
    if record.is_none() && total == 0 {
        return Ok(None);
    }
    replicas.sort_by(|a, b| a.repo.cmp(&b.repo));
    let lease = entry.as_ref().map_or(0, |e| e.lease);
    let jobs = store.repair_jobs().await?;
    Ok(Some(NodeDetail {
        name: node.to_owned(),
        live: record.is_some(),
        address: record
            .as_ref()
            .map(|r| r.address.clone())
            .unwrap_or_default(),
        storages: record
            .as_ref()
            .map(|r| r.storages.clone())
            .unwrap_or_default(),
        version: record
            .as_ref()
            .map(|r| r.version.clone())
            .unwrap_or_default(),
        lease: if lease == 0 {
            String::new()
        } else {
            format!("{lease:x}")
        },
        ttl_secs: if lease == 0 {
            -1
        } else {
            ttl(store, lease).await
        },
        replicas_total: total,
        up_to_date: up,
        replicas,
        repair_jobs: jobs
            .iter()
            .filter(|j| j.job.node == node)
            .take(JOBS_LISTED)
            .map(Job::from)
            .collect(),
    }))
}

/// The repair jobs of one repository.
pub async fn jobs_of(store: &Store, repo: &RepoId) -> refvote_cluster::Result<Vec<Job>> {
    Ok(store
        .repair_jobs()
        .await?
        .iter()
        .filter(|j| &j.job.repo == repo)
        .map(Job::from)
        .collect())
}

/// The repairs page.
#[derive(Debug, Clone, Serialize)]
pub struct Repairs {
    pub repair_jobs: usize,
    /// The first [`JOBS_LISTED`].
    pub jobs: Vec<Job>,
    /// Repositories without an up-to-date replica on a live node (the first
    /// [`JOBS_LISTED`]); the same records as `votingctl dataloss --json`.
    pub dataloss: Vec<RepoSummary>,
}

pub async fn repairs(store: &Store, reads: &Reads) -> refvote_cluster::Result<Repairs> {
    let jobs = store.repair_jobs().await?;
    Ok(Repairs {
        repair_jobs: jobs.len(),
        jobs: jobs.iter().take(JOBS_LISTED).map(Job::from).collect(),
        dataloss: dataloss(reads, JOBS_LISTED),
    })
}

/// One page of a search by path prefix.
#[derive(Debug, Clone, Serialize)]
pub struct Search {
    pub storage: String,
    pub prefix: String,
    pub repositories: Vec<RepoSummary>,
    /// Pass as `after` for the next page; empty on the last one.
    pub next: String,
}

/// The first key after every key starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Where a page of repositories of `storage` whose relative path starts with
/// `prefix` begins (after the repository `after`, if given) and ends, as etcd keys.
pub fn search_range(
    repos_prefix: &str,
    storage: &str,
    prefix: &str,
    after: Option<&RepoId>,
) -> (Vec<u8>, Vec<u8>) {
    // The key segment percent-encodes the path's '%' and '/' character by character,
    // so a path prefix is a prefix of the encoded key too.
    let encoded = prefix.replace('%', "%25").replace('/', "%2F");
    let base = format!("{repos_prefix}{storage}/{encoded}");
    let end = prefix_end(&base);
    let start = match after {
        Some(r) => {
            let mut k = format!("{repos_prefix}{}", r.key_segment()).into_bytes();
            k.push(0);
            k.max(base.into_bytes())
        }
        None => base.into_bytes(),
    };
    (start, end)
}

/// One page of repositories by path prefix: one range read of at most
/// [`SEARCH_PAGE`] + 1 keys, whatever the number registered.
pub async fn search(
    store: &Store,
    reads: &Reads,
    storage: &str,
    prefix: &str,
    after: Option<&RepoId>,
) -> refvote_cluster::Result<Search> {
    let repos_prefix = store.keys().repos();
    let (start, end) = search_range(&repos_prefix, storage, prefix, after);
    let resp = store
        .request(|mut c| {
            let (start, end) = (start.clone(), end.clone());
            async move {
                c.get(
                    start,
                    Some(
                        GetOptions::new()
                            .with_range(end)
                            .with_limit(SEARCH_PAGE as i64 + 1)
                            .with_keys_only(),
                    ),
                )
                .await
            }
        })
        .await?;
    let found: Vec<RepoId> = entries(&resp)
        .iter()
        .filter_map(|e| e.key.strip_prefix(&repos_prefix))
        .filter_map(|segment| RepoId::from_key_segment(segment).ok())
        .collect();
    let more = found.len() > SEARCH_PAGE;
    let page = &found[..found.len().min(SEARCH_PAGE)];
    Ok(Search {
        storage: storage.to_owned(),
        prefix: prefix.to_owned(),
        repositories: summaries(reads, page),
        next: match (more, page.last()) {
            (true, Some(last)) => last.to_string(),
            _ => String::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_ranges_cover_exactly_the_prefix() {
        let (start, end) = search_range("/r/repos/", "default", "group/a", None);
        assert_eq!(start, b"/r/repos/default/group%2Fa".to_vec());
        assert_eq!(end, b"/r/repos/default/group%2Fb".to_vec());
        let after = RepoId::new("default", "group/a1.git").unwrap();
        let (start, _) = search_range("/r/repos/", "default", "group/a", Some(&after));
        assert_eq!(start, b"/r/repos/default/group%2Fa1.git\0".to_vec());
        // A cursor before the prefix does not widen the range.
        let before = RepoId::new("default", "aaa.git").unwrap();
        let (start, _) = search_range("/r/repos/", "default", "group/", Some(&before));
        assert_eq!(start, b"/r/repos/default/group%2F".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn states_are_counted_per_reason() {
        let mut s = ByState::default();
        let summary = |available, outdated, repairing, dataloss| RepoSummary {
            repo: "default/a.git".into(),
            generation: 1,
            replication_factor: 3,
            threshold: 2,
            up_to_date: available,
            available,
            outdated,
            repairing,
            dataloss,
            replicas: (0..3)
                .map(|i| refvote_cluster::summary::ReplicaSummary {
                    node: format!("n{i}"),
                    state: "up_to_date".into(),
                    generation: 1,
                    up_to_date: true,
                    live: true,
                    reason: String::new(),
                })
                .collect(),
        };
        s.add(&summary(3, 0, 0, false));
        s.add(&summary(2, 1, 0, false));
        s.add(&summary(1, 1, 1, false));
        s.add(&summary(0, 3, 0, true));
        assert_eq!(
            s,
            ByState {
                up_to_date: 1,
                degraded: 3,
                outdated: 3,
                repairing: 1,
                dataloss: 1
            }
        );
    }
}
