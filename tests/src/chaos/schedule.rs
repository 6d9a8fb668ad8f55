//! Faults, chosen at random from the run's seed, one at a time: inject, hold, heal,
//! rest. Every other fault first waits (at most 15 s) for every replica to be up to
//! date, so single faults are seen alone as well as on top of an earlier one's repair.
//! Each is recorded with when it was injected and healed, and whether it started clean.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use refvote_cluster::faults;

use super::cluster::ChaosCluster;
use super::history::{FaultEvent, History};
use super::rng::Rng;
use crate::faultnet::LinkState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// `kill -9` a node, restart it after the hold.
    KillNode,
    /// `kill -9` a router, restart it after the hold.
    KillRouter,
    /// `kill -9` an etcd member, restart it after the hold.
    KillEtcdMember,
    /// SIGSTOP a node for longer than its lease, then SIGCONT.
    PauseNode,
    /// Cut a node's links to every etcd member (packets dropped).
    PartitionNodeFromEtcd,
    /// Cut the link routers and peers reach a node through (packets dropped).
    PartitionNodeFromRouters,
    /// Both at once, connections reset.
    IsolateNode,
    /// Cut a router's links to etcd.
    PartitionRouterFromEtcd,
    /// Stop two of the three etcd members.
    EtcdMajorityOutage,
    /// Restart a node with a fault point armed; it dies at that step of its next write.
    NodeFaultPoint(&'static str),
    /// Restart a router with `before-finalize` armed.
    RouterBeforeFinalize,
}

impl FaultKind {
    /// Every kind, for a full run.
    pub fn all() -> Vec<FaultKind> {
        vec![
            FaultKind::KillNode,
            FaultKind::KillRouter,
            FaultKind::KillEtcdMember,
            FaultKind::PauseNode,
            FaultKind::PartitionNodeFromEtcd,
            FaultKind::PartitionNodeFromRouters,
            FaultKind::IsolateNode,
            FaultKind::PartitionRouterFromEtcd,
            FaultKind::EtcdMajorityOutage,
            FaultKind::NodeFaultPoint(faults::AFTER_VOTE_RECORDED),
            FaultKind::NodeFaultPoint(faults::AFTER_DECISION),
            FaultKind::NodeFaultPoint(faults::BEFORE_CONFIRM),
            FaultKind::NodeFaultPoint(faults::MID_REPAIR),
            FaultKind::RouterBeforeFinalize,
        ]
    }

    /// The kind's name on the command line (`fault-soak --kinds`): `kill-node`,
    /// `crash-after-decision`, `router-before-finalize`...
    pub fn slug(&self) -> String {
        match self {
            FaultKind::NodeFaultPoint(p) => format!("crash-{p}"),
            FaultKind::RouterBeforeFinalize => "router-before-finalize".into(),
            other => {
                let mut out = String::new();
                for (i, c) in format!("{other:?}").chars().enumerate() {
                    if c.is_ascii_uppercase() && i > 0 {
                        out.push('-');
                    }
                    out.push(c.to_ascii_lowercase());
                }
                out
            }
        }
    }

    /// The kinds named in a comma-separated list of [`FaultKind::slug`]s.
    pub fn parse_list(list: &str) -> Result<Vec<FaultKind>, String> {
        list.split(',')
            .map(|name| {
                FaultKind::all()
                    .into_iter()
                    .find(|k| k.slug() == name.trim())
                    .ok_or_else(|| {
                        let known: Vec<String> =
                            FaultKind::all().iter().map(|k| k.slug()).collect();
                        format!("unknown fault kind {name:?}; known: {}", known.join(", "))
                    })
            })
            .collect()
    }

    pub fn name(&self) -> String {
        match self {
            FaultKind::NodeFaultPoint(p) => format!("node crash at {p}"),
            FaultKind::RouterBeforeFinalize => "router crash before finalize".into(),
            other => format!("{other:?}"),
        }
    }

    /// A single node lost (no failover is needed: the others are a majority).
    pub fn is_single_node_loss(&self) -> bool {
        matches!(
            self,
            FaultKind::KillNode
                | FaultKind::PauseNode
                | FaultKind::PartitionNodeFromEtcd
                | FaultKind::PartitionNodeFromRouters
                | FaultKind::IsolateNode
                | FaultKind::NodeFaultPoint(_)
        )
    }
}

/// Injects faults from `kinds` until `stop`, one at a time.
pub async fn run(
    cluster: &mut ChaosCluster,
    kinds: &[FaultKind],
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> anyhow::Result<()> {
    let mut rng = Rng::new(seed);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) && n < 10_000 {
        n += 1;
        tokio::time::sleep(rng.millis(500, 1500)).await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let kind = kinds[rng.below(kinds.len())];
        // Every other fault waits (bounded) until every replica is up to date again,
        // so single faults are measured on their own; the rest may land while an
        // earlier fault's replica is still being repaired.
        if rng.below(2) == 0 {
            for _ in 0..150 {
                if stop.load(Ordering::Relaxed) || all_up_to_date(cluster).await {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let clean = all_up_to_date(cluster).await;
        let injected = history.now();
        let (target, ended) = inject(cluster, kind, &mut rng, &history).await?;
        history.fault(FaultEvent {
            kind: kind.name(),
            target,
            injected,
            ended,
            healed: history.now(),
            clean,
        });
    }
    Ok(())
}

/// Whether every replica of the workload's repository is up to date on a live node.
async fn all_up_to_date(cluster: &ChaosCluster) -> bool {
    let Ok(repo) = refvote_cluster::RepoId::new("default", super::workload::REPO) else {
        return false;
    };
    match cluster.store.repo_view(&repo).await {
        Ok(view) => view.up_to_date_live().len() == view.record.assigned.len(),
        Err(_) => false,
    }
}

/// Injects one fault, holds it, heals it. Returns what it hit and when the fault
/// ended (the restart, heal or continue itself, before any wait for readiness).
async fn inject(
    cluster: &mut ChaosCluster,
    kind: FaultKind,
    rng: &mut Rng,
    history: &History,
) -> anyhow::Result<(String, std::time::Duration)> {
    let hold = rng.millis(1000, 4000);
    let lease = cluster.lease_ttl;
    let node = rng.below(cluster.nodes.len());
    let router = rng.below(cluster.routers.len());
    let member = rng.below(cluster.etcd.len());
    match kind {
        FaultKind::KillNode => {
            cluster.nodes[node].kill()?;
            tokio::time::sleep(hold).await;
            let ended = history.now();
            cluster.nodes[node].launch().await?;
            Ok((cluster.nodes[node].name.clone(), ended))
        }
        FaultKind::KillRouter => {
            cluster.routers[router].kill()?;
            tokio::time::sleep(hold).await;
            let ended = history.now();
            cluster.routers[router].launch().await?;
            Ok((cluster.routers[router].name.clone(), ended))
        }
        FaultKind::KillEtcdMember => {
            cluster.etcd.kill(member)?;
            tokio::time::sleep(hold).await;
            let ended = history.now();
            cluster.etcd.restart(member)?;
            cluster.etcd.wait_healthy(Duration::from_secs(30)).await?;
            Ok((cluster.etcd.name(member).to_owned(), ended))
        }
        FaultKind::PauseNode => {
            cluster.nodes[node].pause()?;
            tokio::time::sleep(lease + rng.millis(500, 2500)).await;
            let ended = history.now();
            cluster.nodes[node].resume()?;
            Ok((cluster.nodes[node].name.clone(), ended))
        }
        FaultKind::PartitionNodeFromEtcd => {
            set_all(&cluster.node_etcd[node], LinkState::Blackhole);
            tokio::time::sleep(hold + lease).await;
            let ended = history.now();
            set_all(&cluster.node_etcd[node], LinkState::Up);
            Ok((cluster.nodes[node].name.clone(), ended))
        }
        FaultKind::PartitionNodeFromRouters => {
            cluster.to_node[node].set(LinkState::Blackhole);
            tokio::time::sleep(hold).await;
            let ended = history.now();
            cluster.to_node[node].set(LinkState::Up);
            Ok((cluster.nodes[node].name.clone(), ended))
        }
        FaultKind::IsolateNode => {
            set_all(&cluster.node_etcd[node], LinkState::Reset);
            cluster.to_node[node].set(LinkState::Reset);
            tokio::time::sleep(hold + lease).await;
            let ended = history.now();
            set_all(&cluster.node_etcd[node], LinkState::Up);
            cluster.to_node[node].set(LinkState::Up);
            Ok((cluster.nodes[node].name.clone(), ended))
        }
        FaultKind::PartitionRouterFromEtcd => {
            set_all(&cluster.router_etcd[router], LinkState::Blackhole);
            tokio::time::sleep(hold).await;
            let ended = history.now();
            set_all(&cluster.router_etcd[router], LinkState::Up);
            Ok((cluster.routers[router].name.clone(), ended))
        }
        FaultKind::EtcdMajorityOutage => {
            let other = (member + 1) % cluster.etcd.len();
            cluster.etcd.stop(member)?;
            cluster.etcd.stop(other)?;
            tokio::time::sleep(hold).await;
            let ended = history.now();
            cluster.etcd.restart(member)?;
            cluster.etcd.restart(other)?;
            cluster.etcd.wait_healthy(Duration::from_secs(30)).await?;
            let target = format!(
                "{} and {}",
                cluster.etcd.name(member),
                cluster.etcd.name(other)
            );
            Ok((target, ended))
        }
        FaultKind::NodeFaultPoint(point) => {
            let n = &mut cluster.nodes[node];
            if point == faults::MID_REPAIR {
                // Make it miss writes first, so it has something to repair.
                n.kill()?;
                tokio::time::sleep(hold).await;
            } else {
                n.stop()?;
            }
            n.env = vec![(faults::ENV.into(), point.into())];
            // The point may be hit before the node is healthy (an incremental repair
            // starts and reaches mid-repair within milliseconds of the lease): a node
            // that died armed is a hit, one still running and not healthy an error.
            if let Err(e) = n.launch().await
                && n.is_running()
            {
                return Err(e);
            }
            // Wait (bounded) for the point to be hit, then bring it back unarmed.
            for _ in 0..(hold.as_millis() / 100 + 20) {
                if !n.is_running() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let hit = !n.is_running();
            n.env.clear();
            let ended = history.now();
            if hit {
                n.launch().await?;
            } else {
                n.stop()?;
                n.launch().await?;
            }
            let target = format!("{} ({})", n.name, if hit { "hit" } else { "not reached" });
            Ok((target, ended))
        }
        FaultKind::RouterBeforeFinalize => {
            let r = &mut cluster.routers[router];
            r.stop()?;
            r.env = vec![(faults::ENV.into(), faults::BEFORE_FINALIZE.into())];
            r.launch().await?;
            for _ in 0..(hold.as_millis() / 100 + 20) {
                if !r.is_running() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let hit = !r.is_running();
            r.env.clear();
            r.stop()?;
            let ended = history.now();
            r.launch().await?;
            let target = format!("{} ({})", r.name, if hit { "hit" } else { "not reached" });
            Ok((target, ended))
        }
    }
}

fn set_all(links: &[crate::faultnet::Link], state: LinkState) {
    for l in links {
        l.set(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_slug_that_parses_back() {
        let all = FaultKind::all();
        let slugs: Vec<String> = all.iter().map(|k| k.slug()).collect();
        assert!(slugs.contains(&"kill-node".to_owned()), "{slugs:?}");
        assert!(
            slugs.contains(&"crash-after-decision".to_owned()),
            "{slugs:?}"
        );
        assert_eq!(FaultKind::parse_list(&slugs.join(",")), Ok(all));
        let err = FaultKind::parse_list("kill-node,nonsense").unwrap_err();
        assert!(
            err.contains("\"nonsense\"") && err.contains("kill-node"),
            "{err}"
        );
    }
}
