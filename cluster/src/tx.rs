//! The transaction protocol (DESIGN.md §2): create, vote and decide, confirm, done,
//! finalize. Every step is one etcd transaction with the compares it relies on; nobody
//! decides from their own clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::time::Instant;

use crate::decide::finalize::{self, RepoRead, Step, TxState};
use crate::decide::vote::{self, KeyView, Next};
use crate::decide::{begin, holds_lease};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::quorum::KeyState;
use crate::records::{
    Decision, DoneRecord, ReplicaRecord, RepoRecord, TxOutcome, TxRecord, VoteRecord,
};
use crate::repo::RepoId;
use crate::repository::put_job_if_absent;
use crate::store::{Entry, Store, by_tail, encode, get_op, get_prefix_op, ranges, revision};

/// How many times a step re-reads and retries after a compare failed.
const ATTEMPTS: u32 = 32;

/// How long [`Store::finalize`] keeps trying while etcd does not answer (a leader
/// election takes a second or two), within its own wait.
const TRANSIENT_ETCD_WAIT: Duration = Duration::from_secs(5);

/// Options for [`Store::begin`].
#[derive(Debug, Clone)]
pub struct Begin {
    pub creator: String,
    /// The creator's lease: the transaction is abandoned when it expires.
    pub lease: i64,
}

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
struct KeySnapshot {
    revision: i64,
    view: KeyView,
}

impl KeySnapshot {
    /// Applies one watch event; returns whether it can change the evaluation.
    fn apply(
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
    /// Creates a transaction on `repo`: the voters are the up-to-date replicas whose node
    /// holds its lease; the threshold is a majority of the assigned replicas. One etcd
    /// txn compares everything the choice relied on (repository, voters' replicas and
    /// nodes, the admin lock's absence).
    pub async fn begin(&self, repo: &RepoId, opts: &Begin) -> Result<TxRecord> {
        let keys = self.keys();
        for _ in 0..ATTEMPTS {
            let view = self.repo_view(repo).await?;
            let id = uuid::Uuid::new_v4().simple().to_string();
            let record = begin::transaction(&view, &id, &opts.creator)?;
            let (voters, threshold) = (&record.voters, record.threshold);
            let mut cmp = vec![
                Compare::mod_revision(
                    keys.repo(repo),
                    CompareOp::Equal,
                    view.record_entry.mod_revision,
                ),
                Compare::create_revision(keys.lock(repo), CompareOp::Equal, 0),
            ];
            for v in voters {
                let replica = &view.replicas[v].1;
                let node = &view.live_nodes[v].1;
                cmp.push(Compare::mod_revision(
                    keys.replica(repo, v),
                    CompareOp::Equal,
                    replica.mod_revision,
                ));
                cmp.push(Compare::mod_revision(
                    keys.node(v),
                    CompareOp::Equal,
                    node.mod_revision,
                ));
            }
            let lease = PutOptions::new().with_lease(opts.lease);
            let mut ops = vec![
                TxnOp::put(keys.tx_record(&id), encode(&record), None),
                TxnOp::put(keys.tx_alive(&id), opts.creator.as_bytes(), Some(lease)),
                TxnOp::put(keys.txrepo_entry(repo, &id), Vec::new(), None),
            ];
            ops.extend(
                voters
                    .iter()
                    .map(|v| TxnOp::put(keys.voter(&id, v), Vec::new(), None)),
            );
            let txn = Txn::new().when(cmp).and_then(ops);
            match self.txn(txn).await {
                Ok(resp) if resp.succeeded() => {
                    tracing::debug!(tx = %id, %repo, ?voters, threshold, "transaction created");
                    return Ok(record);
                }
                Ok(_) => {}
                Err(e) => {
                    if e.is_unavailable() {
                        // etcd may still apply the creation it did not answer: end that
                        // transaction if it appears, or it would hold the repository's
                        // index (and block repairs) for as long as the creator lives.
                        tokio::spawn(self.clone().end_if_created(record, opts.lease));
                    }
                    return Err(e);
                }
            }
        }
        Err(Error::Contention(ATTEMPTS))
    }

    /// Ends transaction `record` if its creation, which etcd did not answer, landed
    /// after all: every voter is reported failed (none was called) and it is
    /// finalized. Checks for two minutes, then lets it be.
    async fn end_if_created(self, record: TxRecord, outcome_lease: i64) {
        let keys = self.keys();
        let by = format!("{}:unanswered-begin", record.creator);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut pause = Duration::from_millis(500);
        while Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
            match self.get(&keys.tx_record(&record.id)).await {
                Ok(Some(_)) => {}
                Ok(None) => continue,
                Err(_) => continue,
            }
            tracing::warn!(tx = %record.id, repo = %record.repo, "a transaction whose creation did not answer exists; ending it");
            let why = "its transaction's creation did not answer; it was never called";
            let mut reported = true;
            for v in &record.voters {
                reported &= self.fail_voter(&record.id, v, &by, why).await.is_ok();
            }
            if !reported {
                continue;
            }
            match self.try_finalize(&record.id, &by, outcome_lease).await {
                Ok(_) | Err(Error::UnknownTx(_)) => return,
                Err(e) => tracing::debug!(tx = %record.id, error = %e, "cannot end it yet"),
            }
        }
    }

    /// Reads a transaction's record.
    pub async fn tx_record(&self, tx: &str) -> Result<TxRecord> {
        self.get(&self.keys().tx_record(tx))
            .await?
            .ok_or_else(|| Error::UnknownTx(tx.to_owned()))?
            .decode()
    }

    /// The reads that evaluate one key, in one transaction: the record, the alive
    /// marker, the votes on the key, its decision, done and started voters, the nodes.
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
        };
        Ok(KeySnapshot {
            revision: rev,
            view,
        })
    }

    async fn read_key(&self, tx: &str, key: &str) -> Result<KeySnapshot> {
        let resp = self
            .txn(Txn::new().and_then(self.key_reads(tx, key)))
            .await?;
        self.key_snapshot(tx, key, &ranges(&resp), revision(&resp))
    }

    /// Opens the watch a waiting vote needs: the transaction's keys and the nodes. It
    /// starts at the current revision, which keeps it in etcd's "synced" group (a watch
    /// that starts in the past is caught up by a loop that runs only every 100 ms).
    /// Returns the stream and the revision it starts after.
    async fn vote_watch(
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
            // Aborting or waiting: once the watch is open.
            Next::Abort(_) | Next::Wait | Next::Gone => {}
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

    /// Records that `voter`'s node began running the transaction's RPC. Refused once
    /// the creator's lease is gone, so a voter that had not started by then never will,
    /// and the others need not wait for it; refused too once the voter was reported
    /// done (a router that saw its call fail reports it at once).
    pub async fn start_voter(&self, tx: &str, voter: &str) -> Result<()> {
        let keys = self.keys();
        let txn = Txn::new()
            .when([
                Compare::create_revision(keys.voter(tx, voter), CompareOp::Greater, 0),
                Compare::create_revision(keys.tx_alive(tx), CompareOp::Greater, 0),
                Compare::create_revision(keys.done(tx, voter), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(keys.started(tx, voter), Vec::new(), None)])
            .or_else([
                get_op(&keys.tx_record(tx)),
                get_op(&keys.tx_alive(tx)),
                get_op(&keys.done(tx, voter)),
            ]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            return Ok(());
        }
        let r = ranges(&resp);
        if r[0].is_empty() {
            Err(Error::UnknownTx(tx.to_owned()))
        } else if r[1].is_empty() {
            Err(Error::Abandoned(tx.to_owned()))
        } else if !r[2].is_empty() {
            Err(Error::VoterDone {
                tx: tx.to_owned(),
                voter: voter.to_owned(),
            })
        } else {
            Err(Error::NotAVoter {
                tx: tx.to_owned(),
                voter: voter.to_owned(),
            })
        }
    }

    /// Records that `voter` applied the committed update of `key`.
    pub async fn confirm(&self, tx: &str, key: &str, voter: &str) -> Result<()> {
        let keys = self.keys();
        let txn = Txn::new()
            .when([Compare::create_revision(
                keys.tx_record(tx),
                CompareOp::Greater,
                0,
            )])
            .and_then([TxnOp::put(keys.confirmed(tx, key, voter), Vec::new(), None)]);
        if self.txn(txn).await?.succeeded() {
            Ok(())
        } else {
            Err(Error::UnknownTx(tx.to_owned()))
        }
    }

    /// Records that git finished on `voter` (or that the caller saw its RPC fail): from
    /// now on it counts as "no" on every key it did not vote on.
    ///
    /// The first report stands; later ones for the same voter change nothing.
    pub async fn done(&self, tx: &str, voter: &str, ok: bool, detail: &str) -> Result<()> {
        self.done_with_checksum(tx, voter, ok, detail, "").await
    }

    /// [`Store::done`], with the replica's checksum after its work (empty: unknown).
    /// Finalize keeps it as the promoted replica's checksum at the new generation.
    pub async fn done_with_checksum(
        &self,
        tx: &str,
        voter: &str,
        ok: bool,
        detail: &str,
        checksum: &str,
    ) -> Result<()> {
        let rec = DoneRecord {
            ok,
            detail: detail.to_owned(),
            checksum: checksum.to_owned(),
            reported_by: String::new(),
        };
        self.put_done(tx, voter, &rec).await
    }

    /// Reports `voter` failed on its behalf (`by`: the router that saw its call fail,
    /// the reaper that gave up waiting). Like [`Store::done`] it fences the voter (no
    /// start, no vote after it) and the first report stands; unlike it, finalize takes
    /// it as "may have applied what it voted for" (a voter confirms before it reports
    /// done itself, but nobody knows what one reported by someone else did).
    pub async fn fail_voter(&self, tx: &str, voter: &str, by: &str, detail: &str) -> Result<()> {
        let rec = DoneRecord {
            ok: false,
            detail: detail.to_owned(),
            checksum: String::new(),
            reported_by: by.to_owned(),
        };
        self.put_done(tx, voter, &rec).await
    }

    async fn put_done(&self, tx: &str, voter: &str, rec: &DoneRecord) -> Result<()> {
        let keys = self.keys();
        // Create-only: the first report stands. A node's own report (with its
        // checksum) must not be overwritten by a caller that gave up on it, and a
        // retried write finds its first attempt there.
        let txn = Txn::new()
            .when([
                Compare::create_revision(keys.tx_record(tx), CompareOp::Greater, 0),
                Compare::create_revision(keys.done(tx, voter), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(keys.done(tx, voter), encode(rec), None)])
            .or_else([get_op(&keys.tx_record(tx))]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() || !ranges(&resp)[0].is_empty() {
            Ok(())
        } else {
            Err(Error::UnknownTx(tx.to_owned()))
        }
    }

    /// Reads a finalized transaction's outcome, if it is still kept.
    pub async fn outcome(&self, tx: &str) -> Result<Option<TxOutcome>> {
        match self.get(&self.keys().outcome(tx)).await? {
            Some(e) => Ok(Some(e.decode()?)),
            None => Ok(None),
        }
    }

    /// Finalizes a transaction once every voter is done or failed, waiting up to `wait`
    /// for that (and for voters' pending confirmations in other open transactions of the
    /// repository). See DESIGN.md §2 step 7. `outcome_lease` keeps the outcome record
    /// alive as long as that lease (0: kept until deleted).
    pub async fn finalize(
        &self,
        tx: &str,
        by: &str,
        outcome_lease: i64,
        wait: Duration,
    ) -> Result<TxOutcome> {
        let deadline = Instant::now() + wait;
        let mut tick = Duration::from_millis(2);
        // An etcd leader change makes requests fail or time out for a second or two;
        // finalize rides it out (each attempt re-reads, so one that landed unseen is
        // found as the stored outcome) rather than leave the client "outcome unknown".
        let etcd_deadline = (Instant::now() + TRANSIENT_ETCD_WAIT).min(deadline);
        loop {
            match self.try_finalize(tx, by, outcome_lease).await {
                Err(Error::NotFinished { tx, waiting }) => {
                    if Instant::now() >= deadline {
                        return Err(Error::NotFinished { tx, waiting });
                    }
                    // Progress comes from other processes; re-check with a short
                    // back-off rather than holding a watch per waiting finalize.
                    tokio::time::sleep_until((Instant::now() + tick).min(deadline)).await;
                    tick = (tick * 2).min(Duration::from_millis(100));
                }
                Err(e) if e.is_unavailable() && Instant::now() < etcd_deadline => {
                    tracing::debug!(tx, error = %e, "finalize: etcd did not answer; trying again");
                    self.fail_over();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    /// One attempt at finalizing; `NotFinished` when it must wait.
    pub async fn try_finalize(&self, tx: &str, by: &str, outcome_lease: i64) -> Result<TxOutcome> {
        let keys = self.keys();
        for _ in 0..ATTEMPTS {
            let record_entry = match self.get(&keys.tx_record(tx)).await? {
                Some(e) => e,
                None => {
                    return self
                        .outcome(tx)
                        .await?
                        .ok_or_else(|| Error::UnknownTx(tx.to_owned()));
                }
            };
            let record: TxRecord = record_entry.decode()?;
            let repo = &record.repo;
            let mut reads = vec![
                get_prefix_op(&keys.tx(tx)),
                get_op(&keys.repo(repo)),
                get_prefix_op(&keys.replicas(repo)),
                get_prefix_op(&keys.txrepo(repo)),
            ];
            reads.extend(record.voters.iter().map(|v| get_op(&keys.node(v))));
            let resp = self.txn(Txn::new().and_then(reads)).await?;
            let read_at = revision(&resp);
            let r = ranges(&resp);
            if r[0].is_empty() {
                continue; // finalized meanwhile: the next attempt returns the outcome
            }
            let state = tx_state(keys, &record, &r[0])?;
            let node_leases: BTreeMap<String, i64> = record
                .voters
                .iter()
                .enumerate()
                .filter_map(|(i, v)| r[4 + i].first().map(|e| (v.clone(), e.lease)))
                .collect();
            let repo_entry = r[1].first();
            let repo_record: Option<RepoRecord> = repo_entry.map(Entry::decode).transpose()?;
            let replicas: BTreeMap<String, (ReplicaRecord, Entry)> =
                by_tail(&r[2], &keys.replicas(repo))
                    .into_iter()
                    .map(|(n, e)| Ok((n, (e.decode()?, e))))
                    .collect::<Result<_>>()?;
            let replica_records: BTreeMap<String, ReplicaRecord> = replicas
                .iter()
                .map(|(n, (rep, _))| (n.clone(), rep.clone()))
                .collect();
            let others: Vec<String> = by_tail(&r[3], &keys.txrepo(repo))
                .into_keys()
                .filter(|id| id != tx)
                .collect();
            let repo_read = repo_entry
                .zip(repo_record.as_ref())
                .map(|(e, record)| RepoRead {
                    record,
                    create_revision: e.create_revision,
                    mod_revision: e.mod_revision,
                });
            let read = finalize::Read {
                record: &record,
                record_revision: record_entry.create_revision,
                state: &state,
                node_leases: &node_leases,
                repo: repo_read,
                replicas: &replica_records,
                others: &others,
                by,
            };
            let settlement = match finalize::plan(&read) {
                Step::Wait(waiting) => {
                    return Err(Error::NotFinished {
                        tx: tx.to_owned(),
                        waiting,
                    });
                }
                Step::Settle(s) => *s,
            };
            let mut raced = false;
            for (key, d) in settlement.aborts {
                let seen = &state.votes[&key];
                raced |= self
                    .abort_key(&record, &key, seen, d, None)
                    .await?
                    .is_none();
            }
            if raced {
                continue; // a late vote landed: read everything again
            }
            for key in &settlement.unconfirmed {
                tracing::warn!(
                    tx,
                    key,
                    "a majority voted for this update but no replica applied it"
                );
            }
            let (Some(changes), Some(repo_read)) = (settlement.changes, repo_read) else {
                // The repository was removed (perhaps re-created since): nothing to
                // promote, nothing to resurrect; just clean up.
                match self
                    .close(&record, &record_entry, read_at, None, outcome_lease, by)
                    .await
                {
                    Err(Error::Contention(_)) => continue,
                    other => return other,
                }
            };
            if changes.check_others {
                let promoted: BTreeSet<String> = changes.outcome.promoted.iter().cloned().collect();
                if let Some(w) = self.pending_elsewhere(&others, &promoted).await? {
                    return Err(Error::NotFinished {
                        tx: tx.to_owned(),
                        waiting: w,
                    });
                }
            }
            let mut cmp = vec![Compare::mod_revision(
                keys.repo(repo),
                CompareOp::Equal,
                repo_read.mod_revision,
            )];
            let mut ops = Vec::new();
            if let Some(new_repo) = &changes.repo {
                ops.push(TxnOp::put(keys.repo(repo), encode(new_repo), None));
            }
            for (node, rep, job) in &changes.replicas {
                // The plan writes only replicas it was given, all read here.
                let (_, entry) = &replicas[node];
                cmp.push(Compare::mod_revision(
                    keys.replica(repo, node),
                    CompareOp::Equal,
                    entry.mod_revision,
                ));
                if let Some(job) = job {
                    ops.push(put_job_if_absent(keys, job));
                }
                ops.push(TxnOp::put(keys.replica(repo, node), encode(rep), None));
            }
            match self
                .close(
                    &record,
                    &record_entry,
                    read_at,
                    Some((cmp, ops, changes.outcome)),
                    outcome_lease,
                    by,
                )
                .await
            {
                Err(Error::Contention(_)) => continue,
                other => return other,
            }
        }
        Err(Error::Contention(ATTEMPTS))
    }

    /// The one txn that ends a transaction: applies `changes` (compares, writes and the
    /// outcome), deletes the transaction's keys and its index entry. It lands only if
    /// nothing of the transaction changed since `read_at`, the revision its outcome was
    /// worked out from: a vote, confirmation or report that arrived meanwhile makes
    /// the caller read again rather than end the transaction without it.
    async fn close(
        &self,
        record: &TxRecord,
        record_entry: &Entry,
        read_at: i64,
        changes: Option<(Vec<Compare>, Vec<TxnOp>, TxOutcome)>,
        outcome_lease: i64,
        by: &str,
    ) -> Result<TxOutcome> {
        let keys = self.keys();
        let (mut cmp, mut ops, outcome) =
            changes.unwrap_or_else(|| (Vec::new(), Vec::new(), finalize::unchanged(record, by)));
        cmp.push(Compare::mod_revision(
            keys.tx_record(&record.id),
            CompareOp::Equal,
            record_entry.mod_revision,
        ));
        cmp.push(
            Compare::mod_revision(keys.tx(&record.id), CompareOp::Less, read_at + 1).with_prefix(),
        );
        let lease = (outcome_lease != 0).then(|| PutOptions::new().with_lease(outcome_lease));
        ops.push(TxnOp::put(
            keys.outcome(&record.id),
            encode(&outcome),
            lease,
        ));
        ops.push(TxnOp::delete(
            keys.tx(&record.id),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        ));
        ops.push(TxnOp::delete(
            keys.txrepo_entry(&record.repo, &record.id),
            None,
        ));
        if self
            .txn(Txn::new().when(cmp).and_then(ops))
            .await?
            .succeeded()
        {
            tracing::debug!(tx = %record.id, repo = %record.repo, committed = outcome.committed,
                acknowledged = outcome.acknowledged, promoted = ?outcome.promoted, "finalized");
            Ok(outcome)
        } else {
            Err(Error::Contention(1))
        }
    }

    /// Whether any of `voters` still owes a confirmation of a committed key in one of
    /// the transactions `others`; describes the first one found.
    async fn pending_elsewhere(
        &self,
        others: &[String],
        voters: &BTreeSet<String>,
    ) -> Result<Option<String>> {
        let keys = self.keys();
        // etcd limits operations per txn (128 by default): read in chunks.
        for chunk in others.chunks(64) {
            let resp = self
                .txn(
                    Txn::new().and_then(
                        chunk
                            .iter()
                            .flat_map(|id| {
                                [get_op(&keys.tx_record(id)), get_prefix_op(&keys.tx(id))]
                            })
                            .collect::<Vec<_>>(),
                    ),
                )
                .await?;
            let r = ranges(&resp);
            let mut nodes_needed = BTreeSet::new();
            let mut candidates = Vec::new();
            for (i, id) in chunk.iter().enumerate() {
                let Some(rec_entry) = r[2 * i].first() else {
                    continue;
                };
                let record: TxRecord = rec_entry.decode()?;
                let state = tx_state(keys, &record, &r[2 * i + 1])?;
                for (key, voter) in finalize::owed(&record, &state, voters) {
                    nodes_needed.insert(voter.clone());
                    candidates.push((id.clone(), key, voter, record.clone()));
                }
            }
            if candidates.is_empty() {
                continue;
            }
            // A voter whose node lost the lease it had then has failed: do not wait.
            let nodes: Vec<String> = nodes_needed.into_iter().collect();
            let resp = self
                .txn(
                    Txn::new().and_then(
                        nodes
                            .iter()
                            .map(|n| get_op(&keys.node(n)))
                            .collect::<Vec<_>>(),
                    ),
                )
                .await?;
            let r = ranges(&resp);
            for (id, key, voter, record) in candidates {
                let i = nodes
                    .iter()
                    .position(|n| *n == voter)
                    .expect("collected above");
                if holds_lease(&record, &voter, r[i].first().map(|e| e.lease)) {
                    return Ok(Some(format!(
                        "{voter} has not confirmed key {key} of concurrent transaction {id}"
                    )));
                }
            }
        }
        Ok(None)
    }
}

/// A transaction's keys (all under `tx/<id>/`, as `entries`), parsed.
pub(crate) fn tx_state(keys: &Keys, record: &TxRecord, entries: &[Entry]) -> Result<TxState> {
    let mut state = TxState::default();
    for (tail, e) in by_tail(entries, &keys.all_votes(&record.id)) {
        if let Some((key, voter)) = tail.rsplit_once('/') {
            let v: VoteRecord = e.decode()?;
            state
                .votes
                .entry(key.to_owned())
                .or_default()
                .votes
                .insert(voter.to_owned(), v.hash);
        }
    }
    for (key, e) in by_tail(entries, &keys.all_decided(&record.id)) {
        state.aborted.insert(key, e.decode()?);
    }
    for (tail, _) in by_tail(entries, &keys.all_confirmed(&record.id)) {
        if let Some((key, voter)) = tail.rsplit_once('/') {
            state
                .confirmed
                .entry(voter.to_owned())
                .or_default()
                .insert(key.to_owned());
        }
    }
    for (voter, e) in by_tail(entries, &keys.all_done(&record.id)) {
        state.done.insert(voter, e.decode()?);
    }
    state.started = by_tail(entries, &keys.all_started(&record.id))
        .into_keys()
        .collect();
    state.alive = entries.iter().any(|e| e.key == keys.tx_alive(&record.id));
    Ok(state)
}
