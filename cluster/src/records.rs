//! The values stored in etcd, as JSON. Field names are part of the on-disk format:
//! add fields with `#[serde(default)]`, never rename one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::repo::RepoId;

/// `nodes/<node>`: a storage node that holds its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// Address of the node's gRPC service (empty until it serves one).
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub storages: Vec<String>,
    #[serde(default)]
    pub version: String,
    /// The node calls GitLab's internal API when it runs GitLab's checks (its
    /// `[gitlab] url` is set). A transaction gated by GitLab's checks needs every voter
    /// to agree on it, or the check would depend on which voter is designated.
    #[serde(default)]
    pub gitlab_api: bool,
    /// The node runs custom hooks from a global directory (`[hooks] custom_hooks_dir`)
    /// for a GitLab user's write, with or without the internal API (as Gitaly does).
    /// Such a write is gated as with the API, and every voter must agree on it too.
    #[serde(default)]
    pub custom_hooks: bool,
    /// The node is shutting down (SIGTERM): it finishes the calls it has, but new
    /// transactions leave it out of their voters and reads go elsewhere. Its lease (so
    /// this record) stays until those calls are done.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// `repos/<repo>`. Its threshold ([`RepoRecord::threshold`]) is a quorum rule and
/// lives with the others in [`crate::quorum`], which builds on these records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoRecord {
    pub repo: RepoId,
    /// The nodes that hold a replica, in placement order.
    pub assigned: Vec<String>,
    pub replication_factor: u32,
    /// Advances with every transaction that committed a ref update.
    pub generation: u64,
    /// Checksum of the repository when it was created.
    #[serde(default)]
    pub creation_checksum: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    UpToDate,
    Outdated,
    Repairing,
}

/// `replicas/<repo>/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub node: String,
    pub generation: u64,
    pub state: ReplicaState,
    #[serde(default)]
    pub repair_epoch: u64,
    /// Checksum recorded at `generation`, if known.
    #[serde(default)]
    pub checksum: String,
    /// Why the replica is not up to date, for operators.
    #[serde(default)]
    pub reason: String,
}

impl ReplicaRecord {
    /// Up to date exactly when the record says so and it is at the repository's generation.
    pub fn is_up_to_date(&self, repo: &RepoRecord) -> bool {
        self.state == ReplicaState::UpToDate && self.generation == repo.generation
    }

    /// The record marked outdated for `reason` if it was up to date; otherwise as it is
    /// (an outdated or repairing replica keeps its state and why). Its generation stays:
    /// it still holds what it held.
    pub fn outdated(&self, reason: &str) -> ReplicaRecord {
        let mut rep = self.clone();
        if rep.state == ReplicaState::UpToDate {
            rep.state = ReplicaState::Outdated;
            rep.reason = reason.to_owned();
        }
        rep
    }
}

/// `tx/<id>/record`: written once at creation, never changed; deleted at finalize.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxRecord {
    pub id: String,
    pub repo: RepoId,
    pub voters: Vec<String>,
    /// Majority of the assigned replicas (not of the voters).
    pub threshold: usize,
    pub assigned: usize,
    pub base_generation: u64,
    /// Who created it (a router id, or a test).
    pub creator: String,
    /// Each voter's node lease when the transaction was created: a voter whose node
    /// no longer holds that lease has failed.
    pub voter_leases: BTreeMap<String, i64>,
    /// Create revision of the repository record the transaction began on: finalize
    /// changes nothing in a repository removed (and perhaps re-created) meanwhile.
    #[serde(default)]
    pub repo_create_revision: i64,
    /// The voter that runs GitLab's checks (DESIGN.md §8), when the call carries a
    /// GitLab user: no key of the transaction commits without its allow verdict
    /// (`tx/<id>/verdict`). `None`: the transaction is not gated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub designated: Option<String>,
}

/// `postreceive-pending/<id>`: GitLab's post-receive of this acknowledged gated
/// transaction is owed. Written in the txn that ends the transaction, deleted by the
/// node that ran it (or by whoever learns nobody can); no lease, so it outlives a
/// router that died before asking (DESIGN-CHANGES-12.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPostReceive {
    pub id: String,
    pub repo: RepoId,
    /// The transaction's designated voter, asked first when promoted.
    pub designated: Option<String>,
    /// The voters in record order (the order the others are asked in).
    pub voters: Vec<String>,
    /// Who was promoted: only they hold the update to post-receive.
    pub promoted: Vec<String>,
    /// Who ended the transaction (a router, or the reaper).
    pub finalized_by: String,
    /// What running it needs when no promoted voter remembers the call (they all
    /// restarted): one promoted voter's [`DoneRecord::post_receive`], copied in the
    /// txn that writes this marker. The node's format, opaque to this crate; null when
    /// no promoted voter carried one.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub post_receive: serde_json::Value,
}

impl PendingPostReceive {
    /// The marker for `record` ended with `outcome` by `by`.
    pub fn of(record: &TxRecord, outcome: &TxOutcome, by: &str) -> PendingPostReceive {
        PendingPostReceive {
            id: record.id.clone(),
            repo: record.repo.clone(),
            designated: record.designated.clone(),
            voters: record.voters.clone(),
            promoted: outcome.promoted.clone(),
            finalized_by: by.to_owned(),
            post_receive: serde_json::Value::Null,
        }
    }

    /// The marker with the post-receive data of its first promoted voter (designated
    /// first, then in record order) whose `done` carried any.
    pub fn carrying(mut self, done: &BTreeMap<String, DoneRecord>) -> PendingPostReceive {
        let promoted = |v: &&String| self.promoted.contains(v);
        let found = self
            .designated
            .iter()
            .filter(promoted)
            .chain(self.voters.iter().filter(promoted))
            .filter_map(|v| done.get(v))
            .find(|d| d.ok && d.reported_by.is_empty() && !d.post_receive.is_null())
            .map(|d| d.post_receive.clone());
        if let Some(found) = found {
            self.post_receive = found;
        }
        self
    }

    /// Whether ending `record` with `outcome` owes GitLab's post-receive: a gated
    /// write, committed, acknowledged.
    pub fn owed(record: &TxRecord, outcome: &TxOutcome) -> bool {
        record.designated.is_some() && outcome.committed && outcome.acknowledged
    }
}

/// `tx/<id>/votes/<key>/<voter>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteRecord {
    /// Hex SHA-256 of the hook's stdin.
    pub hash: String,
    #[serde(default)]
    pub ref_count: u32,
    #[serde(default)]
    pub first_ref: String,
}

/// `tx/<id>/decided/<key>`: the one decision every voter adopts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The winning hash; `None` means abort.
    pub hash: Option<String>,
    /// How many voters voted the winning hash (or the best one, on abort).
    pub agreed: usize,
    pub threshold: usize,
    pub assigned: usize,
    /// Who wrote it: a voter, or `reaper:<id>`.
    pub by: String,
    /// Why it was decided that way, for the pusher and the logs.
    pub reason: String,
}

impl Decision {
    pub fn is_commit(&self) -> bool {
        self.hash.is_some()
    }
}

/// `tx/<id>/verdict`: the outcome of GitLab's checks in a gated transaction, created
/// once, by the designated voter (allow or deny) or, when that voter can give none any
/// more, by whoever sees it first (a deny, the fence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictRecord {
    pub allow: bool,
    /// Who wrote it: the designated voter, or the voter or finalizer that fenced it.
    pub by: String,
    /// For a deny: what every replica shows the pusher.
    #[serde(default)]
    pub message: String,
    /// What the checks produced, for the replicas to replay (GitLab's refusal, the
    /// refs update hooks refused, the output shown, the changes checked): the node's
    /// format, opaque to this crate.
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// `tx/<id>/done/<voter>`: git finished on that voter (or the caller saw it fail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoneRecord {
    /// The RPC on the node succeeded.
    pub ok: bool,
    #[serde(default)]
    pub detail: String,
    /// The replica's checksum (Gitaly's `CalculateChecksum`) right after its work
    /// succeeded; empty if unknown.
    #[serde(default)]
    pub checksum: String,
    /// Empty when the voter reported itself; else who reported it failed on its behalf
    /// (a router that saw its call fail, a reaper that gave up on it). Such a voter may
    /// have applied an update it never got to confirm.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reported_by: String,
    /// What GitLab's post-receive of this gated transaction needs on this voter (the
    /// refs its git updated, the pusher's identity, the push options), for the marker
    /// `postreceive-pending/<id>` to carry past a restart of every promoted voter. The
    /// node's format, opaque to this crate, bounded by the node; null if none.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub post_receive: serde_json::Value,
}

/// `outcomes/<id>`: what finalize decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxOutcome {
    pub id: String,
    pub repo: RepoId,
    /// Some key was decided commit, so the repository's generation advanced.
    pub committed: bool,
    /// The repository's generation after the transaction.
    pub generation: u64,
    pub promoted: Vec<String>,
    pub outdated: Vec<String>,
    pub threshold: usize,
    /// The client may be told "success": at least threshold replicas were promoted (or
    /// nothing was committed and at least threshold voters finished successfully).
    pub acknowledged: bool,
    /// Finalized by the reaper after the creator's lease expired.
    pub reaped: bool,
}

/// `jobs/repair/<repo>/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub repo: RepoId,
    pub node: String,
    /// The repository generation the job was created at.
    pub generation: u64,
    pub reason: String,
    /// Failed repair attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// Why the last attempt failed, for `votingctl status`.
    #[serde(default)]
    pub last_error: String,
    /// When the last attempt ended (Unix milliseconds; 0: never tried).
    #[serde(default)]
    pub last_attempt_unix_ms: u64,
    /// Back-off: no repair worker tries again before this (Unix milliseconds).
    #[serde(default)]
    pub not_before_unix_ms: u64,
}

impl JobRecord {
    /// A job never tried yet.
    pub fn new(repo: RepoId, node: String, generation: u64, reason: String) -> JobRecord {
        JobRecord {
            repo,
            node,
            generation,
            reason,
            attempts: 0,
            last_error: String::new(),
            last_attempt_unix_ms: 0,
            not_before_unix_ms: 0,
        }
    }
}

/// `locks/<repo>`: an administrative operation holds the repository's writes. The key
/// is created under the holder's lease; its create revision is the fencing token every
/// write made under the lock compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// Who holds it (a router id).
    pub holder: String,
    /// What for (`repair`, `CreateRepositoryReplicas`, ...), shown to blocked writers.
    pub operation: String,
    /// When it was taken (Unix milliseconds).
    pub since_unix_ms: u64,
}

/// Now as Unix milliseconds (for records people read and for back-off, never for
/// decisions between processes).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
