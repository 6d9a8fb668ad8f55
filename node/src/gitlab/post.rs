//! GitLab's post-receive of an acknowledged gated transaction, run on the promoted
//! voter the router asks (`refvote.node.NodeService/RunPostReceive`): with the refs
//! this node's git updated, claimed in etcd first so no other node runs it too, and
//! only while its `postreceive-pending/<tx>` marker says it is owed; the run deletes
//! the marker and the claim when it is over (DESIGN-CHANGES-12.md). A node that
//! restarted since runs it from what the marker carries ([`super::carried`]).

use std::path::PathBuf;
use std::sync::Arc;

use refvote_cluster::tx::Claim;
use refvote_gitlab::{Changes, Collect, HookContext};
use refvote_proto::gitaly::Repository;
use refvote_proto::node::node_service_server::NodeService;
use refvote_proto::node::{RunPostReceiveRequest, RunPostReceiveResponse};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::GitlabSide;
use super::carried::Carried;
use crate::error::NodeError;
use crate::storage::Storages;

/// What one post-receive runs with.
struct Run {
    context: HookContext,
    repo_path: PathBuf,
    changes: String,
}

impl GitlabSide {
    /// Runs post-receive for transaction `tx` once (see the module comment); the claim
    /// lives on `lease`. With the call this node remembers, or — after a restart — with
    /// what the pending marker carries ([`super::carried`]; the repository found by its
    /// relative path in `storages`). Failures of `/post_receive` are retried within the
    /// configured bound and logged; they never fail the call (the push stands).
    pub async fn run_post_receive(
        &self,
        tx: &str,
        lease: i64,
        storages: &Storages,
    ) -> Result<RunPostReceiveResponse, NodeError> {
        let not_ran = || RunPostReceiveResponse {
            ran: false,
            output: Vec::new(),
        };
        let run = match self.remembered(tx) {
            Some(run) => run,
            None => match self.carried_run(tx, storages).await? {
                Some(run) => run,
                None => {
                    tracing::info!(tx, "post-receive is not owed any more; not running it");
                    return Ok(not_ran());
                }
            },
        };
        let claim = self
            .store
            .claim_post_receive(tx, &self.node, lease)
            .await
            .map_err(|source| NodeError::Transaction {
                tx: tx.to_owned(),
                source,
            })?;
        match claim {
            Claim::Claimed => {}
            Claim::Elsewhere(by) => {
                // Kept here (until its TTL) in case the claimer dies unfinished and a
                // sweeper asks again.
                tracing::info!(
                    tx,
                    by,
                    "post-receive is claimed elsewhere; not running it here"
                );
                return Ok(not_ran());
            }
            Claim::Finished => {
                tracing::info!(tx, "post-receive already ran; not running it again");
                self.forget(tx);
                return Ok(not_ran());
            }
        }
        let mut out = Collect::default();
        match Changes::parse(run.changes.as_bytes()) {
            Ok(changes) => {
                let (result, attempts) = self
                    .config
                    .hooks
                    .post_receive_with_retries(
                        &run.context,
                        &run.repo_path,
                        &changes,
                        &mut out,
                        self.config.retry,
                    )
                    .await;
                match result {
                    Ok(_) => tracing::debug!(tx, attempts, "post-receive ran"),
                    Err(e) => {
                        tracing::error!(tx, attempts, error = %e, "post-receive failed; the push stands")
                    }
                }
            }
            // git's post-receive said nothing was updated here (every ref refused).
            Err(e) => tracing::info!(tx, error = %e, "no ref updated; post-receive not run"),
        }
        // Done with, whatever GitLab answered: the marker and the claim go together.
        // If this fails the claim stays on the asker's lease and the marker with it;
        // a sweeper then runs it again once that lease is gone (at least once).
        if let Err(e) = self.store.finish_post_receive(tx).await {
            tracing::warn!(tx, error = %e, "post-receive ran but its pending marker could not be deleted");
        }
        self.forget(tx);
        let mut output = out.stdout;
        output.extend(out.stderr);
        Ok(RunPostReceiveResponse { ran: true, output })
    }

    /// The run of the call this node remembers, if its git committed here.
    fn remembered(&self, tx: &str) -> Option<Run> {
        let call = self.call(tx)?;
        let (changes, push_options) = call.committed.lock().expect("poisoned").clone()?;
        let mut context = call.context.clone();
        context.push_options = push_options;
        // The objects are in the repository now.
        context.object_directories = None;
        Some(Run {
            context,
            repo_path: call.repo_path.clone(),
            changes,
        })
    }

    /// The run the pending marker of `tx` carries, for a node that does not remember
    /// the call (it restarted). `None`: the marker is gone (it ran, or was dropped).
    /// NOT_FOUND (the router asks the next promoted voter, and drops the marker with
    /// an error logged once none can): this node was not promoted, the marker carries
    /// nothing runnable (over the bound, an older writer), or the repository is not
    /// here.
    async fn carried_run(&self, tx: &str, storages: &Storages) -> Result<Option<Run>, NodeError> {
        let pending = self
            .store
            .pending_post_receive(tx)
            .await
            .map_err(|source| NodeError::Transaction {
                tx: tx.to_owned(),
                source,
            })?;
        let Some(pending) = pending else {
            return Ok(None);
        };
        let cannot = |why: String| {
            NodeError::NotFound(format!(
                "this node does not remember transaction {tx} and cannot run its post-receive: {why}"
            ))
        };
        if !pending.promoted.contains(&self.node) {
            return Err(cannot("it was not promoted here".to_owned()));
        }
        if pending.post_receive.is_null() {
            return Err(cannot(
                "its pending marker carries no post-receive data".to_owned(),
            ));
        }
        let carried = Carried::from_value(&pending.post_receive).map_err(|e| {
            tracing::error!(tx, error = %e, "cannot run a pending post-receive from its marker");
            cannot(e.to_string())
        })?;
        let (context, changes) = carried.context().map_err(|e| {
            tracing::error!(tx, error = %e, "cannot run a pending post-receive from its marker");
            cannot(e.to_string())
        })?;
        let repo_path = storages
            .names()
            .find_map(|(storage, _)| {
                let repo = Repository {
                    storage_name: storage.to_owned(),
                    relative_path: carried.relative_path.clone(),
                    ..Default::default()
                };
                storages.existing(Some(&repo)).ok()
            })
            .ok_or_else(|| {
                cannot(format!(
                    "no storage of this node holds {:?}",
                    carried.relative_path
                ))
            })?
            .path;
        tracing::info!(tx, repo = %repo_path.display(), "running post-receive from its pending marker (this node does not remember the call)");
        Ok(Some(Run {
            changes: changes.to_owned(),
            context,
            repo_path,
        }))
    }
}

/// The node's `refvote.node.NodeService`.
pub struct NodeSvc {
    side: Arc<GitlabSide>,
    storages: Storages,
}

impl NodeSvc {
    pub fn new(side: Arc<GitlabSide>, storages: Storages) -> NodeSvc {
        NodeSvc { side, storages }
    }
}

#[tonic::async_trait]
impl NodeService for NodeSvc {
    #[tracing::instrument(skip_all, fields(tx = %request.get_ref().transaction))]
    async fn run_post_receive(
        &self,
        request: Request<RunPostReceiveRequest>,
    ) -> Result<Response<RunPostReceiveResponse>, Status> {
        let req = request.into_inner();
        if !refvote_proto::contract::is_transaction_id(&req.transaction) {
            return Err(NodeError::invalid("malformed transaction id").into());
        }
        // On its own task: a router that dies mid-call must not cut GitLab's call
        // short (the run finishes and deletes its pending marker either way).
        let (side, storages) = (self.side.clone(), self.storages.clone());
        let run = tokio::spawn(
            async move {
                side.run_post_receive(&req.transaction, req.lease, &storages)
                    .await
            }
            .in_current_span(),
        );
        let answer = run
            .await
            .map_err(|e| Status::internal(format!("post-receive's task failed: {e}")))??;
        Ok(Response::new(answer))
    }
}
