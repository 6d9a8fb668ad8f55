//! The cluster the fault suite runs against: a 3-member etcd, 3 or 5 votingd nodes and
//! routers serving gRPC and git smart HTTP, with a cuttable [`Link`] on every connection
//! between two processes; healing it all, waiting for the replicas to settle, and
//! reading what every replica holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use refvote_cluster::{RepoId, Store};
use refvote_proto::gitaly::Repository;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use tonic::transport::Channel;

use super::check;
use super::workload::{REPO, repository};
use crate::etcd::Etcd;
use crate::faultnet::{Link, LinkState};
use crate::node::{Node, NodeOptions};
use crate::proc::{free_port, loopback_ip};
use crate::router::{Router, RouterOptions};

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
        let store = etcd.store().await?;
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
