//! The router-answered calls' decisions, apart from I/O: what etcd and the nodes said
//! in, the answer out.

use std::collections::{BTreeMap, BTreeSet};

use refvote_cluster::Store;
use refvote_cluster::quorum::threshold;
use refvote_cluster::records::{NodeRecord, ReplicaRecord, RepoRecord};
use refvote_cluster::store::{by_tail, get_prefix_op, ranges};
use refvote_proto::gitaly::readiness_check_response::failure::Response as FailedCheck;
use refvote_proto::gitaly::{
    DiskStatisticsResponse, ServerInfoResponse, disk_statistics_response, server_info_response,
};
use sha1::{Digest, Sha1};
use tonic::Status;

/// The readiness checks, named as an operator reads them (Praefect's are
/// "database read/write", "gitaly node connectivity & disk access", "unavailable
/// repositories").
pub const CHECK_ETCD: &str = "etcd read/write";
pub const CHECK_NODES: &str = "storage node connectivity & disk access";
pub const CHECK_REPOSITORIES: &str = "unavailable repositories";

/// Praefect's namespace for a virtual storage's file-system id.
const FILESYSTEM_ID_NAMESPACE: [u8; 16] = [
    0x1e, 0xf1, 0xa8, 0xc6, 0xcf, 0x52, 0x4d, 0x0a, 0x92, 0xa6, 0xca, 0x64, 0x3e, 0x8b, 0xc7, 0xc5,
];

/// A virtual storage's file-system id: a UUIDv5 of its name in Praefect's namespace, so
/// it is the same through every router (and the same Praefect reports).
pub fn filesystem_id(virtual_storage: &str) -> String {
    let mut h = Sha1::new();
    h.update(FILESYSTEM_ID_NAMESPACE);
    h.update(virtual_storage.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub result: Result<(), String>,
}

impl Check {
    pub fn new(name: &'static str, result: Result<(), String>) -> Check {
        Check { name, result }
    }
}

/// The failed checks, by name, as Praefect sorts them.
pub fn failed_checks(checks: Vec<Check>) -> Vec<FailedCheck> {
    let mut failed: Vec<FailedCheck> = checks
        .into_iter()
        .filter_map(|c| {
            c.result.err().map(|why| FailedCheck {
                name: c.name.to_owned(),
                error_message: why,
            })
        })
        .collect();
    failed.sort_by(|a, b| a.name.cmp(&b.name));
    failed
}

/// What a live node said when probed.
#[derive(Debug, Clone)]
pub enum NodeAnswer {
    Unreachable(String),
    Info(ServerInfoResponse),
}

/// A repository and its replica records.
#[derive(Debug, Clone)]
pub struct RepoState {
    pub record: RepoRecord,
    pub replicas: BTreeMap<String, ReplicaRecord>,
}

/// The cluster as etcd has it, read at one revision.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Nodes holding their lease.
    pub live: BTreeMap<String, NodeRecord>,
    pub repos: Vec<RepoState>,
}

impl Cluster {
    /// Nodes, repositories and replicas in one etcd transaction.
    pub async fn read(store: &Store) -> refvote_cluster::Result<Cluster> {
        let keys = store.keys();
        let replicas_prefix = format!("{}replicas/", keys.prefix());
        let txn = etcd_client::Txn::new().and_then([
            get_prefix_op(&keys.nodes()),
            get_prefix_op(&keys.repos()),
            get_prefix_op(&replicas_prefix),
        ]);
        let resp = store.txn(txn).await?;
        let r = ranges(&resp);
        let live = decode_nodes(&by_tail(&r[0], &keys.nodes()));
        let mut replicas: BTreeMap<String, BTreeMap<String, ReplicaRecord>> = BTreeMap::new();
        for e in &r[2] {
            let record: ReplicaRecord = e.decode()?;
            if let Some((segment, _)) = e
                .key
                .strip_prefix(&replicas_prefix)
                .and_then(|t| t.rsplit_once('/'))
            {
                replicas
                    .entry(segment.to_owned())
                    .or_default()
                    .insert(record.node.clone(), record);
            }
        }
        let mut repos = Vec::new();
        for e in &r[1] {
            let record: RepoRecord = e.decode()?;
            let replicas = replicas
                .remove(&record.repo.key_segment())
                .unwrap_or_default();
            repos.push(RepoState { record, replicas });
        }
        Ok(Cluster { live, repos })
    }

    /// Only the nodes holding their lease.
    pub async fn live_nodes(
        store: &Store,
    ) -> refvote_cluster::Result<BTreeMap<String, NodeRecord>> {
        let (entries, _) = store.get_prefix(&store.keys().nodes()).await?;
        Ok(decode_nodes(&by_tail(&entries, &store.keys().nodes())))
    }

    /// Every node the cluster counts on: those holding a lease and those a repository
    /// is assigned to (a node that lost its lease still holds its replicas).
    pub fn known_nodes(&self) -> BTreeSet<String> {
        self.live
            .keys()
            .cloned()
            .chain(
                self.repos
                    .iter()
                    .flat_map(|r| r.record.assigned.iter().cloned()),
            )
            .collect()
    }

    /// The connectivity check: every known node holds its lease, answers, and can read
    /// and write the storage it keeps replicas in.
    pub fn connectivity(&self, probes: &BTreeMap<String, NodeAnswer>) -> Result<(), String> {
        let mut problems = Vec::new();
        for node in self.known_nodes() {
            let Some(record) = self.live.get(&node) else {
                problems.push(format!(
                    "{node}: holds no lease (down, or cut off from etcd)"
                ));
                continue;
            };
            match probes.get(&node) {
                None => problems.push(format!("{node}: not probed")),
                Some(NodeAnswer::Unreachable(why)) => {
                    problems.push(format!("{node}: unreachable at {}: {why}", record.address))
                }
                Some(NodeAnswer::Info(info)) => {
                    let storage = record.storages.first().map(String::as_str).unwrap_or("");
                    match info
                        .storage_statuses
                        .iter()
                        .find(|s| s.storage_name == storage)
                    {
                        None => problems
                            .push(format!("{node}: does not report its storage {storage:?}")),
                        Some(s) if !(s.readable && s.writeable) => problems.push(format!(
                            "{node}: storage {storage:?} is not {}",
                            match (s.readable, s.writeable) {
                                (false, false) => "readable or writeable",
                                (false, true) => "readable",
                                _ => "writeable",
                            }
                        )),
                        Some(_) => {}
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// The availability check: every repository has an up-to-date replica on a live
    /// node (else it cannot be read) and a majority of them (else it cannot be written).
    pub fn availability(&self) -> Result<(), String> {
        let mut unreadable: BTreeMap<&str, usize> = BTreeMap::new();
        let mut unwritable: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &self.repos {
            let up = r
                .record
                .assigned
                .iter()
                .filter(|n| {
                    self.live.contains_key(*n)
                        && r.replicas
                            .get(*n)
                            .is_some_and(|rep| rep.is_up_to_date(&r.record))
                })
                .count();
            let storage = r.record.repo.virtual_storage.as_str();
            if up == 0 {
                *unreadable.entry(storage).or_default() += 1;
            } else if up < r.record.threshold() {
                *unwritable.entry(storage).or_default() += 1;
            }
        }
        let mut problems = Vec::new();
        for (storage, n) in unreadable {
            problems.push(format!(
                "virtual storage {storage:?} has {n} {} that cannot be read: no up-to-date replica on a live node",
                plural(n)
            ));
        }
        for (storage, n) in unwritable {
            problems.push(format!(
                "virtual storage {storage:?} has {n} {} that cannot be written: fewer up-to-date replicas on live nodes than a majority",
                plural(n)
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "repository" } else { "repositories" }
}

fn decode_nodes(
    entries: &BTreeMap<String, refvote_cluster::store::Entry>,
) -> BTreeMap<String, NodeRecord> {
    entries
        .iter()
        .filter_map(|(name, e)| match e.decode::<NodeRecord>() {
            Ok(r) => Some((name.clone(), r)),
            Err(err) => {
                tracing::warn!(node = name, error = %err, "unreadable node record ignored");
                None
            }
        })
        .collect()
}

/// The storage status a node reports for the storage it keeps replicas in.
fn own_storage<'a>(
    record: &NodeRecord,
    info: &'a ServerInfoResponse,
) -> Option<&'a server_info_response::StorageStatus> {
    let storage = record.storages.first()?;
    info.storage_statuses
        .iter()
        .find(|s| &s.storage_name == storage)
}

/// ServerInfo of the cluster: versions from the first node that answered (by name),
/// and per virtual storage: readable while any node can read, writeable while enough
/// nodes for a write quorum can write; omitted when no node answered (as Praefect
/// omits a storage whose node failed).
pub fn server_info(
    live: &BTreeMap<String, NodeRecord>,
    infos: &BTreeMap<String, Result<ServerInfoResponse, String>>,
    virtual_storages: &[String],
    replication_factor: usize,
) -> ServerInfoResponse {
    let answered: Vec<(&NodeRecord, &ServerInfoResponse)> = infos
        .iter()
        .filter_map(|(name, r)| Some((live.get(name)?, r.as_ref().ok()?)))
        .collect();
    let Some((_, first)) = answered.first() else {
        return ServerInfoResponse::default();
    };
    let own: Vec<&server_info_response::StorageStatus> = answered
        .iter()
        .filter_map(|(record, info)| own_storage(record, info))
        .collect();
    let readable = own.iter().any(|s| s.readable);
    let writers = own.iter().filter(|s| s.readable && s.writeable).count();
    let fs_type = own.first().map(|s| s.fs_type.clone()).unwrap_or_default();
    let storage_statuses = if own.is_empty() {
        Vec::new()
    } else {
        virtual_storages
            .iter()
            .map(|vs| server_info_response::StorageStatus {
                storage_name: vs.clone(),
                readable,
                writeable: writers >= threshold(replication_factor),
                fs_type: fs_type.clone(),
                filesystem_id: filesystem_id(vs),
                replication_factor: replication_factor as u32,
            })
            .collect()
    };
    ServerInfoResponse {
        server_version: first.server_version.clone(),
        git_version: first.git_version.clone(),
        storage_statuses,
    }
}

/// DiskStatistics per virtual storage: the least space available and the most used
/// on any node that answered; 0 and 0 ("cannot be told", as Gitaly answers) when none
/// did.
pub fn disk_statistics(
    live: &BTreeMap<String, NodeRecord>,
    stats: &BTreeMap<String, Result<DiskStatisticsResponse, String>>,
    virtual_storages: &[String],
) -> DiskStatisticsResponse {
    let own: Vec<&disk_statistics_response::StorageStatus> = stats
        .iter()
        .filter_map(|(name, r)| {
            let storage = live.get(name)?.storages.first()?;
            r.as_ref()
                .ok()?
                .storage_statuses
                .iter()
                .find(|s| &s.storage_name == storage)
        })
        // A node that could not tell (0 and 0) says nothing about the space.
        .filter(|s| s.available != 0 || s.used != 0)
        .collect();
    let available = own.iter().map(|s| s.available).min().unwrap_or(0);
    let used = own.iter().map(|s| s.used).max().unwrap_or(0);
    DiskStatisticsResponse {
        storage_statuses: virtual_storages
            .iter()
            .map(|vs| disk_statistics_response::StorageStatus {
                storage_name: vs.clone(),
                available,
                used,
            })
            .collect(),
    }
}

/// The one signing key every live node has (empty: none signs), as Praefect insists.
pub fn one_signature(keys: &BTreeMap<String, Result<Vec<u8>, String>>) -> Result<Vec<u8>, Status> {
    let mut seen: Option<(&str, &Vec<u8>)> = None;
    for (node, r) in keys {
        let key = r.as_ref().map_err(|why| {
            Status::unavailable(format!("request signature from storage node {node}: {why}"))
        })?;
        match seen {
            None => seen = Some((node, key)),
            Some((_, k)) if k == key => {}
            Some((first, _)) => {
                return Err(Status::internal(format!(
                    "signature mismatch: storage node {node} signs with another key than {first}"
                )));
            }
        }
    }
    Ok(seen.map(|(_, k)| k.clone()).unwrap_or_default())
}

/// RepositoryReplicas' order: the first up-to-date replica on a live node that gave a
/// checksum stands in for Praefect's primary; every other assigned replica follows in
/// placement order. `None` when no such replica answered.
pub fn primary_first(
    up_to_date_live: &[String],
    assigned: &[String],
    sums: &BTreeMap<String, Result<String, String>>,
) -> Option<(String, Vec<String>)> {
    let primary = up_to_date_live
        .iter()
        .find(|n| matches!(sums.get(*n), Some(Ok(_))))?
        .clone();
    let others = assigned
        .iter()
        .filter(|n| **n != primary)
        .cloned()
        .collect();
    Some((primary, others))
}

#[cfg(test)]
mod tests {
    use super::*;
    use refvote_cluster::RepoId;
    use refvote_cluster::records::ReplicaState;

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            address: format!("tcp://{name}:1"),
            storages: vec!["default".into()],
            version: "0".into(),
            gitlab_api: false,
            custom_hooks: false,
            draining: false,
        }
    }

    fn info(readable: bool, writeable: bool) -> ServerInfoResponse {
        ServerInfoResponse {
            server_version: "refvote-votingd 1".into(),
            git_version: "2.47.3".into(),
            storage_statuses: vec![server_info_response::StorageStatus {
                storage_name: "default".into(),
                readable,
                writeable,
                fs_type: "ext4".into(),
                filesystem_id: "node-local".into(),
                replication_factor: 0,
            }],
        }
    }

    fn repo(name: &str, assigned: &[&str], up_to_date: &[&str]) -> RepoState {
        let record = RepoRecord {
            repo: RepoId::new("default", name).unwrap(),
            assigned: assigned.iter().map(|s| s.to_string()).collect(),
            replication_factor: assigned.len() as u32,
            generation: 4,
            creation_checksum: String::new(),
        };
        let replicas = assigned
            .iter()
            .map(|n| {
                let up = up_to_date.contains(n);
                (
                    n.to_string(),
                    ReplicaRecord {
                        node: n.to_string(),
                        generation: if up { 4 } else { 3 },
                        state: if up {
                            ReplicaState::UpToDate
                        } else {
                            ReplicaState::Outdated
                        },
                        repair_epoch: 0,
                        checksum: String::new(),
                        reason: String::new(),
                    },
                )
            })
            .collect();
        RepoState { record, replicas }
    }

    #[test]
    fn the_filesystem_id_is_praefects_uuid_of_the_name() {
        // Python: uuid.uuid5(uuid.UUID("1ef1a8c6-cf52-4d0a-92a6-ca643e8bc7c5"), "default")
        assert_eq!(
            filesystem_id("default"),
            "d9f04423-6b13-5949-9ffa-c06279e0796e"
        );
        assert_ne!(filesystem_id("default"), filesystem_id("other"));
    }

    #[test]
    fn a_down_node_fails_connectivity_and_its_repositories_show() {
        let live: BTreeMap<_, _> = ["node1", "node2"].map(|n| (n.to_string(), node(n))).into();
        let c = Cluster {
            live: live.clone(),
            repos: vec![
                repo(
                    "a.git",
                    &["node1", "node2", "node3"],
                    &["node1", "node2", "node3"],
                ),
                repo("b.git", &["node1", "node3"], &["node3"]),
                repo("c.git", &["node3"], &["node3"]),
            ],
        };
        let probes = BTreeMap::from([
            ("node1".to_string(), NodeAnswer::Info(info(true, true))),
            ("node2".to_string(), NodeAnswer::Info(info(true, false))),
        ]);
        let e = c.connectivity(&probes).unwrap_err();
        assert!(e.contains("node3: holds no lease"), "{e}");
        assert!(
            e.contains("node2: storage \"default\" is not writeable"),
            "{e}"
        );
        assert!(!e.contains("node1"), "{e}");
        let e = c.availability().unwrap_err();
        // b.git: its only up-to-date replica is on the down node; so is c.git's.
        assert!(e.contains("has 2 repositories that cannot be read"), "{e}");
        assert!(!e.contains("cannot be written"), "{e}");
        let healthy = Cluster {
            live,
            repos: vec![repo("a.git", &["node1", "node2"], &["node1", "node2"])],
        };
        let both = BTreeMap::from([
            ("node1".to_string(), NodeAnswer::Info(info(true, true))),
            ("node2".to_string(), NodeAnswer::Info(info(true, true))),
        ]);
        assert_eq!(healthy.connectivity(&both), Ok(()));
        assert_eq!(healthy.availability(), Ok(()));
        let one_up = Cluster {
            live: BTreeMap::from([("node1".to_string(), node("node1"))]),
            repos: vec![repo(
                "a.git",
                &["node1", "node2", "node3"],
                &["node1", "node2"],
            )],
        };
        let e = one_up.availability().unwrap_err();
        assert!(e.contains("1 repository that cannot be written"), "{e}");
    }

    #[test]
    fn failed_checks_come_sorted_by_name() {
        let failed = failed_checks(vec![
            Check::new(CHECK_REPOSITORIES, Err("r".into())),
            Check::new(CHECK_ETCD, Ok(())),
            Check::new(CHECK_NODES, Err("n".into())),
        ]);
        let names: Vec<_> = failed.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, [CHECK_NODES, CHECK_REPOSITORIES]);
        assert_eq!(failed[0].error_message, "n");
    }

    #[test]
    fn server_info_counts_writers_against_the_quorum() {
        let live: BTreeMap<_, _> = ["node1", "node2", "node3"]
            .map(|n| (n.to_string(), node(n)))
            .into();
        let vs = vec!["default".to_string()];
        let all = BTreeMap::from([
            ("node1".to_string(), Ok(info(true, true))),
            ("node2".to_string(), Ok(info(true, true))),
            ("node3".to_string(), Err("down".to_string())),
        ]);
        let r = server_info(&live, &all, &vs, 3);
        assert_eq!(r.git_version, "2.47.3");
        let s = &r.storage_statuses[0];
        assert_eq!(s.storage_name, "default");
        assert!(s.readable && s.writeable);
        assert_eq!(s.replication_factor, 3);
        assert_eq!(s.filesystem_id, filesystem_id("default"));
        let one = BTreeMap::from([
            ("node1".to_string(), Ok(info(true, true))),
            ("node2".to_string(), Err("down".to_string())),
        ]);
        let s = &server_info(&live, &one, &vs, 3).storage_statuses[0];
        assert!(s.readable && !s.writeable);
        let none = BTreeMap::from([("node1".to_string(), Err("down".to_string()))]);
        assert!(
            server_info(&live, &none, &vs, 3)
                .storage_statuses
                .is_empty()
        );
    }

    #[test]
    fn disk_statistics_report_the_tightest_node() {
        let live: BTreeMap<_, _> = ["node1", "node2"].map(|n| (n.to_string(), node(n))).into();
        let disk = |available, used| {
            Ok(DiskStatisticsResponse {
                storage_statuses: vec![disk_statistics_response::StorageStatus {
                    storage_name: "default".into(),
                    available,
                    used,
                }],
            })
        };
        let stats = BTreeMap::from([
            ("node1".to_string(), disk(100, 5)),
            ("node2".to_string(), disk(50, 9)),
        ]);
        let r = disk_statistics(&live, &stats, &["default".to_string()]);
        assert_eq!(r.storage_statuses.len(), 1);
        assert_eq!(
            (r.storage_statuses[0].available, r.storage_statuses[0].used),
            (50, 9)
        );
        let r = disk_statistics(&live, &BTreeMap::new(), &["default".to_string()]);
        assert_eq!(
            (r.storage_statuses[0].available, r.storage_statuses[0].used),
            (0, 0)
        );
    }

    #[test]
    fn one_signature_or_an_error() {
        let same = BTreeMap::from([
            ("a".to_string(), Ok(b"k".to_vec())),
            ("b".to_string(), Ok(b"k".to_vec())),
        ]);
        assert_eq!(one_signature(&same).unwrap(), b"k");
        assert_eq!(one_signature(&BTreeMap::new()).unwrap(), b"");
        let differ = BTreeMap::from([
            ("a".to_string(), Ok(b"k".to_vec())),
            ("b".to_string(), Ok(b"j".to_vec())),
        ]);
        assert_eq!(
            one_signature(&differ).unwrap_err().code(),
            tonic::Code::Internal
        );
        let down = BTreeMap::from([("a".to_string(), Err("gone".to_string()))]);
        assert_eq!(
            one_signature(&down).unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }

    #[test]
    fn the_primary_is_an_up_to_date_replica_that_answered() {
        let assigned = ["n1", "n2", "n3"].map(String::from);
        let sums = BTreeMap::from([
            ("n1".to_string(), Err("down".to_string())),
            ("n2".to_string(), Ok("abc".to_string())),
            ("n3".to_string(), Ok("abc".to_string())),
        ]);
        let up = ["n1", "n2"].map(String::from);
        let (p, rest) = primary_first(&up, &assigned, &sums).unwrap();
        assert_eq!(p, "n2");
        assert_eq!(rest, ["n1", "n3"]);
        assert!(primary_first(&["n1".to_string()], &assigned, &sums).is_none());
    }
}
