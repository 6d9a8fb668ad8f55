//! An etcd lease kept alive in the background. Its current id (or `None` while it is
//! lost) is published on a `watch` channel; after a loss a new lease is granted and the
//! owner's registration runs again, so the process recovers when etcd comes back.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::Result;
use crate::store::Store;

/// A lease and the task that keeps it.
pub struct Session {
    lease: watch::Receiver<Option<i64>>,
    task: JoinHandle<()>,
    store: Store,
}

impl Session {
    /// Grants a lease of `ttl` and keeps it alive; `on_grant` runs after every grant
    /// (e.g. to put the node's record under the lease) before the lease is published.
    pub fn start<F, Fut>(store: Store, ttl: Duration, on_grant: F) -> Session
    where
        F: Fn(i64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(keep(store.clone(), ttl, on_grant, tx));
        Session {
            lease: rx,
            task,
            store,
        }
    }

    /// The lease currently held, if any.
    pub fn lease(&self) -> Option<i64> {
        *self.lease.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<i64>> {
        self.lease.clone()
    }

    /// Waits until a lease is held, up to `wait`.
    pub async fn wait_for_lease(&self, wait: Duration) -> Option<i64> {
        let mut rx = self.lease.clone();
        let r = tokio::time::timeout(wait, rx.wait_for(|l| l.is_some())).await;
        r.ok().and_then(|r| r.ok().and_then(|l| *l))
    }

    /// Stops keeping the lease and revokes it, so everything bound to it goes at once.
    pub async fn close(self) {
        self.task.abort();
        if let Some(id) = *self.lease.borrow() {
            let _ = self
                .store
                .request(|mut c| async move { c.lease_revoke(id).await })
                .await;
        }
    }
}

/// The longest pause between two tries at a lease while etcd does not answer (the
/// pauses end early when etcd answers another request, [`Store::pause`]).
const RETRY_CAP: Duration = Duration::from_millis(500);

async fn keep<F, Fut>(store: Store, ttl: Duration, on_grant: F, tx: watch::Sender<Option<i64>>)
where
    F: Fn(i64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let mut backoff = Duration::from_millis(100);
    loop {
        let granted = match store
            .request(|mut c| async move { c.lease_grant(ttl_secs, None).await })
            .await
        {
            Ok(g) => g.id(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot grant an etcd lease; retrying");
                store.pause(backoff).await;
                backoff = (backoff * 2).min(RETRY_CAP);
                continue;
            }
        };
        if let Err(e) = on_grant(granted).await {
            tracing::warn!(error = %e, lease = granted, "registration under a new lease failed; retrying");
            store.pause(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        tracing::info!(lease = granted, "etcd lease granted");
        tx.send_replace(Some(granted));
        hold(&store, granted, ttl, &tx).await;
        tx.send_replace(None);
        tracing::warn!(lease = granted, "etcd lease lost; granting a new one");
    }
}

/// Keeps `lease` alive until etcd says it is gone.
///
/// Renews every third of the TTL. A renewal that fails or hangs (its member died, is
/// frozen, or has no leader during an election) is given up to a period (a loaded etcd
/// may take most of one to answer), then the next endpoint is tried at once: one stuck
/// member must not cost the lease (it did when a failure waited a whole period before
/// the next try, which left no second chance within a 3 s lease).
///
/// Once a whole TTL passed without a renewal the lease may be gone, so it is no longer
/// published (`None`: nothing new may be bound to it), but it is not given up: etcd
/// expires leases only while it has a leader, and a new leader extends every lease, so
/// after an etcd majority outage the lease is usually still there. Renewals go on; the
/// first that succeeds publishes it again (everything bound to it is still in place),
/// and only etcd's answer that it expired ends it. Giving it up on the client's clock
/// made every node and router of a cluster drop its lease after a long outage, and the
/// transactions open then were finalized as if all their voters had failed (the fault
/// suite saw every replica of a repository marked outdated that way).
async fn hold(store: &Store, lease: i64, ttl: Duration, published: &watch::Sender<Option<i64>>) {
    let period = ttl / 3;
    let attempt = period.max(Duration::from_millis(200));
    let retry = Duration::from_millis(100);
    let mut renewed = Instant::now();
    let mut stream = None;
    let mut wait = period;
    loop {
        tokio::time::sleep(wait).await;
        let mut left = ttl.saturating_sub(renewed.elapsed());
        if left.is_zero() {
            if published.borrow().is_some() {
                tracing::warn!(
                    lease,
                    "no etcd lease renewal for a whole TTL; holding nothing new until etcd answers"
                );
                published.send_replace(None);
            }
            left = attempt;
        }
        // Unless this renewal succeeds, try again soon.
        wait = retry;
        if stream.is_none() {
            match store
                .request(|mut c| async move { c.lease_keep_alive(lease).await })
                .await
            {
                Ok(s) => stream = Some(s),
                Err(e) if expired(&e.to_string()) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "keep-alive stream failed");
                    continue;
                }
            }
        }
        let (keeper, responses) = stream.as_mut().expect("just set");
        let renewal = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(attempt.min(left), renewal).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                store.answered();
                renewed = Instant::now();
                wait = period;
                if published.borrow().is_none() {
                    tracing::info!(lease, "etcd answered again; the lease is still held");
                    published.send_replace(Some(lease));
                }
            }
            Ok(Ok(Some(_))) => return, // etcd says the lease expired
            Ok(Err(e)) if expired(&e.to_string()) => return,
            other => {
                tracing::debug!(?other, "keep-alive failed; trying another endpoint");
                store.unanswered();
                store.fail_over();
                stream = None;
            }
        }
    }
}

/// Whether an error from etcd says the lease no longer exists (etcd answers a renewal
/// of an expired lease with "requested lease not found").
fn expired(error: &str) -> bool {
    error.contains("lease not found")
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_lease_not_found_means_expired() {
        assert!(super::expired("lease keep alive error: lease not found"));
        assert!(super::expired(
            "grpc request error: code: 'Not found', message: \"etcdserver: requested lease not found\""
        ));
        assert!(!super::expired(
            "etcd did not answer within 1s (no quorum, or unreachable)"
        ));
        assert!(!super::expired("etcdserver: no leader"));
    }
}
