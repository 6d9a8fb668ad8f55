//! The services the router answers itself instead of forwarding them to one node, as
//! Praefect does for the services Gitaly marks `intercepted`: ServerService (what the
//! "server" is: versions, storages, disk, readiness, signing key), aggregated over the
//! storage nodes, and PraefectInfoService.RepositoryReplicas (where a repository's
//! replicas are, with their checksums). Rails calls them for its admin pages, health
//! checks and `gitlab:praefect:replicas`.
//!
//! Every answer is built from a fresh etcd read and fresh calls to the nodes (each
//! bounded in time); the decisions over what was read are pure functions in
//! [`cluster`]. Differences from Praefect, and why:
//! - Virtual storages are the router's `virtual_storages` (default `["default"]`):
//!   refvote registers no per-node storage names clients could address.
//! - ServerInfo asks every live node, not one: a virtual storage is readable while one
//!   node can read, and writeable while enough nodes for a write quorum
//!   (`replication_factor`) can write. A node that is down shows there once too few
//!   remain, and always in ReadinessCheck.
//! - DiskStatistics reports each virtual storage once (the least space available and
//!   the most used on any live node), under the name Rails looks it up by; Praefect
//!   lists its nodes' storages under their internal names, which Rails cannot match.
//! - RepositoryReplicas names replicas by node (refvote's nodes all call their storage
//!   by one name), and answers for a replica that cannot be reached with an empty
//!   checksum instead of failing the whole call.

mod cluster;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use refvote_cluster::records::NodeRecord;
use refvote_cluster::{RepoId, Store};
use refvote_proto::gitaly::praefect_info_service_server::PraefectInfoService;
use refvote_proto::gitaly::repository_replicas_response::RepositoryDetails;
use refvote_proto::gitaly::server_service_client::ServerServiceClient;
use refvote_proto::gitaly::server_service_server::ServerService;
use refvote_proto::gitaly::{
    DiskStatisticsRequest, DiskStatisticsResponse, ReadinessCheckRequest, ReadinessCheckResponse,
    Repository, RepositoryReplicasRequest, RepositoryReplicasResponse, ServerInfoRequest,
    ServerInfoResponse, ServerSignatureRequest, ServerSignatureResponse, readiness_check_response,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::pool::Pool;
use cluster::{Check, Cluster, NodeAnswer};

/// gRPC paths the router answers itself.
pub const SERVER_SERVICE: &str = "/gitaly.ServerService/";
pub const PRAEFECT_INFO_SERVICE: &str = "/gitaly.PraefectInfoService/";

/// How long one node has to answer a probe.
const NODE_TIMEOUT: Duration = Duration::from_secs(3);
/// A readiness check without a timeout of its own gets this one.
const READINESS_TIMEOUT: Duration = Duration::from_secs(10);

/// The router's own ServerService and PraefectInfoService.
#[derive(Clone)]
pub struct Intercepted {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    pool: Arc<Pool>,
    router_id: String,
    lease: watch::Receiver<Option<i64>>,
    virtual_storages: Vec<String>,
    replication_factor: usize,
}

impl Intercepted {
    pub fn new(
        store: Store,
        pool: Arc<Pool>,
        router_id: String,
        lease: watch::Receiver<Option<i64>>,
        virtual_storages: Vec<String>,
        replication_factor: usize,
    ) -> Intercepted {
        Intercepted {
            inner: Arc::new(Inner {
                store,
                pool,
                router_id,
                lease,
                virtual_storages,
                replication_factor,
            }),
        }
    }
}

fn etcd_unavailable(e: refvote_cluster::Error) -> Status {
    Status::unavailable(format!(
        "cannot read the cluster from etcd: {e}; check the router's etcd connectivity"
    ))
}

impl Inner {
    /// `call` on every live node at once, each bounded by `timeout`.
    async fn on_every_node<T, F, Fut>(
        &self,
        nodes: &BTreeMap<String, NodeRecord>,
        timeout: Duration,
        call: F,
    ) -> BTreeMap<String, Result<T, String>>
    where
        F: Fn(crate::pool::NodeChannel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let calls = nodes.values().map(|node| {
            let channel = self.pool.channel(&node.address);
            let call = channel.map(&call);
            async move {
                let result = match call {
                    Err(why) => Err(why),
                    Ok(fut) => match tokio::time::timeout(timeout, fut).await {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
                        Err(_) => Err(format!("no answer within {timeout:?}")),
                    },
                };
                (node.name.clone(), result)
            }
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .collect()
    }

    async fn server_infos(
        &self,
        nodes: &BTreeMap<String, NodeRecord>,
    ) -> BTreeMap<String, Result<ServerInfoResponse, String>> {
        self.on_every_node(nodes, NODE_TIMEOUT, |ch| async move {
            let mut req = Request::new(ServerInfoRequest {});
            req.set_timeout(NODE_TIMEOUT);
            Ok(ServerServiceClient::new(ch)
                .server_info(req)
                .await?
                .into_inner())
        })
        .await
    }

    /// Every check of ReadinessCheck, within `timeout` together.
    async fn checks(&self, timeout: Duration) -> Vec<Check> {
        let etcd = async {
            let result = tokio::time::timeout(timeout, self.etcd_round_trip()).await;
            Check::new(
                cluster::CHECK_ETCD,
                result.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}"))),
            )
        };
        let nodes_and_repos = async {
            let read = tokio::time::timeout(timeout, Cluster::read(&self.store)).await;
            let cluster = match read {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    let why = format!("cannot read the cluster from etcd: {e}");
                    return vec![
                        Check::new(cluster::CHECK_NODES, Err(why.clone())),
                        Check::new(cluster::CHECK_REPOSITORIES, Err(why)),
                    ];
                }
                Err(_) => {
                    let why = format!("cannot read the cluster from etcd within {timeout:?}");
                    return vec![
                        Check::new(cluster::CHECK_NODES, Err(why.clone())),
                        Check::new(cluster::CHECK_REPOSITORIES, Err(why)),
                    ];
                }
            };
            let probes = self.probe(&cluster.live, timeout).await;
            vec![
                Check::new(cluster::CHECK_NODES, cluster.connectivity(&probes)),
                Check::new(cluster::CHECK_REPOSITORIES, cluster.availability()),
            ]
        };
        let (etcd, mut rest) = tokio::join!(etcd, nodes_and_repos);
        rest.push(etcd);
        rest
    }

    /// Health and storage access of every live node.
    async fn probe(
        &self,
        live: &BTreeMap<String, NodeRecord>,
        timeout: Duration,
    ) -> BTreeMap<String, NodeAnswer> {
        let per_node = timeout.min(NODE_TIMEOUT);
        let health = self
            .on_every_node(live, per_node, |ch| async move {
                let mut req = Request::new(HealthCheckRequest::default());
                req.set_timeout(per_node);
                Ok(HealthClient::new(ch).check(req).await?.into_inner().status)
            })
            .await;
        let infos = self.server_infos(live).await;
        live.keys()
            .map(|name| {
                let answer = match (&health[name], &infos[name]) {
                    (Err(why), _) => NodeAnswer::Unreachable(why.clone()),
                    (Ok(s), _) if *s != ServingStatus::Serving as i32 => {
                        NodeAnswer::Unreachable(format!("its health check answers {s}"))
                    }
                    (Ok(_), Err(why)) => NodeAnswer::Unreachable(why.clone()),
                    (Ok(_), Ok(info)) => NodeAnswer::Info(info.clone()),
                };
                (name.clone(), answer)
            })
            .collect()
    }

    /// Writes and reads back this router's readiness key, bound to its lease (a router
    /// without one cannot take writes either).
    async fn etcd_round_trip(&self) -> Result<(), String> {
        let lease =
            (*self.lease.borrow()).ok_or("this router holds no etcd lease (is etcd reachable?)")?;
        let key = format!("{}readiness/{}", self.store.keys().prefix(), self.router_id);
        let value = format!("{}", std::process::id());
        let put = etcd_client::TxnOp::put(
            key.as_str(),
            value.as_str(),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        );
        self.store
            .txn(etcd_client::Txn::new().and_then([put]))
            .await
            .map_err(|e| format!("writing {key}: {e}"))?;
        match self.store.get(&key).await {
            Ok(Some(e)) if e.value == value.as_bytes() => Ok(()),
            Ok(_) => Err(format!("{key} did not read back as written")),
            Err(e) => Err(format!("reading {key}: {e}")),
        }
    }
}

#[tonic::async_trait]
impl ServerService for Intercepted {
    async fn server_info(
        &self,
        _request: Request<ServerInfoRequest>,
    ) -> Result<Response<ServerInfoResponse>, Status> {
        let me = &self.inner;
        let live = Cluster::live_nodes(&me.store)
            .await
            .map_err(etcd_unavailable)?;
        let infos = me.server_infos(&live).await;
        Ok(Response::new(cluster::server_info(
            &live,
            &infos,
            &me.virtual_storages,
            me.replication_factor,
        )))
    }

    async fn disk_statistics(
        &self,
        _request: Request<DiskStatisticsRequest>,
    ) -> Result<Response<DiskStatisticsResponse>, Status> {
        let me = &self.inner;
        let live = Cluster::live_nodes(&me.store)
            .await
            .map_err(etcd_unavailable)?;
        let stats = me
            .on_every_node(&live, NODE_TIMEOUT, |ch| async move {
                let mut req = Request::new(DiskStatisticsRequest {});
                req.set_timeout(NODE_TIMEOUT);
                Ok(ServerServiceClient::new(ch)
                    .disk_statistics(req)
                    .await?
                    .into_inner())
            })
            .await;
        for (node, r) in &stats {
            if let Err(why) = r {
                tracing::warn!(node, why, "disk statistics of a node are missing");
            }
        }
        Ok(Response::new(cluster::disk_statistics(
            &live,
            &stats,
            &me.virtual_storages,
        )))
    }

    async fn readiness_check(
        &self,
        request: Request<ReadinessCheckRequest>,
    ) -> Result<Response<ReadinessCheckResponse>, Status> {
        let timeout = request
            .get_ref()
            .timeout
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(READINESS_TIMEOUT);
        let checks = self.inner.checks(timeout).await;
        let failed = cluster::failed_checks(checks);
        let result = if failed.is_empty() {
            readiness_check_response::Result::OkResponse(readiness_check_response::Ok {})
        } else {
            readiness_check_response::Result::FailureResponse(readiness_check_response::Failure {
                failed_checks: failed,
            })
        };
        Ok(Response::new(ReadinessCheckResponse {
            result: Some(result),
        }))
    }

    async fn server_signature(
        &self,
        _request: Request<ServerSignatureRequest>,
    ) -> Result<Response<ServerSignatureResponse>, Status> {
        let me = &self.inner;
        let live = Cluster::live_nodes(&me.store)
            .await
            .map_err(etcd_unavailable)?;
        let keys = me
            .on_every_node(&live, NODE_TIMEOUT, |ch| async move {
                let mut req = Request::new(ServerSignatureRequest {});
                req.set_timeout(NODE_TIMEOUT);
                Ok(ServerServiceClient::new(ch)
                    .server_signature(req)
                    .await?
                    .into_inner()
                    .public_key)
            })
            .await;
        let public_key = cluster::one_signature(&keys)?;
        Ok(Response::new(ServerSignatureResponse { public_key }))
    }
}

#[tonic::async_trait]
impl PraefectInfoService for Intercepted {
    async fn repository_replicas(
        &self,
        request: Request<RepositoryReplicasRequest>,
    ) -> Result<Response<RepositoryReplicasResponse>, Status> {
        let me = &self.inner;
        let wanted = request
            .get_ref()
            .repository
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("the request names no repository"))?;
        let repo = RepoId::new(&wanted.storage_name, &wanted.relative_path)
            .map_err(|e| Status::invalid_argument(format!("invalid repository: {e}")))?;
        let view = match me.store.repo_view(&repo).await {
            Ok(v) => v,
            Err(refvote_cluster::Error::UnknownRepo(r)) => {
                return Err(Status::not_found(format!(
                    "repository {r} is not registered in refvote"
                )));
            }
            Err(e) => return Err(etcd_unavailable(e)),
        };
        let relative = &repo.relative_path;
        let sums = view.record.assigned.iter().map(|node| async {
            let sum = crate::nodes::checksum(&me.pool, &view, node, relative).await;
            (node.clone(), sum)
        });
        let sums: BTreeMap<String, Result<String, String>> = futures_util::future::join_all(sums)
            .await
            .into_iter()
            .map(|(n, r)| (n, r.map_err(|e| e.to_string())))
            .collect();
        for (node, r) in &sums {
            if let Err(why) = r {
                tracing::info!(%repo, node, why, "no checksum from a replica");
            }
        }
        let (primary, others) =
            cluster::primary_first(&view.up_to_date_live(), &view.record.assigned, &sums)
                .ok_or_else(|| {
                    Status::unavailable(format!(
                        "no replica of {repo} is up to date on a live node that answers"
                    ))
                })?;
        let details = |node: &str| RepositoryDetails {
            repository: Some(Repository {
                storage_name: node.to_owned(),
                relative_path: relative.clone(),
                ..Default::default()
            }),
            checksum: sums
                .get(node)
                .and_then(|r| r.as_ref().ok())
                .cloned()
                .unwrap_or_default(),
        };
        Ok(Response::new(RepositoryReplicasResponse {
            primary: Some(details(&primary)),
            replicas: others.iter().map(|n| details(n)).collect(),
        }))
    }
}
