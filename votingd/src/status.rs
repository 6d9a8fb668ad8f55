//! votingd's health as a document: served on the vote socket, printed by `votingctl
//! status` as a table or as JSON. Besides the node itself it carries a cluster section
//! read from etcd: the repair jobs, with their failed attempts and last error.

use serde::{Deserialize, Serialize};

use crate::hooks::StorageHooks;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub version: String,
    pub uptime_secs: u64,
    pub etcd: EtcdHealth,
    pub lease: LeaseHealth,
    pub socket: SocketHealth,
    pub hooks: HooksHealth,
    pub storages: Vec<StorageHealth>,
    /// Transactions this node is voting in or still has to confirm.
    pub open_transactions: Vec<String>,
    pub votes_waiting: u64,
    pub counters: CounterValues,
    /// The cluster as etcd sees it (any node can read it).
    #[serde(default)]
    pub cluster: ClusterHealth,
    /// SIGTERM received: finishing the calls in flight, taking no new ones.
    #[serde(default)]
    pub draining: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterHealth {
    /// Outdated replicas waiting for (or in) repair, across the cluster.
    pub repair_jobs: Vec<RepairJobStatus>,
    /// Every live router's background verifier (its progress and the mismatches it
    /// found).
    #[serde(default)]
    pub verifiers: Vec<refvote_cluster::verifier::VerifierStatus>,
    /// Why the section could not be read, if it could not.
    #[serde(default)]
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairJobStatus {
    pub repo: String,
    pub node: String,
    /// Why the replica needs repair.
    pub reason: String,
    /// Failed repair attempts so far.
    pub attempts: u32,
    #[serde(default)]
    pub last_error: String,
    /// Unix milliseconds of the last failed attempt (0: none).
    #[serde(default)]
    pub last_attempt_unix_ms: u64,
    /// The router repairing it right now, if any.
    #[serde(default)]
    pub repairing_by: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdHealth {
    pub endpoints: Vec<String>,
    pub reachable: bool,
    #[serde(default)]
    pub error: String,
    /// Round trip of a linearizable read, in milliseconds.
    #[serde(default)]
    pub latency_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseHealth {
    pub held: bool,
    pub id: Option<i64>,
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SocketHealth {
    pub path: String,
    pub up: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HooksHealth {
    pub dir: String,
    pub installed: bool,
    pub require_transaction: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageHealth {
    pub name: String,
    pub path: String,
    #[serde(flatten)]
    pub hooks: StorageHooks,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CounterValues {
    pub commits: u64,
    pub aborts: u64,
    pub lost_votes: u64,
    pub timeouts: u64,
    pub errors: u64,
    pub confirmations: u64,
    pub rejected_requests: u64,
}

impl Status {
    /// Healthy: etcd answers, the lease is held, the hook is installed and every
    /// repository found points at it.
    pub fn healthy(&self) -> bool {
        self.etcd.reachable
            && self.lease.held
            && self.socket.up
            && self.hooks.installed
            && self
                .storages
                .iter()
                .all(|s| s.hooks.hooked == s.hooks.repositories)
    }

    /// The table `votingctl status` prints.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let yes = |b: bool| if b { "ok" } else { "FAIL" };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "node {} (votingd {}), up {}s: {}",
            self.node,
            self.version,
            self.uptime_secs,
            if self.healthy() {
                "healthy"
            } else {
                "UNHEALTHY"
            }
        );
        let etcd = if self.etcd.reachable {
            format!("ok ({:.1} ms)", self.etcd.latency_ms)
        } else {
            format!("FAIL: {}", self.etcd.error)
        };
        let _ = writeln!(
            out,
            "  {:<22}{}  [{}]",
            "etcd",
            etcd,
            self.etcd.endpoints.join(", ")
        );
        let lease = match self.lease.id {
            Some(id) if self.lease.held => {
                format!("ok (lease {id:x}, ttl {}s)", self.lease.ttl_secs)
            }
            _ => "FAIL: no lease held; this node does not count as live".to_string(),
        };
        let _ = writeln!(out, "  {:<22}{}", "lease", lease);
        let _ = writeln!(
            out,
            "  {:<22}{}  {}",
            "vote socket",
            yes(self.socket.up),
            self.socket.path
        );
        let _ = writeln!(
            out,
            "  {:<22}{}  {} (require_transaction = {})",
            "hook",
            yes(self.hooks.installed),
            self.hooks.dir,
            self.hooks.require_transaction
        );
        for s in &self.storages {
            let ok = s.hooks.hooked == s.hooks.repositories;
            let _ = writeln!(
                out,
                "  {:<22}{}  {} repositories, {} with the hook  {}",
                format!("storage {}", s.name),
                yes(ok),
                s.hooks.repositories,
                s.hooks.hooked,
                s.path
            );
            if !s.hooks.missing.is_empty() {
                let _ = writeln!(
                    out,
                    "  {:<22}      without the hook: {} (run install/refvote-hooks.sh on the storage)",
                    "",
                    s.hooks.missing.join(", ")
                );
            }
        }
        let _ = writeln!(
            out,
            "  {:<22}{} open, {} votes waiting",
            "transactions",
            self.open_transactions.len(),
            self.votes_waiting
        );
        let jobs = &self.cluster.repair_jobs;
        let failing = jobs.iter().filter(|j| j.attempts > 0).count();
        let repair = if !self.cluster.error.is_empty() {
            format!("unknown: {}", self.cluster.error)
        } else if failing > 0 {
            format!(
                "FAILING: {} queued, {failing} failed at least once",
                jobs.len()
            )
        } else {
            format!("{} queued", jobs.len())
        };
        let _ = writeln!(out, "  {:<22}{}", "repair jobs", repair);
        for j in jobs.iter().take(20) {
            let mut line = format!("{} on {}: {}", j.repo, j.node, j.reason);
            if let Some(by) = &j.repairing_by {
                line.push_str(&format!("; being repaired by {by}"));
            }
            if j.attempts > 0 {
                line.push_str(&format!(
                    "; {} failed attempts, last at {}: {}",
                    j.attempts,
                    refvote_cluster::lock::format_unix_ms(j.last_attempt_unix_ms),
                    j.last_error
                ));
            }
            let _ = writeln!(out, "  {:<22}  {line}", "");
        }
        if jobs.len() > 20 {
            let _ = writeln!(
                out,
                "  {:<22}  ... and {} more (--json lists all)",
                "",
                jobs.len() - 20
            );
        }
        let now = refvote_cluster::records::now_unix_ms();
        if self.cluster.error.is_empty() && self.cluster.verifiers.is_empty() {
            let _ = writeln!(out, "  {:<22}none running", "verifier");
        }
        for v in &self.cluster.verifiers {
            let _ = writeln!(out, "  {:<22}{}", "verifier", v.line(now));
            for m in &v.recent_mismatches {
                let _ = writeln!(out, "  {:<22}  {m}", "");
            }
        }
        let c = &self.counters;
        let _ = writeln!(
            out,
            "  {:<22}{} commits, {} aborts, {} lost votes, {} timeouts, {} errors, {} confirmations, {} bad requests",
            "since start",
            c.commits,
            c.aborts,
            c.lost_votes,
            c.timeouts,
            c.errors,
            c.confirmations,
            c.rejected_requests
        );
        out
    }
}
