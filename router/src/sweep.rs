//! The post-receive sweeper (DESIGN-CHANGES-12.md): GitLab's post-receive of an
//! acknowledged gated write is owed from the txn that ended it
//! (`postreceive-pending/<tx>`); the router that wrote it asks a promoted voter at
//! once, but if it died first nobody would. Every router runs this loop: a marker it
//! has seen for longer than a short grace is asked for under this router's lease, as
//! the finalizing router would (the node's create-only claim, compared with the
//! marker, keeps it to one run; the run deletes the marker).
//!
//! It decides nothing from another process's clock: the grace counts from when this
//! router first saw the marker.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refvote_cluster::Store;
use tokio::sync::watch;

use crate::gitlab::{self, PostReceive};
use crate::pool::Pool;

/// How often the markers are read.
const INTERVAL: Duration = Duration::from_secs(1);

/// Settings of the sweeper.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// How long a marker must have been seen before this router asks for it: long
    /// enough for the finalizing router's own ask to have claimed it.
    pub grace: Duration,
}

/// Deletes transaction `tx`'s pending marker and claim; logged if etcd refuses.
pub async fn finish(store: &Store, tx: &str) {
    if let Err(e) = store.finish_post_receive(tx).await {
        tracing::warn!(tx, error = %e, "cannot delete the pending post-receive marker; a sweeper will ask again");
    }
}

/// Runs for the router's life (see the module comment).
pub async fn run(
    store: Store,
    pool: Arc<Pool>,
    mut lease: watch::Receiver<Option<i64>>,
    config: SweepConfig,
) {
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        let current = *lease.borrow_and_update();
        if let Some(lease) = current {
            match store.pending_post_receives().await {
                Ok(pending) => {
                    seen.retain(|id, _| pending.iter().any(|p| &p.id == id));
                    for p in pending {
                        let first = *seen.entry(p.id.clone()).or_insert_with(Instant::now);
                        if first.elapsed() < config.grace
                            || !busy.lock().expect("poisoned").insert(p.id.clone())
                        {
                            continue;
                        }
                        let (store, pool, busy) = (store.clone(), pool.clone(), busy.clone());
                        tokio::spawn(async move {
                            sweep_one(&store, &pool, &p, lease).await;
                            busy.lock().expect("poisoned").remove(&p.id);
                        });
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot read the pending post-receives"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = lease.changed() => {}
        }
    }
}

/// Asks for one pending post-receive.
async fn sweep_one(
    store: &Store,
    pool: &Pool,
    pending: &refvote_cluster::records::PendingPostReceive,
    lease: i64,
) {
    let tx = &pending.id;
    let view = match store.repo_view(&pending.repo).await {
        Ok(v) => v,
        Err(refvote_cluster::Error::UnknownRepo(_)) => {
            tracing::warn!(tx, repo = %pending.repo, "the repository of a pending post-receive is gone; dropping it");
            finish(store, tx).await;
            return;
        }
        Err(e) => {
            tracing::debug!(tx, error = %e, "cannot read the repository of a pending post-receive");
            return;
        }
    };
    tracing::info!(tx, repo = %pending.repo, finalized_by = %pending.finalized_by, "running a post-receive its router did not ask for");
    match gitlab::run_post_receive(pool, Some(&view), pending, lease).await {
        PostReceive::Ran(_) => {
            tracing::info!(tx, "swept post-receive ran");
            finish(store, tx).await;
        }
        PostReceive::Nowhere => finish(store, tx).await,
        PostReceive::NotHere | PostReceive::Failed => {}
    }
}
