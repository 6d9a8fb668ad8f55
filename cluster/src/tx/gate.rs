//! GitLab's verdict in a gated transaction (DESIGN.md §8; the rule is
//! [`crate::decide::verdict`]): the designated voter's create-only put, the fence, the
//! wait of the other voters, the open gated transactions of a repository (where Rails'
//! quarantine callbacks go) and the claim on running post-receive once.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::time::Instant;

use crate::decide::verdict::{self, Await};
use crate::error::{Error, Result};
use crate::records::{PendingPostReceive, TxRecord, VerdictRecord};
use crate::repo::RepoId;
use crate::store::{Store, by_tail, encode, get_op, get_prefix_op, ranges};

/// A vote key no vote ever has (vote keys are hex digits, a dot and a counter): reading
/// it gives a transaction's view without any key's votes.
const NO_KEY: &str = "-";

impl Store {
    /// Stores `verdict`, reached by the designated voter `voter` of transaction `tx`,
    /// unless a verdict exists already (a fence that came first). Refused once `voter`
    /// was reported done (everyone may then have fenced it) or the transaction ended.
    /// Returns the stored verdict, ours or the earlier one.
    pub async fn put_verdict(
        &self,
        tx: &str,
        voter: &str,
        verdict: &VerdictRecord,
    ) -> Result<VerdictRecord> {
        let keys = self.keys();
        let key = keys.verdict(tx);
        let txn = Txn::new()
            .when([
                Compare::create_revision(keys.tx_record(tx), CompareOp::Greater, 0),
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(keys.done(tx, voter), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(key.as_str(), encode(verdict), None)])
            .or_else([
                get_op(&key),
                get_op(&keys.tx_record(tx)),
                get_op(&keys.done(tx, voter)),
            ]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            tracing::debug!(tx, allow = verdict.allow, "verdict stored");
            return Ok(verdict.clone());
        }
        let r = ranges(&resp);
        if let Some(e) = r[0].first() {
            return e.decode();
        }
        if r[1].is_empty() {
            return Err(Error::UnknownTx(tx.to_owned()));
        }
        Err(Error::VoterDone {
            tx: tx.to_owned(),
            voter: voter.to_owned(),
        })
    }

    /// Writes the deny `fence` for transaction `record` unless a verdict exists; returns
    /// the stored verdict.
    pub async fn fence_verdict(
        &self,
        record: &TxRecord,
        fence: &VerdictRecord,
    ) -> Result<VerdictRecord> {
        let keys = self.keys();
        let key = keys.verdict(&record.id);
        let txn = Txn::new()
            .when([
                Compare::create_revision(keys.tx_record(&record.id), CompareOp::Greater, 0),
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(key.as_str(), encode(fence), None)])
            .or_else([get_op(&key)]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            tracing::info!(tx = %record.id, by = %fence.by, message = %fence.message, "verdict fenced");
            return Ok(fence.clone());
        }
        match ranges(&resp)[0].first() {
            Some(e) => e.decode(),
            None => Err(Error::UnknownTx(record.id.clone())),
        }
    }

    /// Waits up to `wait` for the verdict of transaction `tx`, as voter `voter` (whose
    /// git waits in its pre-receive hook, or whose operation waits before its ref
    /// update). Fences the designated voter when it can give no verdict any more. `Err`:
    /// the transaction is unknown or not gated, etcd failed, or no verdict within
    /// `wait` — then the caller refuses on its own, writing nothing.
    pub async fn await_verdict(
        &self,
        tx: &str,
        voter: &str,
        wait: Duration,
    ) -> Result<VerdictRecord> {
        let deadline = Instant::now() + wait;
        let keys = self.keys();
        let mut snap = self.read_key(tx, NO_KEY).await?;
        let mut watch = None;
        loop {
            match verdict::next(&snap.view, voter) {
                Await::Verdict(v) => return Ok(v),
                Await::Gone => return Err(Error::UnknownTx(tx.to_owned())),
                Await::Ungated => {
                    return Err(Error::Invalid(format!(
                        "transaction {tx} is not gated by GitLab's checks: it has no verdict to wait for"
                    )));
                }
                Await::Fence(fence) => {
                    let record = snap.view.record.clone().expect("checked by next");
                    return self.fence_verdict(&record, &fence).await;
                }
                Await::Wait => {}
            }
            let Some(stream) = watch.as_mut() else {
                let (stream, _, _) = self.vote_watch(tx).await?;
                watch = Some(stream);
                // Anything between the read and the watch's start: read again.
                snap = self.read_key(tx, NO_KEY).await?;
                continue;
            };
            let msg = tokio::time::timeout_at(deadline, stream.message())
                .await
                .map_err(|_| Error::NoDecision(wait))?;
            match msg {
                Ok(Some(msg)) if !msg.canceled() => {
                    for ev in msg.events() {
                        snap.apply(keys, tx, NO_KEY, ev)?;
                    }
                }
                other => {
                    tracing::debug!(?other, "verdict watch ended; re-watching");
                    self.fail_over();
                    watch = None;
                }
            }
        }
    }

    /// The verdict of transaction `tx`, if one is stored.
    pub async fn verdict(&self, tx: &str) -> Result<Option<VerdictRecord>> {
        match self.get(&self.keys().verdict(tx)).await? {
            Some(e) => Ok(Some(e.decode()?)),
            None => Ok(None),
        }
    }

    /// The open transactions of `repo` that GitLab's checks gate, newest first: where a
    /// call reading a push's quarantine (Rails, during `/allowed`) must go — to their
    /// designated voters. One read of the index, one of the records.
    pub async fn gated_open_transactions(&self, repo: &RepoId) -> Result<Vec<TxRecord>> {
        let keys = self.keys();
        let resp = self
            .txn(Txn::new().and_then([get_prefix_op(&keys.txrepo(repo))]))
            .await?;
        let mut open: Vec<(i64, String)> = by_tail(&ranges(&resp)[0], &keys.txrepo(repo))
            .into_iter()
            .map(|(id, e)| (e.create_revision, id))
            .collect();
        open.sort_by(|a, b| b.cmp(a));
        let mut out = Vec::new();
        // etcd limits operations per txn (128 by default): read in chunks.
        for chunk in open.chunks(64) {
            let reads: Vec<TxnOp> = chunk
                .iter()
                .map(|(_, id)| get_op(&keys.tx_record(id)))
                .collect();
            let resp = self.txn(Txn::new().and_then(reads)).await?;
            for found in ranges(&resp) {
                if let Some(e) = found.first() {
                    let record: TxRecord = e.decode()?;
                    if record.designated.is_some() {
                        out.push(record);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Claims running GitLab's post-receive of transaction `tx` for `by`, create-only,
    /// on `lease` (the lease of the router that asks: if it dies with the run
    /// unfinished, the claim goes with its lease and a sweeper asks again), and only
    /// while it is still owed (`postreceive-pending/<tx>` exists: once it ran, a late
    /// ask cannot run it again).
    pub async fn claim_post_receive(&self, tx: &str, by: &str, lease: i64) -> Result<Claim> {
        let keys = self.keys();
        let key = keys.post_receive(tx);
        let pending = keys.post_receive_pending(tx);
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(pending.as_str(), CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(key.as_str(), by.as_bytes(), opts)])
            .or_else([get_op(&key), get_op(&pending)]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            return Ok(Claim::Claimed);
        }
        let r = ranges(&resp);
        Ok(match (r[0].first(), r[1].first()) {
            (_, None) => Claim::Finished,
            (Some(e), Some(_)) => Claim::Elsewhere(String::from_utf8_lossy(&e.value).into_owned()),
            // Deleted between the compare and the read: ask again later.
            (None, Some(_)) => Claim::Elsewhere(String::new()),
        })
    }

    /// Post-receive of transaction `tx` is done with (it ran, or nobody can run it):
    /// deletes its pending marker and its claim together.
    pub async fn finish_post_receive(&self, tx: &str) -> Result<()> {
        let keys = self.keys();
        self.txn(Txn::new().and_then([
            TxnOp::delete(keys.post_receive_pending(tx).as_str(), None),
            TxnOp::delete(keys.post_receive(tx).as_str(), None),
        ]))
        .await?;
        Ok(())
    }

    /// The pending post-receive marker of transaction `tx`, if it is still owed.
    pub async fn pending_post_receive(&self, tx: &str) -> Result<Option<PendingPostReceive>> {
        self.get(&self.keys().post_receive_pending(tx))
            .await?
            .map(|e| e.decode())
            .transpose()
    }

    /// Every post-receive still owed, with its marker's entry.
    pub async fn pending_post_receives(&self) -> Result<Vec<PendingPostReceive>> {
        let (entries, _) = self
            .get_prefix(&self.keys().post_receive_pending_all())
            .await?;
        entries.iter().map(|e| e.decode()).collect()
    }
}

/// What [`Store::claim_post_receive`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Ours: run it, then [`Store::finish_post_receive`].
    Claimed,
    /// Someone (named, if known) claimed it and has not finished.
    Elsewhere(String),
    /// Not owed any more: it ran.
    Finished,
}
