//! Whether this router can do its job, told to load balancers: gRPC health
//! (`grpc.health.v1`, the service `""`) and the HTTP front's `GET /-/readiness` and
//! `/-/liveness` (GitLab's names) answer from one verdict.
//!
//! The router serves when it holds its etcd lease (writes are bound to it), etcd
//! answered a linearizable read within the request deadline at the last probe (reads
//! confirm with etcd), and it is not draining (SIGTERM). Anything else is NOT_SERVING /
//! 503 with the reason, so a balancer stops sending to a router that would only refuse.
//! The verdict is a pure function of those three inputs ([`assess`]); a background task
//! ([`Health::start`]) probes etcd every [`PROBE_INTERVAL`] and republishes it on every
//! change. This module does not stop or refuse calls itself: draining is the server's.

use std::sync::Arc;
use std::time::Duration;

use refvote_cluster::Store;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// How often etcd is probed (each probe bounded by the etcd request deadline).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// What the verdict is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    /// The router holds its etcd lease.
    pub lease: bool,
    /// etcd answered the last probe within its deadline.
    pub etcd: bool,
    /// SIGTERM was received: the router is finishing what it has.
    pub draining: bool,
}

/// Serving, or not and why (the reason a balancer's operator reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Serving,
    NotServing(String),
}

impl Verdict {
    pub fn serving(&self) -> bool {
        *self == Verdict::Serving
    }
}

/// The verdict for `inputs`; the first failing input names the reason, draining first
/// (it is final).
pub fn assess(inputs: Inputs, etcd_timeout: Duration) -> Verdict {
    if inputs.draining {
        Verdict::NotServing("draining: this router is shutting down".into())
    } else if !inputs.etcd {
        Verdict::NotServing(format!(
            "etcd did not answer within {} ms",
            etcd_timeout.as_millis()
        ))
    } else if !inputs.lease {
        Verdict::NotServing("no etcd lease: writes cannot be bound to this router".into())
    } else {
        Verdict::Serving
    }
}

/// The published verdict and the drain switch.
pub struct Health {
    verdict: watch::Receiver<Verdict>,
    draining: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Health {
    /// Starts probing `store` and following `lease`; `reporter` (gRPC health) is kept
    /// in step with the verdict. Not serving until the first probe answers.
    pub fn start(
        store: Store,
        probe_key: String,
        lease: watch::Receiver<Option<i64>>,
        reporter: HealthReporter,
    ) -> Arc<Health> {
        let first = Verdict::NotServing("starting: etcd not probed yet".into());
        let (tx, verdict) = watch::channel(first);
        let (draining, draining_rx) = watch::channel(false);
        let task = tokio::spawn(run(store, probe_key, lease, draining_rx, reporter, tx));
        Arc::new(Health {
            verdict,
            draining,
            task,
        })
    }

    /// The current verdict.
    pub fn verdict(&self) -> Verdict {
        self.verdict.borrow().clone()
    }

    /// A receiver of every change, for tests and the metrics.
    pub fn subscribe(&self) -> watch::Receiver<Verdict> {
        self.verdict.clone()
    }

    /// Waits up to `wait` for the router to serve (the first etcd probe answered and
    /// the lease held); returns the verdict then.
    pub async fn settle(&self, wait: Duration) -> Verdict {
        let mut rx = self.verdict.clone();
        let _ = tokio::time::timeout(wait, rx.wait_for(Verdict::serving)).await;
        self.verdict()
    }

    /// Turns the verdict NOT_SERVING for good, at once.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    pub fn draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Waits until the drain is published (the gRPC reporter updated too).
    pub async fn drained(&self) {
        let mut rx = self.verdict.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            rx.wait_for(|v| matches!(v, Verdict::NotServing(r) if r.starts_with("draining"))),
        )
        .await;
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    store: Store,
    probe_key: String,
    mut lease: watch::Receiver<Option<i64>>,
    mut draining: watch::Receiver<bool>,
    reporter: HealthReporter,
    tx: watch::Sender<Verdict>,
) {
    let timeout = store.timeout();
    // Probing runs apart, so a probe waiting on a dead etcd delays no other input.
    let (etcd_tx, mut etcd) = watch::channel(false);
    let prober = tokio::spawn(probe(store, probe_key, etcd_tx));
    let _stop_prober = AbortOnDrop(prober);
    let mut inputs = Inputs {
        lease: lease.borrow().is_some(),
        etcd: false,
        draining: *draining.borrow(),
    };
    let mut lease_open = true;
    loop {
        tokio::select! {
            changed = etcd.changed() => {
                if changed.is_err() {
                    return;
                }
                inputs.etcd = *etcd.borrow_and_update();
            }
            changed = lease.changed(), if lease_open => {
                // A closed channel: the session is gone (shutdown), no lease any more.
                lease_open = changed.is_ok();
                inputs.lease = lease_open && lease.borrow_and_update().is_some();
            }
            changed = draining.changed() => {
                if changed.is_err() {
                    return;
                }
                inputs.draining = *draining.borrow_and_update();
            }
        }
        let verdict = assess(inputs, timeout);
        if *tx.borrow() != verdict {
            match &verdict {
                Verdict::Serving => tracing::info!("ready"),
                Verdict::NotServing(why) => tracing::warn!(reason = %why, "not ready"),
            }
            let status = match verdict {
                Verdict::Serving => ServingStatus::Serving,
                Verdict::NotServing(_) => ServingStatus::NotServing,
            };
            tx.send_replace(verdict);
            reporter.set_service_status("", status).await;
        }
    }
}

/// Reads `key` linearizably (answered only through a leader with a quorum) every
/// [`PROBE_INTERVAL`], each read bounded by the store's deadline; publishes whether
/// the last one answered.
async fn probe(store: Store, key: String, tx: watch::Sender<bool>) {
    loop {
        let result = store
            .request(|mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await;
        if let Err(e) = &result
            && *tx.borrow()
        {
            tracing::warn!(error = %e, "etcd probe failed");
        }
        tx.send_replace(result.is_ok());
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(1000);

    fn inputs(lease: bool, etcd: bool, draining: bool) -> Inputs {
        Inputs {
            lease,
            etcd,
            draining,
        }
    }

    #[test]
    fn serves_only_with_lease_etcd_and_no_drain() {
        assert!(assess(inputs(true, true, false), T).serving());
        for (l, e, d) in [
            (false, true, false),
            (true, false, false),
            (true, true, true),
            (false, false, false),
            (false, false, true),
        ] {
            assert!(!assess(inputs(l, e, d), T).serving(), "{l} {e} {d}");
        }
    }

    #[test]
    fn the_reason_names_the_first_failing_input() {
        let why = |v: Verdict| match v {
            Verdict::NotServing(w) => w,
            Verdict::Serving => panic!("serving"),
        };
        assert!(why(assess(inputs(false, false, true), T)).starts_with("draining"));
        assert_eq!(
            why(assess(inputs(false, false, false), T)),
            "etcd did not answer within 1000 ms"
        );
        assert!(why(assess(inputs(false, true, false), T)).starts_with("no etcd lease"));
    }
}
