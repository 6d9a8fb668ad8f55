//! The reaper: finishes transactions whose creator's lease expired (DESIGN.md §2 step
//! 8). Any process may run it; one at a time holds the `reaper` key under its lease, and
//! its abort writes compare that key, so a reaper that lost it writes nothing.
//!
//! It waits for voters that started to report done, but not forever: once abandoned, a
//! transaction takes no new votes, so a started voter can only still confirm what was
//! already decided. A voter that has not reported [`VOTER_GRACE`] after this reaper
//! first saw the transaction abandoned is reported done (failed) by the reaper, which
//! fences it (it can vote no more) and lets the transaction end; if it did apply a
//! decided update without confirming it, it is marked outdated and repaired.

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::watch;

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::records::TxRecord;
use crate::store::{Store, get_op, ranges};

#[derive(Debug, Clone)]
pub struct ReaperConfig {
    /// Who reaps, for records and logs.
    pub id: String,
    /// How often to scan for abandoned transactions.
    pub interval: Duration,
}

/// How long the reaper waits for a started voter of an abandoned transaction to
/// report done before it reports it failed itself.
pub const VOTER_GRACE: Duration = Duration::from_secs(20);

/// Abandoned transactions this reaper is waiting on, and since when.
pub type Waiting = BTreeMap<String, Instant>;

/// Runs until the task is dropped. `lease` is the owner's session lease.
pub async fn run(store: Store, mut lease: watch::Receiver<Option<i64>>, config: ReaperConfig) {
    let by = format!("reaper:{}", config.id);
    let mut waiting = Waiting::new();
    loop {
        let current = *lease.borrow_and_update();
        if let Some(id) = current {
            match scan(&store, id, &by, &mut waiting, VOTER_GRACE).await {
                Ok(n) if n > 0 => tracing::info!(reaped = n, "reaped abandoned transactions"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "reaper scan failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = lease.changed() => {}
        }
    }
}

/// One pass: takes (or confirms) the reaper role, then reaps every open transaction
/// whose alive marker is gone. Returns how many were finalized. `waiting` remembers
/// across passes since when each transaction has waited for its voters; one waiting
/// longer than `grace` has its silent voters reported failed.
pub async fn scan(
    store: &Store,
    lease: i64,
    by: &str,
    waiting: &mut Waiting,
    grace: Duration,
) -> Result<usize> {
    let keys = store.keys();
    let role = keys.reaper();
    let txn = Txn::new()
        .when([Compare::create_revision(role.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            role.as_str(),
            by.as_bytes(),
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([get_op(&role)]);
    let resp = store.txn(txn).await?;
    if !resp.succeeded() {
        let holder = ranges(&resp)[0].first().map(|e| e.lease);
        if holder != Some(lease) {
            return Ok(0);
        }
    }
    let (index, _) = store.get_prefix(&keys.txrepo_all()).await?;
    let open: BTreeSet<&str> = index
        .iter()
        .filter_map(|e| e.key.rsplit('/').next())
        .collect();
    waiting.retain(|id, _| open.contains(id.as_str()));
    let mut reaped = 0;
    for entry in &index {
        let Some(id) = entry.key.rsplit('/').next() else {
            continue;
        };
        let resp = store
            .txn(Txn::new().and_then([get_op(&keys.tx_record(id)), get_op(&keys.tx_alive(id))]))
            .await?;
        let r = ranges(&resp);
        let (Some(rec), true) = (r[0].first(), r[1].is_empty()) else {
            continue;
        };
        let record: TxRecord = rec.decode()?;
        let since = *waiting.entry(id.to_owned()).or_insert_with(Instant::now);
        match reap(store, &record, lease, by).await {
            Ok(()) => {
                reaped += 1;
                waiting.remove(id);
            }
            Err(Error::NotFinished { waiting: why, .. }) if since.elapsed() >= grace => {
                tracing::warn!(
                    tx = id,
                    why,
                    "abandoned transaction's voters are silent; reporting them failed"
                );
                give_up_on_silent_voters(store, &record, since.elapsed()).await?;
                match store.try_finalize(&record.id, by, lease).await {
                    Ok(_) => {
                        reaped += 1;
                        waiting.remove(id);
                    }
                    Err(e) => tracing::warn!(tx = id, error = %e, "reaping failed"),
                }
            }
            Err(Error::NotFinished { waiting: why, .. }) => {
                tracing::debug!(tx = id, why, "abandoned transaction waits for its voters")
            }
            Err(e) => tracing::warn!(tx = id, error = %e, "reaping failed"),
        }
    }
    Ok(reaped)
}

/// Reports done (failed) every voter of `record` that has not reported. Create-only:
/// a report that lands first stands.
async fn give_up_on_silent_voters(
    store: &Store,
    record: &TxRecord,
    waited: Duration,
) -> Result<()> {
    let detail = format!(
        "no report {:.0} s after the transaction was abandoned; the reaper gave up on it",
        waited.as_secs_f64()
    );
    for voter in &record.voters {
        store
            .fail_voter(&record.id, voter, "reaper", &detail)
            .await?;
    }
    Ok(())
}

/// Aborts every undecided key of an abandoned transaction, then finalizes it.
async fn reap(store: &Store, record: &TxRecord, lease: i64, by: &str) -> Result<()> {
    let keys = store.keys();
    let (entries, _) = store.get_prefix(&keys.tx(&record.id)).await?;
    let state = crate::tx::finalize::tx_state(keys, record, &entries)?;
    for (key, mut decision) in state.undecided(record, by) {
        decision.reason = format!("{}; transaction abandoned by its router", decision.reason);
        // Fenced by the reaper role; a vote that lands first wins (the next scan sees it).
        let fence = Compare::lease(keys.reaper(), CompareOp::Equal, lease);
        store
            .abort_key(record, &key, &state.votes[&key], decision, Some(fence))
            .await?;
    }
    store.try_finalize(&record.id, by, lease).await?;
    tracing::info!(tx = %record.id, repo = %record.repo, "abandoned transaction finalized");
    Ok(())
}
