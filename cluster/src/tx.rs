//! The transaction protocol (DESIGN.md §2): create, vote and decide, confirm, done,
//! finalize. Every step is one etcd transaction with the compares it relies on; nobody
//! decides from their own clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::quorum::{self, KeyState, VoterReport};
use crate::records::{
    Decision, DoneRecord, JobRecord, ReplicaRecord, ReplicaState, TxOutcome, TxRecord, VoteRecord,
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

/// Everything one vote key needs to be evaluated. Built from one read, then kept
/// current from the watch's events, so a waiting vote never re-reads.
#[derive(Debug)]
struct KeySnapshot {
    revision: i64,
    record: Option<TxRecord>,
    alive: bool,
    started: BTreeSet<String>,
    done: BTreeSet<String>,
    /// node → lease its registration has now (absent: no registration).
    node_leases: BTreeMap<String, i64>,
    key: KeyState,
    /// A stored abort decision.
    aborted: Option<Decision>,
}

impl KeySnapshot {
    /// Voters that can no longer vote: done, failed (their node lost the lease it had
    /// when the transaction began), or never started by the time the creator died.
    fn finished(&self) -> BTreeSet<String> {
        let Some(record) = &self.record else {
            return BTreeSet::new();
        };
        record
            .voters
            .iter()
            .filter(|v| {
                self.done.contains(*v)
                    || self.node_leases.get(*v) != record.voter_leases.get(*v)
                    || (!self.alive && !self.started.contains(*v))
            })
            .cloned()
            .collect()
    }

    /// Applies one watch event; returns whether it can change the evaluation.
    fn apply(
        &mut self,
        keys: &crate::keys::Keys,
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
                self.key.votes.insert(voter.to_owned(), v.hash);
            }
        } else if k == keys.decided(tx, vote_key) {
            if put {
                self.aborted =
                    Some(
                        serde_json::from_slice(kv.value()).map_err(|source| Error::Corrupt {
                            key: k.clone(),
                            source,
                        })?,
                    );
            }
        } else if let Some(voter) = k.strip_prefix(&keys.all_done(tx)) {
            self.done.insert(voter.to_owned());
        } else if let Some(voter) = k.strip_prefix(&keys.all_started(tx)) {
            self.started.insert(voter.to_owned());
        } else if k == keys.tx_alive(tx) {
            self.alive = put;
        } else if k == keys.tx_record(tx) {
            if !put {
                self.record = None;
            }
        } else if let Some(node) = k.strip_prefix(&keys.nodes()) {
            if put {
                self.node_leases.insert(node.to_owned(), kv.lease());
            } else {
                self.node_leases.remove(node);
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
            if let Some(lock) = &view.lock {
                return Err(crate::lock::locked_error(repo, lock));
            }
            let voters = view.up_to_date_live();
            let threshold = view.record.threshold();
            if voters.len() < threshold {
                return Err(Error::NoQuorum {
                    up: voters.len(),
                    assigned: view.record.assigned.len(),
                    needed: threshold,
                });
            }
            let id = uuid::Uuid::new_v4().simple().to_string();
            let voter_leases = voters
                .iter()
                .map(|v| (v.clone(), view.live_nodes[v].1.lease))
                .collect();
            let record = TxRecord {
                id: id.clone(),
                repo: repo.clone(),
                voters: voters.clone(),
                threshold,
                assigned: view.record.assigned.len(),
                base_generation: view.record.generation,
                creator: opts.creator.clone(),
                voter_leases,
                repo_create_revision: view.record_entry.create_revision,
            };
            let mut cmp = vec![
                Compare::mod_revision(
                    keys.repo(repo),
                    CompareOp::Equal,
                    view.record_entry.mod_revision,
                ),
                Compare::create_revision(keys.lock(repo), CompareOp::Equal, 0),
            ];
            for v in &voters {
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
        Ok(KeySnapshot {
            revision: rev,
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
        if resp.succeeded() {
            crate::faults::reach(crate::faults::AFTER_VOTE_RECORDED).await;
        }
        let mut snap = self.key_snapshot(tx, key, &ranges(&resp), revision(&resp))?;
        tracing::debug!(
            key,
            vote_txn_us = t0.elapsed().as_micros() as u64,
            "vote stored"
        );
        let record = snap
            .record
            .clone()
            .ok_or_else(|| Error::UnknownTx(tx.to_owned()))?;
        if !record.voters.iter().any(|v| v == voter) {
            return Err(Error::NotAVoter {
                tx: tx.to_owned(),
                voter: voter.to_owned(),
            });
        }
        if !resp.succeeded() && snap.aborted.is_none() && !snap.key.votes.contains_key(voter) {
            if snap.done.contains(voter) {
                return Err(Error::VoterDone {
                    tx: tx.to_owned(),
                    voter: voter.to_owned(),
                });
            }
            if !snap.alive {
                return Err(Error::Abandoned(tx.to_owned()));
            }
            if !snap.started.contains(voter) {
                return Err(Error::NotStarted {
                    tx: tx.to_owned(),
                    voter: voter.to_owned(),
                });
            }
        }
        if let Some(d) = snap.aborted.clone() {
            return Ok((d, record));
        }
        let finished = snap.finished();
        if let Some(d) = quorum::evaluate(
            &record.voters,
            record.threshold,
            record.assigned,
            &snap.key,
            &finished,
            voter,
        ) && d.is_commit()
        {
            // The common case for all but the first voters: no need to wait.
            tracing::debug!(
                key,
                total_us = t0.elapsed().as_micros() as u64,
                "majority seen"
            );
            return Ok((d, record));
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
        let me = voter.to_owned();
        loop {
            if let Some(d) = snap.aborted.clone() {
                return Ok((d, record));
            }
            if snap.record.is_none() {
                return Err(Error::UnknownTx(tx.to_owned()));
            }
            let finished = snap.finished();
            match quorum::evaluate(
                &record.voters,
                record.threshold,
                record.assigned,
                &snap.key,
                &finished,
                &me,
            ) {
                Some(d) if d.is_commit() => {
                    tracing::debug!(
                        key,
                        total_us = t0.elapsed().as_micros() as u64,
                        "majority seen"
                    );
                    return Ok((d, record));
                }
                Some(d) => {
                    if let Some(d) = self.abort_key(&record, key, &snap.key, d, None).await? {
                        return Ok((d, record));
                    }
                    // A vote arrived meanwhile: evaluate again with it.
                    snap = self.read_key(tx, key).await?;
                    continue;
                }
                None => {}
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
            let data = TxData::parse(self, &record, &r[0])?;
            let failed: BTreeSet<String> = record
                .voters
                .iter()
                .enumerate()
                .filter(|(i, v)| !node_holds(&r[4 + i], &record, v))
                .map(|(_, v)| v.clone())
                .collect();
            let waiting: Vec<&String> = record
                .voters
                .iter()
                .filter(|v| !data.done.contains_key(*v) && !failed.contains(*v))
                .filter(|v| data.alive || data.started.contains(*v))
                .collect();
            if !waiting.is_empty() {
                return Err(Error::NotFinished {
                    tx: tx.to_owned(),
                    waiting: format!("voters still running: {waiting:?}"),
                });
            }
            // Every voter finished or failed, so every key with votes can be decided:
            // a key without a majority aborts.
            let mut decided = data.decisions(&record);
            let mut raced = false;
            for (key, state) in &data.votes {
                if decided.contains_key(key) {
                    continue;
                }
                let most = quorum::most_votes(state);
                let d = quorum::abort(most, record.threshold, record.assigned, by);
                match self.abort_key(&record, key, state, d, None).await? {
                    Some(d) => {
                        decided.insert(key.clone(), d);
                    }
                    None => raced = true,
                }
            }
            if raced {
                continue; // a late vote landed: read everything again
            }
            // A key a majority voted for counts as committed only if some voter confirmed
            // applying it. Votes can land after their voter gave up (a request that
            // timed out while etcd had no quorum is applied when it regains one), so a
            // majority of votes alone may stand for an update no replica applied.
            // Voters confirm before they report done, so a voter that reported done
            // itself without a confirmation did not apply the key. Voters that voted for
            // such a key and never reported (failed), or were reported failed by someone
            // else, are in an unknown state: they are marked outdated.
            let mut committed_keys = BTreeSet::new();
            let mut suspects = BTreeSet::new();
            for (key, d) in decided.iter().filter(|(_, d)| d.is_commit()) {
                let confirmed_by_any = data.confirmed.values().any(|keys| keys.contains(key));
                if confirmed_by_any {
                    committed_keys.insert(key.clone());
                    continue;
                }
                tracing::warn!(
                    tx,
                    key,
                    "a majority voted for this update but no replica applied it"
                );
                let winners = data.votes.get(key).map(|k| &k.votes);
                for (voter, hash) in winners.into_iter().flatten() {
                    let self_reported = data
                        .done
                        .get(voter)
                        .is_some_and(|d| d.reported_by.is_empty());
                    if d.hash.as_ref() == Some(hash) && !self_reported {
                        suspects.insert(voter.clone());
                    }
                }
            }

            let same_repo = |e: &Entry| {
                record.repo_create_revision == 0 || e.create_revision == record.repo_create_revision
            };
            let Some(repo_entry) = r[1].first().filter(|e| same_repo(e)).cloned() else {
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
            let repo_record: crate::records::RepoRecord = repo_entry.decode()?;
            let replicas: BTreeMap<String, (ReplicaRecord, Entry)> =
                by_tail(&r[2], &keys.replicas(repo))
                    .into_iter()
                    .map(|(n, e)| Ok((n, (e.decode()?, e))))
                    .collect::<Result<_>>()?;
            let reports: BTreeMap<String, VoterReport> = record
                .voters
                .iter()
                .map(|v| {
                    let current = replicas
                        .get(v)
                        .is_some_and(|(rep, _)| rep.is_up_to_date(&repo_record));
                    let confirmed = data.confirmed.get(v).cloned().unwrap_or_default();
                    let done = data.done.get(v).map(|d| d.ok);
                    (
                        v.clone(),
                        VoterReport {
                            confirmed,
                            done,
                            current,
                        },
                    )
                })
                .collect();
            let promoted = quorum::promoted(&committed_keys, &reports);

            // A voter may still owe a confirmation in another open transaction of this
            // repository; promoting it now could show a reader a state without that
            // write after it was visible elsewhere. Wait for it to settle.
            let others: Vec<String> = by_tail(&r[3], &keys.txrepo(repo))
                .into_keys()
                .filter(|id| id != tx)
                .collect();
            if !promoted.is_empty()
                && !others.is_empty()
                && let Some(w) = self.pending_elsewhere(&others, &promoted).await?
            {
                return Err(Error::NotFinished {
                    tx: tx.to_owned(),
                    waiting: w,
                });
            }

            // A voter's checksum describes the repository at the new generation only if
            // no other write can have landed between its own and this finalize: no other
            // transaction of the repository is open, and none finalized since this one
            // began (the repository record is older than this transaction).
            let checksums_hold =
                others.is_empty() && repo_entry.mod_revision < record_entry.create_revision;
            let committed = !committed_keys.is_empty();
            let mut outcome = TxOutcome {
                id: tx.to_owned(),
                repo: repo.clone(),
                committed,
                generation: repo_record.generation,
                promoted: promoted.iter().cloned().collect(),
                outdated: Vec::new(),
                threshold: record.threshold,
                acknowledged: promoted.len() >= record.threshold,
                reaped: by.starts_with("reaper"),
            };
            let mut cmp = vec![Compare::mod_revision(
                keys.repo(repo),
                CompareOp::Equal,
                repo_entry.mod_revision,
            )];
            let mut ops = Vec::new();
            if committed {
                let generation = repo_record.generation + 1;
                outcome.generation = generation;
                let mut new_repo = repo_record.clone();
                new_repo.generation = generation;
                ops.push(TxnOp::put(keys.repo(repo), encode(&new_repo), None));
                for node in &repo_record.assigned {
                    let Some((rep, entry)) = replicas.get(node) else {
                        continue;
                    };
                    cmp.push(Compare::mod_revision(
                        keys.replica(repo, node),
                        CompareOp::Equal,
                        entry.mod_revision,
                    ));
                    let mut rep = rep.clone();
                    if promoted.contains(node) {
                        rep.generation = generation;
                        rep.state = ReplicaState::UpToDate;
                        rep.reason.clear();
                        rep.checksum = match data.done.get(node) {
                            Some(d) if checksums_hold => d.checksum.clone(),
                            _ => String::new(),
                        };
                    } else {
                        let reason = if record.voters.contains(node) {
                            format!("did not confirm every update of transaction {tx}")
                        } else {
                            format!("missed transaction {tx}")
                        };
                        if rep.state == ReplicaState::UpToDate {
                            rep.state = ReplicaState::Outdated;
                            rep.reason = reason.clone();
                        }
                        outcome.outdated.push(node.clone());
                        let job = JobRecord::new(repo.clone(), node.clone(), generation, reason);
                        ops.push(put_job_if_absent(keys, &job));
                    }
                    ops.push(TxnOp::put(keys.replica(repo, node), encode(&rep), None));
                }
            } else {
                outcome.acknowledged = record
                    .voters
                    .iter()
                    .filter(|v| !suspects.contains(*v))
                    .filter(|v| reports[*v].current && reports[*v].done == Some(true))
                    .count()
                    >= record.threshold;
                for node in &suspects {
                    let Some((rep, entry)) = replicas.get(node) else {
                        continue;
                    };
                    cmp.push(Compare::mod_revision(
                        keys.replica(repo, node),
                        CompareOp::Equal,
                        entry.mod_revision,
                    ));
                    let reason =
                        format!("may hold an update of transaction {tx} that no replica confirmed");
                    let mut rep = rep.clone();
                    if rep.state == ReplicaState::UpToDate {
                        rep.state = ReplicaState::Outdated;
                        rep.reason = reason.clone();
                    }
                    outcome.outdated.push(node.clone());
                    let job =
                        JobRecord::new(repo.clone(), node.clone(), repo_record.generation, reason);
                    ops.push(put_job_if_absent(keys, &job));
                    ops.push(TxnOp::put(keys.replica(repo, node), encode(&rep), None));
                }
            }
            match self
                .close(
                    &record,
                    &record_entry,
                    read_at,
                    Some((cmp, ops, outcome)),
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
        let (mut cmp, mut ops, outcome) = changes.unwrap_or_else(|| {
            let outcome = TxOutcome {
                id: record.id.clone(),
                repo: record.repo.clone(),
                committed: false,
                generation: record.base_generation,
                promoted: Vec::new(),
                outdated: Vec::new(),
                threshold: record.threshold,
                acknowledged: false,
                reaped: by.starts_with("reaper"),
            };
            (Vec::new(), Vec::new(), outcome)
        });
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
                let data = TxData::parse(self, &record, &r[2 * i + 1])?;
                for (key, d) in &data.decisions(&record) {
                    let Some(hash) = &d.hash else { continue };
                    for voter in voters {
                        let voted_winner = data
                            .votes
                            .get(key)
                            .and_then(|k| k.votes.get(voter))
                            .is_some_and(|h| h == hash);
                        let confirmed = data.confirmed.get(voter).is_some_and(|c| c.contains(key));
                        // Reported failed by someone else, it may still confirm:
                        // wait for it while its node lives, as for one not done.
                        let self_reported = data
                            .done
                            .get(voter)
                            .is_some_and(|d| d.reported_by.is_empty());
                        if voted_winner && !confirmed && !self_reported {
                            nodes_needed.insert(voter.clone());
                            candidates.push((
                                id.clone(),
                                key.clone(),
                                voter.clone(),
                                record.clone(),
                            ));
                        }
                    }
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
                if node_holds(&r[i], &record, &voter) {
                    return Ok(Some(format!(
                        "{voter} has not confirmed key {key} of concurrent transaction {id}"
                    )));
                }
            }
        }
        Ok(None)
    }
}

/// Whether the node entry read for `voter` is still the lease it had when `tx` began.
fn node_holds(entries: &[Entry], tx: &TxRecord, voter: &str) -> bool {
    entries
        .first()
        .is_some_and(|e| Some(&e.lease) == tx.voter_leases.get(voter))
}

/// A transaction's keys, parsed.
#[derive(Debug, Default)]
struct TxData {
    votes: BTreeMap<String, KeyState>,
    /// Stored abort decisions.
    aborted: BTreeMap<String, Decision>,
    /// voter → keys it confirmed.
    confirmed: BTreeMap<String, BTreeSet<String>>,
    done: BTreeMap<String, DoneRecord>,
    started: BTreeSet<String>,
    alive: bool,
}

impl TxData {
    /// Every decided key: the stored aborts, and the keys where threshold voters voted
    /// one hash (commits need no write of their own).
    fn decisions(&self, record: &TxRecord) -> BTreeMap<String, Decision> {
        let mut out = self.aborted.clone();
        for (key, state) in &self.votes {
            if out.contains_key(key) {
                continue;
            }
            let none = BTreeSet::new();
            if let Some(d) = quorum::evaluate(
                &record.voters,
                record.threshold,
                record.assigned,
                state,
                &none,
                "votes",
            ) && d.is_commit()
            {
                out.insert(key.clone(), d);
            }
        }
        out
    }

    fn parse(store: &Store, record: &TxRecord, entries: &[Entry]) -> Result<TxData> {
        let keys = store.keys();
        let mut data = TxData::default();
        for (tail, e) in by_tail(entries, &keys.all_votes(&record.id)) {
            if let Some((key, voter)) = tail.rsplit_once('/') {
                let v: VoteRecord = e.decode()?;
                data.votes
                    .entry(key.to_owned())
                    .or_default()
                    .votes
                    .insert(voter.to_owned(), v.hash);
            }
        }
        for (key, e) in by_tail(entries, &keys.all_decided(&record.id)) {
            data.aborted.insert(key, e.decode()?);
        }
        for (tail, _) in by_tail(entries, &keys.all_confirmed(&record.id)) {
            if let Some((key, voter)) = tail.rsplit_once('/') {
                data.confirmed
                    .entry(voter.to_owned())
                    .or_default()
                    .insert(key.to_owned());
            }
        }
        for (voter, e) in by_tail(entries, &keys.all_done(&record.id)) {
            data.done.insert(voter, e.decode()?);
        }
        data.started = by_tail(entries, &keys.all_started(&record.id))
            .into_keys()
            .collect();
        data.alive = entries.iter().any(|e| e.key == keys.tx_alive(&record.id));
        Ok(data)
    }
}
