//! Voting on a key (DESIGN.md §2 step 5): the vote's one txn, the watch a waiting vote
//! keeps, and the create-only abort.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use tokio::time::Instant;

use crate::decide::vote::{self, KeyView, Next};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::quorum::KeyState;
use crate::records::{Decision, TxRecord, VerdictRecord, VoteRecord};
use crate::store::{Entry, Store, by_tail, encode, get_op, get_prefix_op, ranges, revision};

/// Aborts a spawned task when dropped (a vote that needs no watch cancels its opening).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One vote key's [`KeyView`] and the revision it is current at: built from one read,
/// then kept current from the watch's events, so a waiting vote never re-reads.
#[derive(Debug)]
pub(crate) struct KeySnapshot {
    pub(crate) revision: i64,
    pub(crate) view: KeyView,
}

impl KeySnapshot {
    /// Applies one watch event; returns whether it can change the evaluation.
    pub(crate) fn apply(
        &mut self,
        keys: &Keys,
        tx: &str,
        vote_key: &str,
        ev: &etcd_client::Event,
    ) -> Result<bool> {
        let Some(kv) = ev.kv() else { return Ok(false) };
        let k = String::from_utf8_lossy(kv.key()).into_owned();
        let put = ev.event_type() == EventType::Put;
        if let Some(voter) = k.strip_prefix(&keys.votes(tx, vote_key)) {
            if put {
                let v: VoteRecord =
                    serde_json::from_slice(kv.value()).map_err(|source| Error::Corrupt {
                        key: k.clone(),
                        source,
                    })?;
                self.view.key.votes.insert(voter.to_owned(), v.hash);
            }
        } else if k == keys.decided(tx, vote_key) {
            if put {
                self.view.aborted =
                    Some(
                        serde_json::from_slice(kv.value()).map_err(|source| Error::Corrupt {
                            key: k.clone(),
                            source,
                        })?,
                    );
            }
        } else if k == keys.verdict(tx) {
            if put {
                let v: VerdictRecord =
                    serde_json::from_slice(kv.value()).map_err(|source| Error::Corrupt {
                        key: k.clone(),
                        source,
                    })?;
                self.view.verdict = Some(v);
            }
        } else if let Some(voter) = k.strip_prefix(&keys.all_done(tx)) {
            self.view.done.insert(voter.to_owned());
        } else if let Some(voter) = k.strip_prefix(&keys.all_started(tx)) {
            self.view.started.insert(voter.to_owned());
        } else if k == keys.tx_alive(tx) {
            self.view.alive = put;
        } else if k == keys.tx_record(tx) {
            if !put {
                self.view.record = None;
            }
        } else if let Some(node) = k.strip_prefix(&keys.nodes()) {
            if put {
                self.view.node_leases.insert(node.to_owned(), kv.lease());
            } else {
                self.view.node_leases.remove(node);
            }
        } else {
            return Ok(false);
        }
        self.revision = self.revision.max(kv.mod_revision());
        Ok(true)
    }
}
impl Store {
    /// The reads that evaluate one key, in one transaction: the record, the alive
    /// marker, the votes on the key, its decision, done and started voters, the nodes,
    /// GitLab's verdict.
    fn key_reads(&self, tx: &str, key: &str) -> Vec<TxnOp> {
        let keys = self.keys();
        vec![
            get_op(&keys.tx_record(tx)),
            get_op(&keys.tx_alive(tx)),
            get_prefix_op(&keys.votes(tx, key)),
            get_op(&keys.decided(tx, key)),
            get_prefix_op(&keys.all_done(tx)),
            get_prefix_op(&keys.all_started(tx)),
            get_prefix_op(&keys.nodes()),
            get_op(&keys.verdict(tx)),
        ]
    }

    fn key_snapshot(&self, tx: &str, key: &str, r: &[Vec<Entry>], rev: i64) -> Result<KeySnapshot> {
        let keys = self.keys();
        let record: Option<TxRecord> = match r[0].first() {
            Some(e) => Some(e.decode()?),
            None => None,
        };
        let mut state = KeyState::default();
        for (voter, e) in by_tail(&r[2], &keys.votes(tx, key)) {
            let vote: VoteRecord = e.decode()?;
            state.votes.insert(voter, vote.hash);
        }
        let aborted = match r[3].first() {
            Some(e) => Some(e.decode()?),
            None => None,
        };
        let verdict = match r[7].first() {
            Some(e) => Some(e.decode()?),
            None => None,
        };
        let view = KeyView {
            record,
            alive: !r[1].is_empty(),
            started: by_tail(&r[5], &keys.all_started(tx)).into_keys().collect(),
            done: by_tail(&r[4], &keys.all_done(tx)).into_keys().collect(),
            node_leases: by_tail(&r[6], &keys.nodes())
                .into_iter()
                .map(|(n, e)| (n, e.lease))
                .collect(),
            key: state,
            aborted,
            verdict,
        };
        Ok(KeySnapshot {
            revision: rev,
            view,
        })
    }

    pub(crate) async fn read_key(&self, tx: &str, key: &str) -> Result<KeySnapshot> {
        let resp = self
            .txn(Txn::new().and_then(self.key_reads(tx, key)))
            .await?;
        self.key_snapshot(tx, key, &ranges(&resp), revision(&resp))
    }

    /// Opens the watch a waiting vote needs: the transaction's keys and the nodes. It
    /// starts at the current revision, which keeps it in etcd's "synced" group (a watch
    /// that starts in the past is caught up by a loop that runs only every 100 ms).
    /// Returns the stream and the revision it starts after.
    pub(crate) async fn vote_watch(
        &self,
        tx: &str,
    ) -> Result<(etcd_client::WatchStream, i64, Vec<etcd_client::Event>)> {
        let (tx_prefix, nodes_prefix) = (self.keys().tx(tx), self.keys().nodes());
        self.request(|mut c| {
            let (tx_prefix, nodes_prefix) = (tx_prefix.clone(), nodes_prefix.clone());
            async move {
                let mut stream = c
                    .watch(tx_prefix, Some(WatchOptions::new().with_prefix()))
                    .await?;
                stream
                    .watch(nodes_prefix, Some(WatchOptions::new().with_prefix()))
                    .await?;
                let mut created = 0;
                let mut rev = i64::MAX;
                let mut early = Vec::new();
                while created < 2 {
                    match stream.message().await? {
                        Some(m) if m.created() => {
                            created += 1;
                            rev = rev.min(m.header().map(|h| h.revision()).unwrap_or(0));
                        }
                        // Events of the first watch before the second is created.
                        Some(m) => early.extend(m.events().iter().cloned()),
                        None => return Err(etcd_client::Error::WatchError("watch closed".into())),
                    }
                }
                Ok((stream, rev, early))
            }
        })
        .await
    }

    /// Records `voter`'s vote on `key` of transaction `tx` and waits for the key's
    /// decision. A key commits the moment threshold voters have voted the same hash:
    /// the vote that completes the majority is the decision, and everyone sees it in
    /// the votes. A key aborts through one create-only write of `decided/<key>`, made
    /// by whoever first sees that no hash can reach threshold, and only while no new
    /// vote arrived (see [`Store::abort_key`]). Returns the decision and the record.
    /// `Err` means this voter must abort without a decision: etcd unreachable, the
    /// transaction unknown, finished or abandoned, the voter not started in it, or no
    /// decision within `wait`.
    pub async fn cast_vote(
        &self,
        tx: &str,
        voter: &str,
        key: &str,
        vote: &VoteRecord,
        wait: Duration,
    ) -> Result<(Decision, TxRecord)> {
        let deadline = Instant::now() + wait;
        let keys = self.keys();
        let t0 = Instant::now();
        let txn = Txn::new()
            .when([
                Compare::create_revision(keys.started(tx, voter), CompareOp::Greater, 0),
                Compare::create_revision(keys.tx_alive(tx), CompareOp::Greater, 0),
                Compare::create_revision(keys.decided(tx, key), CompareOp::Equal, 0),
                Compare::create_revision(keys.vote(tx, key, voter), CompareOp::Equal, 0),
                // A voter reported done (by itself, or by a router that saw its call
                // fail) votes no more: everyone already counts it as "no".
                Compare::create_revision(keys.done(tx, voter), CompareOp::Equal, 0),
            ])
            .and_then(
                std::iter::once(TxnOp::put(keys.vote(tx, key, voter), encode(vote), None))
                    .chain(self.key_reads(tx, key))
                    .collect::<Vec<_>>(),
            )
            .or_else(self.key_reads(tx, key));
        // The watch opens alongside the vote, so a vote that has to wait starts waiting
        // at once; whatever happened before it opened is in the vote's reads.
        let mut watcher = {
            let (store, tx) = (self.clone(), tx.to_owned());
            AbortOnDrop(tokio::spawn(async move { store.vote_watch(&tx).await }))
        };
        let resp = self.txn(txn).await?;
        let stored = resp.succeeded();
        if stored {
            crate::faults::reach(crate::faults::AFTER_VOTE_RECORDED).await;
        }
        let mut snap = self.key_snapshot(tx, key, &ranges(&resp), revision(&resp))?;
        tracing::debug!(
            key,
            vote_txn_us = t0.elapsed().as_micros() as u64,
            "vote stored"
        );
        let record = vote::admitted(&snap.view, tx, voter, stored)?.clone();
        match vote::next(&snap.view, voter) {
            Next::Adopt(d) => return Ok((d, record)),
            Next::Commit(d) => {
                // The common case for all but the first voters: no need to wait.
                tracing::debug!(
                    key,
                    total_us = t0.elapsed().as_micros() as u64,
                    "majority seen"
                );
                return Ok((d, record));
            }
            // Aborting, fencing or waiting: once the watch is open.
            Next::Abort(_) | Next::Fence(_) | Next::Wait | Next::Gone => {}
        }
        let watch = match (&mut watcher.0).await {
            Ok(r) => r,
            Err(e) => Err(Error::Invalid(format!("vote watch task failed: {e}"))),
        };
        let mut watch = match watch {
            Ok((stream, from, early)) => {
                if from > snap.revision {
                    // Opened after the vote's reads: read again so nothing is missed.
                    snap = self.read_key(tx, key).await?;
                }
                for ev in &early {
                    snap.apply(keys, tx, key, ev)?;
                }
                Some(stream)
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not open the vote watch; will retry if needed");
                None
            }
        };
        let mut race_checked = false;
        loop {
            match vote::next(&snap.view, voter) {
                Next::Adopt(d) => return Ok((d, record)),
                Next::Gone => return Err(Error::UnknownTx(tx.to_owned())),
                Next::Commit(d) => {
                    tracing::debug!(
                        key,
                        total_us = t0.elapsed().as_micros() as u64,
                        "majority seen"
                    );
                    return Ok((d, record));
                }
                Next::Abort(d) => {
                    if let Some(d) = self
                        .abort_key(&record, key, &snap.view.key, d, None)
                        .await?
                    {
                        return Ok((d, record));
                    }
                    // A vote arrived meanwhile: evaluate again with it.
                    snap = self.read_key(tx, key).await?;
                    continue;
                }
                Next::Fence(v) => {
                    // The designated voter can give no verdict: whatever is stored now
                    // (this deny, or a verdict that landed first) decides.
                    self.fence_verdict(&record, &v).await?;
                    snap = self.read_key(tx, key).await?;
                    continue;
                }
                Next::Wait if !race_checked => {
                    // A vote that has to wait may be one side of a race on these refs
                    // (DESIGN.md §9): settle it beside the wait, so a vote with no rival
                    // waits no longer for it, and to its end, so an abort of a rival is
                    // not cut off when this vote's own wait ends first.
                    race_checked = true;
                    let (store, record, key, voter, vote) = (
                        self.clone(),
                        record.clone(),
                        key.to_owned(),
                        voter.to_owned(),
                        vote.clone(),
                    );
                    tokio::spawn(async move {
                        if let Err(e) = store.settle_race(&record, &key, &voter, &vote).await {
                            tracing::debug!(error = %e, "could not check for racing writes");
                        }
                    });
                }
                Next::Wait => {}
            }
            // Wait for anything that can change the evaluation: a vote, an abort, a
            // voter finishing, a node losing its lease, the transaction ending.
            let Some(stream) = watch.as_mut() else {
                let (stream, _, _) = self.vote_watch(tx).await?;
                watch = Some(stream);
                // Anything between the last read and the new watch: read again.
                snap = self.read_key(tx, key).await?;
                continue;
            };
            loop {
                let msg = tokio::time::timeout_at(deadline, stream.message())
                    .await
                    .map_err(|_| Error::NoDecision(wait))?;
                let msg = match msg {
                    Ok(Some(msg)) if !msg.canceled() => msg,
                    // The endpoint failed or cancelled the watch: re-watch, re-read.
                    other => {
                        tracing::debug!(?other, "vote watch ended; re-watching");
                        self.fail_over();
                        watch = None;
                        break;
                    }
                };
                let mut changed = false;
                for ev in msg.events() {
                    changed |= snap.apply(keys, tx, key, ev)?;
                }
                if changed {
                    break;
                }
            }
        }
    }

    /// Writes an abort decision for `key`, but only while every voter that had not
    /// voted in `seen` still has not: a vote that lands first may complete a majority,
    /// and then the key commits instead. Returns the stored abort, or `None` when a
    /// vote arrived and the caller must evaluate again. `fence` adds a compare (the
    /// reaper's role).
    pub async fn abort_key(
        &self,
        record: &TxRecord,
        key: &str,
        seen: &KeyState,
        decision: Decision,
        fence: Option<Compare>,
    ) -> Result<Option<Decision>> {
        let keys = self.keys();
        let k = keys.decided(&record.id, key);
        let mut cmp = vec![Compare::create_revision(k.as_str(), CompareOp::Equal, 0)];
        for v in record
            .voters
            .iter()
            .filter(|v| !seen.votes.contains_key(*v))
        {
            cmp.push(Compare::create_revision(
                keys.vote(&record.id, key, v),
                CompareOp::Equal,
                0,
            ));
        }
        cmp.extend(fence);
        let txn = Txn::new()
            .when(cmp)
            .and_then([TxnOp::put(k.as_str(), encode(&decision), None)])
            .or_else([get_op(&k)]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            tracing::debug!(tx = %record.id, key, by = %decision.by, reason = %decision.reason, "aborted");
            return Ok(Some(decision));
        }
        match ranges(&resp)[0].first() {
            Some(e) => Ok(Some(e.decode()?)),
            None => Ok(None),
        }
    }
}
