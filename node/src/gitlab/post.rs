//! GitLab's post-receive of an acknowledged gated transaction, run on the promoted
//! voter the router asks (`refvote.node.NodeService/RunPostReceive`): with the refs
//! this node's git updated, claimed in etcd first so no other node runs it too, and
//! only while its `postreceive-pending/<tx>` marker says it is owed; the run deletes
//! the marker and the claim when it is over (DESIGN-CHANGES-12.md).

use std::sync::Arc;

use refvote_cluster::tx::Claim;
use refvote_gitlab::{Changes, Collect};
use refvote_proto::node::node_service_server::NodeService;
use refvote_proto::node::{RunPostReceiveRequest, RunPostReceiveResponse};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::GitlabSide;
use crate::error::NodeError;

impl GitlabSide {
    /// Runs post-receive for transaction `tx` once (see the module comment); the claim
    /// lives on `lease`. Failures of `/post_receive` are retried within the configured
    /// bound and logged; they never fail the call (the push stands).
    pub async fn run_post_receive(
        &self,
        tx: &str,
        lease: i64,
    ) -> Result<RunPostReceiveResponse, NodeError> {
        let not_here = || {
            NodeError::NotFound(format!(
                "no update of transaction {tx} committed on this node; ask another promoted replica"
            ))
        };
        let call = self.call(tx).ok_or_else(not_here)?;
        let (changes, push_options) = call
            .committed
            .lock()
            .expect("poisoned")
            .clone()
            .ok_or_else(not_here)?;
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
                return Ok(RunPostReceiveResponse {
                    ran: false,
                    output: Vec::new(),
                });
            }
            Claim::Finished => {
                tracing::info!(tx, "post-receive already ran; not running it again");
                self.forget(tx);
                return Ok(RunPostReceiveResponse {
                    ran: false,
                    output: Vec::new(),
                });
            }
        }
        let mut out = Collect::default();
        match Changes::parse(changes.as_bytes()) {
            Ok(changes) => {
                let mut context = call.context.clone();
                context.push_options = push_options;
                // The objects are in the repository now.
                context.object_directories = None;
                let (result, attempts) = self
                    .config
                    .hooks
                    .post_receive_with_retries(
                        &context,
                        &call.repo_path,
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
}

/// The node's `refvote.node.NodeService`.
pub struct NodeSvc {
    side: Arc<GitlabSide>,
}

impl NodeSvc {
    pub fn new(side: Arc<GitlabSide>) -> NodeSvc {
        NodeSvc { side }
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
        let side = self.side.clone();
        let run = tokio::spawn(
            async move { side.run_post_receive(&req.transaction, req.lease).await }
                .in_current_span(),
        );
        let answer = run
            .await
            .map_err(|e| Status::internal(format!("post-receive's task failed: {e}")))??;
        Ok(Response::new(answer))
    }
}
