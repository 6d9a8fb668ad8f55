//! The cluster part of `votingctl status`, read by votingctl itself from etcd: the
//! etcd members, the nodes and routers with their leases, the repositories
//! with a replica outdated or down, and the repair jobs.

use refvote_cluster::records::NodeRecord;
pub use refvote_cluster::summary::{Holder, Member};
use serde::Serialize;

use crate::connect::{Ctl, etcd_error};
use crate::repos::{RepoSummary, snapshot};

#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    pub etcd_members: Vec<Member>,
    pub nodes: Vec<Holder>,
    pub routers: Vec<Holder>,
    pub repositories: usize,
    /// Repositories with a replica that is not up to date or is on a node that is down.
    pub degraded: Vec<RepoSummary>,
    pub repair_jobs: usize,
    /// Every live router's background verifier: its shards, pass, progress, last full
    /// pass and the mismatches it found.
    pub verifiers: Vec<refvote_cluster::verifier::VerifierStatus>,
}

async fn ttl(ctl: &Ctl, lease: i64) -> i64 {
    ctl.store
        .request(|mut c| async move { c.lease_time_to_live(lease, None).await })
        .await
        .map(|r| r.ttl())
        .unwrap_or(-1)
}

pub async fn read(ctl: &Ctl) -> anyhow::Result<ClusterView> {
    let members = ctl
        .store
        .request(|mut c| async move {
            let list = c.member_list().await?;
            let status = c.status().await?;
            Ok((list, status.leader()))
        })
        .await
        .map_err(etcd_error)?;
    let etcd_members = members
        .0
        .members()
        .iter()
        .map(|m| Member {
            name: m.name().to_owned(),
            client_urls: m.client_urls().to_vec(),
            leader: m.id() == members.1,
        })
        .collect();
    let keys = ctl.store.keys();
    let (node_entries, _) = ctl
        .store
        .get_prefix(&keys.nodes())
        .await
        .map_err(etcd_error)?;
    let mut nodes = Vec::new();
    for e in &node_entries {
        let r: NodeRecord = e.decode()?;
        nodes.push(Holder {
            name: r.name,
            address: r.address,
            lease: format!("{:x}", e.lease),
            ttl_secs: ttl(ctl, e.lease).await,
        });
    }
    let routers_prefix = format!("{}routers/", keys.prefix());
    let (router_entries, _) = ctl
        .store
        .get_prefix(&routers_prefix)
        .await
        .map_err(etcd_error)?;
    let mut routers = Vec::new();
    for e in &router_entries {
        routers.push(Holder {
            name: e.key.trim_start_matches(&routers_prefix).to_owned(),
            address: String::from_utf8_lossy(&e.value).into_owned(),
            lease: format!("{:x}", e.lease),
            ttl_secs: ttl(ctl, e.lease).await,
        });
    }
    let repos = snapshot(ctl).await?;
    let repositories = repos.len();
    let degraded = repos
        .into_iter()
        .filter(|r| r.dataloss || r.available < r.replicas.len())
        .collect();
    let repair_jobs = ctl.store.repair_jobs().await.map_err(etcd_error)?.len();
    let verifiers = ctl.store.verifier_statuses().await.map_err(etcd_error)?;
    Ok(ClusterView {
        verifiers,
        etcd_members,
        nodes,
        routers,
        repositories,
        degraded,
        repair_jobs,
    })
}

impl ClusterView {
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::from("cluster (from etcd):\n");
        let members: Vec<String> = self
            .etcd_members
            .iter()
            .map(|m| {
                format!(
                    "{}{} {}",
                    m.name,
                    if m.leader { " (leader)" } else { "" },
                    m.client_urls.join(",")
                )
            })
            .collect();
        let _ = writeln!(out, "  {:<22}{}", "etcd members", members.join("; "));
        let holders = |list: &[Holder]| {
            if list.is_empty() {
                return "none".to_string();
            }
            list.iter()
                .map(|h| {
                    format!(
                        "{} {} (lease {}, {}s left)",
                        h.name, h.address, h.lease, h.ttl_secs
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(out, "  {:<22}{}", "nodes", holders(&self.nodes));
        let _ = writeln!(out, "  {:<22}{}", "routers", holders(&self.routers));
        let _ = writeln!(
            out,
            "  {:<22}{} registered, {} with a replica outdated or down, {} repair jobs",
            "repositories",
            self.repositories,
            self.degraded.len(),
            self.repair_jobs
        );
        for r in self.degraded.iter().take(20) {
            let _ = writeln!(
                out,
                "  {:<22}  {}: {}/{} available, {} outdated, {} repairing{}",
                "",
                r.repo,
                r.available,
                r.replication_factor,
                r.outdated,
                r.repairing,
                if r.dataloss {
                    " — NO up-to-date replica on a live node (see `votingctl dataloss`)"
                } else {
                    ""
                }
            );
        }
        if self.degraded.len() > 20 {
            let _ = writeln!(
                out,
                "  {:<22}  ... and {} more (`votingctl repos list`)",
                "",
                self.degraded.len() - 20
            );
        }
        if self.verifiers.is_empty() {
            let _ = writeln!(out, "  {:<22}none running", "verifier");
        }
        let now = refvote_cluster::records::now_unix_ms();
        for v in &self.verifiers {
            let _ = writeln!(out, "  {:<22}{}", "verifier", v.line(now));
            for m in &v.recent_mismatches {
                let _ = writeln!(out, "  {:<22}  {m}", "");
            }
        }
        out
    }
}
