//! One consumer per target storage at a time. The cache dir's lock file keeps two runs
//! on one host apart; two hosts (two timers pointed at one cluster, or an operator's
//! run beside the timer) meet only in the target cluster's etcd. Before applying,
//! a consumer creates `psync/consumer/<virtual storage>` bound to its own lease
//! (create-only: a second consumer is refused, told who holds it); every record of
//! an applied sequence is written only while that key is still bound to the lease,
//! so a consumer that lost its claim (paused past the lease, cut from etcd) and
//! resumed records nothing over the one that took over. A consumer that crashes
//! leaves the claim until its lease expires ([`TTL`]); one that ends revokes it.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use refvote_cluster::session::Session;
use refvote_cluster::store::{Store, encode};
use refvote_psync::cli::{EXIT_BUSY, Refused};
use refvote_psync::context::now;
use refvote_psync::report::EXIT_UNAVAILABLE;
use serde::{Deserialize, Serialize};

/// How long a crashed consumer's claim outlives it.
pub const TTL: Duration = Duration::from_secs(10);

/// What the claim key holds: for the message a second consumer gets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// Unix seconds.
    pub since: u64,
}

/// A held claim on one virtual storage of the target cluster.
pub struct Claim {
    session: Session,
    lease: i64,
    key: String,
}

impl Claim {
    /// Takes the claim on `virtual_storage`, or says who has it.
    pub async fn take(store: &Store, virtual_storage: &str) -> Result<Claim, Refused> {
        let key = store.keys().psync_consumer(virtual_storage);
        let unavailable = |what: &str| Refused {
            code: EXIT_UNAVAILABLE,
            message: format!(
                "target.node_config: {what} in the target cluster's etcd; check that a majority of its members run"
            ),
        };
        let session = Session::start(store.clone(), TTL, |_| async { Ok(()) });
        let Some(lease) = session.wait_for_lease(store.timeout() * 3).await else {
            session.close().await;
            return Err(unavailable("cannot take a lease for the consumer's claim"));
        };
        let me = Holder {
            host: hostname(),
            pid: std::process::id(),
            since: now(),
        };
        let create = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                encode(&me),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = match store.txn(create).await {
            Ok(r) => r,
            Err(e) => {
                session.close().await;
                return Err(unavailable(&format!("cannot write {key}: {e}")));
            }
        };
        if resp.succeeded() {
            return Ok(Claim {
                session,
                lease,
                key,
            });
        }
        session.close().await;
        let holder = refvote_cluster::store::ranges(&resp)
            .first()
            .and_then(|r| r.first())
            .and_then(|e| e.decode::<Holder>().ok());
        let who = match holder {
            Some(h) => format!("host {} pid {} since unix time {}", h.host, h.pid, h.since),
            None => "a consumer that left no record".into(),
        };
        Err(Refused {
            code: EXIT_BUSY,
            message: format!(
                "another partition-sync consume is applying to storage {virtual_storage:?} of the target cluster ({who}; etcd key {key}); run one consumer per target, or try again when it ends (a crashed consumer's claim expires {} s after it died)",
                TTL.as_secs()
            ),
        })
    }

    /// The condition a record is written under: the claim is still this consumer's.
    pub fn still_held(&self) -> Compare {
        Compare::lease(self.key.clone(), CompareOp::Equal, self.lease)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Gives the claim up at once (the key goes with the lease).
    pub async fn release(self) {
        self.session.close().await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
