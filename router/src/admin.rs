//! refvote's admin service (`refvote.admin.AdminService`, DESIGN.md §4), served on the
//! router's gRPC port in front of the catch-all Gitaly handler.
//!
//! Every call that changes replicas takes the repository's write lock under the
//! router's lease (writes wait a bounded time meanwhile, then fail UNAVAILABLE), waits
//! for the repository's open transactions to finish, copies with the nodes'
//! `ReplicateRepository`, and records the result in one etcd txn fenced by the lock's
//! revision. The lock is released on every path; if the router dies it lapses with the
//! lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use refvote_cluster::lock::RepoLock;
use refvote_cluster::records::ReplicaState;
use refvote_cluster::replicas::ReplicaChange;
use refvote_cluster::repository::RepoView;
use refvote_cluster::{RepoId, Store};
use refvote_proto::admin::admin_service_server::AdminService;
use refvote_proto::admin::{
    CreateRepositoryReplicasRequest, CreateRepositoryReplicasResponse,
    GetRepositoryReplicasRequest, GetRepositoryReplicasResponse, RemoveRepositoryReplicasRequest,
    RemoveRepositoryReplicasResponse, RemoveRepositoryRequest, RemoveRepositoryResponse, Replica,
    RepositoryName, SynchronizeRepositoryReplicasRequest, SynchronizeRepositoryReplicasResponse,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::nodes::{self, NodeError, checksum, replicate};
use crate::pool::Pool;

/// The path prefix of the admin service's methods.
pub const PATH_PREFIX: &str = "/refvote.admin.AdminService/";

pub struct Admin {
    store: Store,
    pool: Arc<Pool>,
    /// The router's id: the locks' holder.
    id: String,
    lease: watch::Receiver<Option<i64>>,
    /// How long a locked operation waits for open transactions to finish.
    drain_wait: Duration,
    /// Bound on copying one replica while writes wait.
    copy_timeout: Duration,
}

impl Admin {
    pub fn new(
        store: Store,
        pool: Arc<Pool>,
        id: String,
        lease: watch::Receiver<Option<i64>>,
    ) -> Admin {
        Admin {
            store,
            pool,
            id,
            lease,
            drain_wait: Duration::from_secs(10),
            copy_timeout: Duration::from_secs(300),
        }
    }

    async fn view(&self, repo: &RepoId) -> Result<RepoView, Status> {
        self.store.repo_view(repo).await.map_err(etcd_status)
    }

    /// Takes the repository's lock and drains its transactions; runs `work` under it;
    /// releases it whatever happened.
    async fn locked<T, F, Fut>(&self, repo: &RepoId, operation: &str, work: F) -> Result<T, Status>
    where
        F: FnOnce(RepoLock, RepoView) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let lease = (*self.lease.borrow()).ok_or_else(|| {
            Status::unavailable("this router holds no etcd lease yet; retry shortly")
        })?;
        // Another operation (a repair's catch-up) may hold it for a moment.
        let deadline = tokio::time::Instant::now() + self.drain_wait;
        let lock = loop {
            match self.store.lock_repo(repo, &self.id, operation, lease).await {
                Ok(lock) => break lock,
                Err(refvote_cluster::Error::Locked(_) | refvote_cluster::Error::Contention(_))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(etcd_status(e)),
            }
        };
        let result = async {
            self.store
                .drain(repo, self.drain_wait)
                .await
                .map_err(etcd_status)?;
            let view = self.view(repo).await?;
            work(lock.clone(), view).await
        }
        .await;
        if let Err(e) = self.store.unlock(&lock).await {
            tracing::warn!(%repo, error = %e, "cannot release the lock; it lapses with the router's lease");
        }
        result
    }

    /// Copies the repository onto each of `targets` from `source`; their checksums.
    async fn copy_all(
        &self,
        view: &RepoView,
        source: &str,
        targets: &[String],
    ) -> Result<BTreeMap<String, String>, Status> {
        let relative = &view.record.repo.relative_path;
        let mut sums = BTreeMap::new();
        for target in targets {
            replicate(
                &self.pool,
                view,
                source,
                target,
                relative,
                self.copy_timeout,
            )
            .await
            .map_err(|e| repair_status(target, e))?;
            let sum = checksum(&self.pool, view, target, relative)
                .await
                .map_err(|e| repair_status(target, e))?;
            sums.insert(target.clone(), sum);
        }
        Ok(sums)
    }

    async fn replicas(&self, repo: &RepoId) -> Result<Vec<Replica>, Status> {
        let view = self.view(repo).await?;
        let claims = self.claims(repo).await;
        Ok(replicas_of(&view, &claims))
    }

    /// node → repair worker, for `repo`'s claimed repair jobs.
    async fn claims(&self, repo: &RepoId) -> BTreeMap<String, String> {
        match self.store.repair_jobs().await {
            Ok(jobs) => jobs
                .into_iter()
                .filter(|j| &j.job.repo == repo)
                .filter_map(|j| j.claimed_by.map(|c| (j.job.node, c)))
                .collect(),
            Err(_) => BTreeMap::new(),
        }
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    #[tracing::instrument(skip_all)]
    async fn create_repository_replicas(
        &self,
        request: Request<CreateRepositoryReplicasRequest>,
    ) -> Result<Response<CreateRepositoryReplicasResponse>, Status> {
        let req = request.into_inner();
        let repo = repo_id(req.repository.as_ref())?;
        let view = self.view(&repo).await?;
        for node in &req.nodes {
            if !view.live_nodes.contains_key(node) {
                return Err(unknown_node(node, &view));
            }
            if view.record.assigned.contains(node) {
                return Err(Status::already_exists(format!(
                    "node {node} already holds a replica of {repo}"
                )));
            }
        }
        let have = view.record.assigned.len() + req.nodes.len();
        let wanted = req.replica_count as usize;
        if wanted == 0 && req.nodes.is_empty() {
            return Err(Status::invalid_argument(
                "say how many replicas the repository should have (replica_count) or on which nodes (nodes)",
            ));
        }
        if wanted != 0 && wanted < have {
            return Err(Status::failed_precondition(format!(
                "{repo} would have {have} replicas, more than the {wanted} asked for; \
                 use RemoveRepositoryReplicas to remove replicas"
            )));
        }
        let mut added = req.nodes.clone();
        if wanted > have {
            let more = self
                .store
                .place_more(&view, wanted - view.record.assigned.len())
                .await
                .map_err(|e| match e {
                    refvote_cluster::Error::Invalid(m) => Status::failed_precondition(m),
                    e => etcd_status(e),
                })?;
            for n in more {
                if added.len() + view.record.assigned.len() >= wanted {
                    break;
                }
                if !added.contains(&n) {
                    added.push(n);
                }
            }
        }
        let r = &repo;
        let added = self
            .locked(r, "CreateRepositoryReplicas", |lock, view| async move {
                // Re-checked under the lock: another call may have added them.
                if let Some(n) = added.iter().find(|n| view.record.assigned.contains(*n)) {
                    return Err(Status::already_exists(format!(
                        "node {n} already holds a replica of {r}"
                    )));
                }
                let source = source_of(&view)?;
                let sums = self.copy_all(&view, &source, &added).await?;
                let mut assigned = view.record.assigned.clone();
                assigned.extend(added.iter().cloned());
                let change = ReplicaChange {
                    assigned: Some(assigned),
                    current: sums,
                    removed: Vec::new(),
                };
                fenced(self.store.change_replicas(&lock, &view, &change).await)?;
                tracing::info!(repo = %r, ?added, "replicas added");
                Ok(added)
            })
            .await?;
        Ok(Response::new(CreateRepositoryReplicasResponse {
            added,
            replicas: self.replicas(&repo).await?,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn remove_repository_replicas(
        &self,
        request: Request<RemoveRepositoryReplicasRequest>,
    ) -> Result<Response<RemoveRepositoryReplicasResponse>, Status> {
        let req = request.into_inner();
        let repo = repo_id(req.repository.as_ref())?;
        if req.nodes.is_empty() {
            return Err(Status::invalid_argument("name the nodes to remove (nodes)"));
        }
        let r = &repo;
        let (removed, view) = self
            .locked(r, "RemoveRepositoryReplicas", |lock, view| {
                let nodes = req.nodes.clone();
                async move {
                    for node in &nodes {
                        if !view.record.assigned.contains(node) {
                            return Err(Status::not_found(format!(
                                "node {node} holds no replica of {r} (its replicas: {})",
                                view.record.assigned.join(", ")
                            )));
                        }
                    }
                    let remaining: Vec<String> = view
                        .record
                        .assigned
                        .iter()
                        .filter(|n| !nodes.contains(*n))
                        .cloned()
                        .collect();
                    let current = view
                        .up_to_date_live()
                        .into_iter()
                        .filter(|n| remaining.contains(n))
                        .count();
                    let needed = view
                        .record
                        .threshold()
                        .max(refvote_cluster::quorum::threshold(remaining.len()));
                    if remaining.is_empty() || current < needed {
                        return Err(Status::failed_precondition(format!(
                            "removing {} of the {} replicas of {r} would leave {} up to date \
                             on live nodes, fewer than the {needed} a write needs; add or repair \
                             replicas first, or use RemoveRepository",
                            nodes.len(),
                            view.record.assigned.len(),
                            current
                        )));
                    }
                    let change = ReplicaChange {
                        assigned: Some(remaining),
                        current: BTreeMap::new(),
                        removed: nodes.clone(),
                    };
                    fenced(self.store.change_replicas(&lock, &view, &change).await)?;
                    tracing::info!(repo = %r, removed = ?nodes, "replicas removed");
                    Ok((nodes, view))
                }
            })
            .await?;
        // The records are gone, so nothing routes to these copies any more.
        let mut left_on_disk = Vec::new();
        for node in &removed {
            if !nodes::remove(&self.pool, &view, node).await {
                left_on_disk.push(node.clone());
            }
        }
        Ok(Response::new(RemoveRepositoryReplicasResponse {
            removed,
            left_on_disk,
            replicas: self.replicas(&repo).await?,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_repository_replicas(
        &self,
        request: Request<GetRepositoryReplicasRequest>,
    ) -> Result<Response<GetRepositoryReplicasResponse>, Status> {
        let repo = repo_id(request.get_ref().repository.as_ref())?;
        let view = self.view(&repo).await?;
        let claims = self.claims(&repo).await;
        let locked_by = match &view.lock {
            Some(e) => refvote_cluster::lock::locked_error(&repo, e).to_string(),
            None => String::new(),
        };
        Ok(Response::new(GetRepositoryReplicasResponse {
            generation: view.record.generation,
            replication_factor: view.record.replication_factor,
            threshold: view.record.threshold() as u32,
            creation_checksum: view.record.creation_checksum.clone(),
            replicas: replicas_of(&view, &claims),
            locked_by,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn synchronize_repository_replicas(
        &self,
        request: Request<SynchronizeRepositoryReplicasRequest>,
    ) -> Result<Response<SynchronizeRepositoryReplicasResponse>, Status> {
        let repo = repo_id(request.get_ref().repository.as_ref())?;
        let r = &repo;
        let (source, synchronized) = self
            .locked(r, "SynchronizeRepositoryReplicas", |lock, view| async move {
                // What every live replica holds right now (no write can land).
                let relative = &view.record.repo.relative_path;
                let live: Vec<String> = view
                    .record
                    .assigned
                    .iter()
                    .filter(|n| view.live_nodes.contains_key(*n))
                    .cloned()
                    .collect();
                let mut sums = BTreeMap::new();
                for node in &live {
                    if let Ok(sum) = checksum(&self.pool, &view, node, relative).await {
                        sums.insert(node.clone(), sum);
                    }
                }
                // The majority of the up-to-date replicas is authoritative.
                let mut groups: BTreeMap<&String, Vec<String>> = BTreeMap::new();
                for node in view.up_to_date_live() {
                    if let Some(sum) = sums.get(&node) {
                        groups.entry(sum).or_default().push(node);
                    }
                }
                let threshold = view.record.threshold();
                let Some((sum, agreeing)) = groups
                    .into_iter()
                    .max_by_key(|(_, nodes)| nodes.len())
                    .filter(|(_, nodes)| nodes.len() >= threshold)
                else {
                    return Err(Status::failed_precondition(format!(
                        "no {threshold} up-to-date replicas of {r} agree on their refs \
                         (checksums: {sums:?}); nothing was changed: see votingctl dataloss"
                    )));
                };
                let sum = sum.clone();
                let source = agreeing[0].clone();
                let copy: Vec<String> = live
                    .iter()
                    .filter(|n| sums.get(*n) != Some(&sum))
                    .cloned()
                    .collect();
                let mut current = self.copy_all(&view, &source, &copy).await?;
                for n in &live {
                    if sums.get(n) == Some(&sum) {
                        current.insert(n.clone(), sum.clone());
                    }
                }
                if let Some((n, s)) = current.iter().find(|(_, s)| **s != sum) {
                    return Err(Status::unavailable(format!(
                        "{n} still differs after the copy (checksum {s}, expected {sum}); retry"
                    )));
                }
                let change = ReplicaChange {
                    assigned: None,
                    current,
                    removed: Vec::new(),
                };
                fenced(self.store.change_replicas(&lock, &view, &change).await)?;
                tracing::info!(repo = %r, %source, synchronized = ?copy, "replicas synchronized");
                Ok((source, copy))
            })
            .await?;
        Ok(Response::new(SynchronizeRepositoryReplicasResponse {
            source,
            synchronized,
            replicas: self.replicas(&repo).await?,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn remove_repository(
        &self,
        request: Request<RemoveRepositoryRequest>,
    ) -> Result<Response<RemoveRepositoryResponse>, Status> {
        let repo = repo_id(request.get_ref().repository.as_ref())?;
        let r = &repo;
        let (removed_from, left_on_disk) = self
            .locked(r, "RemoveRepository", |lock, view| async move {
                fenced(self.store.remove_repository_records(&lock, &view).await)?;
                tracing::info!(repo = %r, "repository records removed");
                // Still under the lock: a re-creation waits until the copies are gone.
                let (mut removed, mut left) = (Vec::new(), Vec::new());
                for node in &view.record.assigned {
                    if nodes::remove(&self.pool, &view, node).await {
                        removed.push(node.clone());
                    } else {
                        left.push(node.clone());
                    }
                }
                Ok((removed, left))
            })
            .await?;
        Ok(Response::new(RemoveRepositoryResponse {
            removed_from,
            left_on_disk,
        }))
    }
}

fn repo_id(name: Option<&RepositoryName>) -> Result<RepoId, Status> {
    let name = name.ok_or_else(|| Status::invalid_argument("repository is not set"))?;
    RepoId::new(&name.virtual_storage, &name.relative_path)
        .map_err(|e| Status::invalid_argument(format!("repository: {e}")))
}

fn unknown_node(node: &str, view: &RepoView) -> Status {
    Status::not_found(format!(
        "node {node:?} is not registered or not live (live nodes: {})",
        view.live_nodes
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// An up-to-date replica on a live node to copy from.
fn source_of(view: &RepoView) -> Result<String, Status> {
    view.up_to_date_live().into_iter().next().ok_or_else(|| {
        Status::failed_precondition(format!(
            "no replica of {} is up to date on a live node to copy from",
            view.record.repo
        ))
    })
}

fn replicas_of(view: &RepoView, claims: &BTreeMap<String, String>) -> Vec<Replica> {
    let mut nodes: Vec<&String> = view.record.assigned.iter().collect();
    nodes.extend(
        view.replicas
            .keys()
            .filter(|n| !view.record.assigned.contains(*n)),
    );
    nodes
        .into_iter()
        .map(|node| {
            let record = view.replicas.get(node).map(|(r, _)| r);
            Replica {
                node: node.clone(),
                state: match record.map(|r| r.state) {
                    Some(ReplicaState::UpToDate) => "up_to_date",
                    Some(ReplicaState::Outdated) => "outdated",
                    Some(ReplicaState::Repairing) => "repairing",
                    None => "missing",
                }
                .into(),
                generation: record.map_or(0, |r| r.generation),
                checksum: record.map(|r| r.checksum.clone()).unwrap_or_default(),
                live: view.live_nodes.contains_key(node),
                up_to_date: record.is_some_and(|r| r.is_up_to_date(&view.record)),
                reason: record.map(|r| r.reason.clone()).unwrap_or_default(),
                repairing_by: claims.get(node).cloned().unwrap_or_default(),
            }
        })
        .collect()
}

/// A fenced change that did not apply: the lock was lost or the repository changed.
fn fenced(result: refvote_cluster::Result<bool>) -> Result<(), Status> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(Status::aborted(
            "the repository changed or the lock was lost before the change was recorded; nothing was changed, retry",
        )),
        Err(refvote_cluster::Error::Invalid(m)) => Err(Status::invalid_argument(m)),
        Err(e) => Err(etcd_status(e)),
    }
}

fn repair_status(target: &str, e: NodeError) -> Status {
    Status::unavailable(format!("copying the repository to {target}: {e}"))
}

fn etcd_status(e: refvote_cluster::Error) -> Status {
    use refvote_cluster::Error as E;
    match e {
        E::UnknownRepo(r) => Status::not_found(format!("repository {r} is not registered")),
        e @ (E::Locked(_) | E::NotDrained { .. }) => Status::unavailable(e.to_string()),
        e => Status::unavailable(format!("etcd: {e}")),
    }
}
