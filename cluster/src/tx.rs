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
use crate::store::{Entry, Store, by_tail, encode, get_op, get_prefix_op, ranges, revision};

/// How many times a step re-reads and retries after a compare failed.
const ATTEMPTS: u32 = 32;

/// Options for [`Store::begin`].
#[derive(Debug, Clone)]
pub struct Begin {
    pub creator: String,
    /// The creator's lease: the transaction is abandoned when it expires.
    pub lease: i64,
}

/// Everything one vote key needs to be evaluated, read at one revision.
#[derive(Debug)]
struct KeySnapshot {
    revision: i64,
    record_present: bool,
    alive: bool,
    key: KeyState,
    decided: Option<Decision>,
    finished: BTreeSet<String>,
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
            if view.lock.is_some() {
                return Err(Error::Locked(repo.clone()));
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
            let txn = Txn::new().when(cmp).and_then([
                TxnOp::put(keys.tx_record(&id), encode(&record), None),
                TxnOp::put(keys.tx_alive(&id), opts.creator.as_bytes(), Some(lease)),
                TxnOp::put(keys.txrepo_entry(repo, &id), Vec::new(), None),
            ]);
            if self.txn(txn).await?.succeeded() {
                tracing::debug!(tx = %id, %repo, ?voters, threshold, "transaction created");
                return Ok(record);
            }
        }
        Err(Error::Contention(ATTEMPTS))
    }

    /// Reads a transaction's record.
    pub async fn tx_record(&self, tx: &str) -> Result<TxRecord> {
        self.get(&self.keys().tx_record(tx))
            .await?
            .ok_or_else(|| Error::UnknownTx(tx.to_owned()))?
            .decode()
    }

    /// The reads that evaluate one key: votes on it, its decision, done voters, the
    /// record and alive marker, and each voter's node.
    fn key_reads(&self, tx: &TxRecord, key: &str) -> Vec<TxnOp> {
        let keys = self.keys();
        let mut ops = vec![
            get_op(&keys.tx_record(&tx.id)),
            get_op(&keys.tx_alive(&tx.id)),
            get_prefix_op(&keys.votes(&tx.id, key)),
            get_op(&keys.decided(&tx.id, key)),
            get_prefix_op(&keys.all_done(&tx.id)),
            get_prefix_op(&keys.all_started(&tx.id)),
        ];
        ops.extend(tx.voters.iter().map(|v| get_op(&keys.node(v))));
        ops
    }

    fn key_snapshot(
        &self,
        tx: &TxRecord,
        key: &str,
        r: &[Vec<Entry>],
        rev: i64,
    ) -> Result<KeySnapshot> {
        let keys = self.keys();
        let mut state = KeyState::default();
        for (voter, e) in by_tail(&r[2], &keys.votes(&tx.id, key)) {
            let vote: VoteRecord = e.decode()?;
            state.votes.insert(voter, vote.hash);
        }
        let decided = match r[3].first() {
            Some(e) => Some(e.decode()?),
            None => None,
        };
        let alive = !r[1].is_empty();
        let started: BTreeSet<String> = by_tail(&r[5], &keys.all_started(&tx.id))
            .into_keys()
            .collect();
        let mut finished: BTreeSet<String> =
            by_tail(&r[4], &keys.all_done(&tx.id)).into_keys().collect();
        for (i, voter) in tx.voters.iter().enumerate() {
            // A voter whose node lost its lease failed; once the creator is gone, a
            // voter that never started can no longer start.
            if !node_holds(&r[6 + i], tx, voter) || (!alive && !started.contains(voter)) {
                finished.insert(voter.clone());
            }
        }
        Ok(KeySnapshot {
            revision: rev,
            record_present: !r[0].is_empty(),
            alive,
            key: state,
            decided,
            finished,
        })
    }

    async fn read_key(&self, tx: &TxRecord, key: &str) -> Result<KeySnapshot> {
        let resp = self
            .txn(Txn::new().and_then(self.key_reads(tx, key)))
            .await?;
        self.key_snapshot(tx, key, &ranges(&resp), revision(&resp))
    }

    /// Records `voter`'s vote on `key` and waits for the key's decision, deciding it
    /// itself when the votes allow (one create-only write everyone adopts). Returns the
    /// decision; `Err` means this voter must abort without a decision (etcd unreachable,
    /// the transaction gone or abandoned, or no decision within `wait`).
    pub async fn cast_vote(
        &self,
        tx: &TxRecord,
        voter: &str,
        key: &str,
        vote: &VoteRecord,
        wait: Duration,
    ) -> Result<Decision> {
        if !tx.voters.iter().any(|v| v == voter) {
            return Err(Error::NotAVoter {
                tx: tx.id.clone(),
                voter: voter.to_owned(),
            });
        }
        let deadline = Instant::now() + wait;
        let keys = self.keys();
        let txn = Txn::new()
            .when([
                Compare::create_revision(keys.tx_record(&tx.id), CompareOp::Greater, 0),
                Compare::create_revision(keys.tx_alive(&tx.id), CompareOp::Greater, 0),
                Compare::create_revision(keys.decided(&tx.id, key), CompareOp::Equal, 0),
                Compare::create_revision(keys.vote(&tx.id, key, voter), CompareOp::Equal, 0),
            ])
            .and_then(
                std::iter::once(TxnOp::put(
                    keys.vote(&tx.id, key, voter),
                    encode(vote),
                    None,
                ))
                .chain(self.key_reads(tx, key))
                .collect::<Vec<_>>(),
            )
            .or_else(self.key_reads(tx, key));
        let resp = self.txn(txn).await?;
        let mut snap = self.key_snapshot(tx, key, &ranges(&resp), revision(&resp))?;
        if !resp.succeeded() {
            if let Some(d) = snap.decided.take() {
                return Ok(d);
            }
            if !snap.record_present {
                return Err(Error::UnknownTx(tx.id.clone()));
            }
            if !snap.alive {
                return Err(Error::Abandoned(tx.id.clone()));
            }
            // Otherwise our vote was already stored (a retried request): go on.
        }
        let me = voter.to_owned();
        let mut watch: Option<etcd_client::WatchStream> = None;
        loop {
            if let Some(d) = snap.decided.take() {
                return Ok(d);
            }
            if !snap.record_present {
                return Err(Error::UnknownTx(tx.id.clone()));
            }
            if let Some(d) = quorum::evaluate(
                &tx.voters,
                tx.threshold,
                tx.assigned,
                &snap.key,
                &snap.finished,
                &me,
            ) {
                return self.decide(tx, key, d).await;
            }
            // Wait for anything that can change the evaluation: a vote, a decision, a
            // voter finishing, a node losing its lease, the transaction ending.
            if watch.is_none() {
                let from = snap.revision + 1;
                let (tx_prefix, nodes_prefix) = (keys.tx(&tx.id), keys.nodes());
                let stream = self
                    .request(|mut c| {
                        let (tx_prefix, nodes_prefix) = (tx_prefix.clone(), nodes_prefix.clone());
                        async move {
                            let opts = WatchOptions::new().with_prefix().with_start_revision(from);
                            let mut stream = c.watch(tx_prefix, Some(opts)).await?;
                            let opts = WatchOptions::new().with_prefix().with_start_revision(from);
                            stream.watch(nodes_prefix, Some(opts)).await?;
                            Ok(stream)
                        }
                    })
                    .await?;
                watch = Some(stream);
            }
            let stream = watch.as_mut().expect("watch was just created");
            let relevant = |k: &str| {
                k.starts_with(&keys.votes(&tx.id, key))
                    || k == keys.decided(&tx.id, key)
                    || k.starts_with(&keys.all_done(&tx.id))
                    || k == keys.tx_record(&tx.id)
                    || k == keys.tx_alive(&tx.id)
                    || tx.voters.iter().any(|v| k == keys.node(v))
            };
            loop {
                let msg = tokio::time::timeout_at(deadline, stream.message())
                    .await
                    .map_err(|_| Error::NoDecision(wait))?;
                let msg = match msg {
                    Ok(Some(msg)) if !msg.canceled() => msg,
                    // The endpoint failed or cancelled the watch (compaction cannot
                    // apply: we start right after our own read): re-read and re-watch.
                    other => {
                        tracing::debug!(?other, "vote watch ended; re-watching");
                        self.fail_over();
                        watch = None;
                        break;
                    }
                };
                let mut changed = false;
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let k = String::from_utf8_lossy(kv.key());
                    if ev.event_type() == EventType::Put && k == keys.decided(&tx.id, key) {
                        return serde_json::from_slice(kv.value()).map_err(|source| {
                            Error::Corrupt {
                                key: k.into_owned(),
                                source,
                            }
                        });
                    }
                    changed |= relevant(&k);
                }
                if changed {
                    break;
                }
            }
            snap = self.read_key(tx, key).await?;
        }
    }

    /// Writes `decision` for `key` unless one exists; returns the stored one.
    async fn decide(&self, tx: &TxRecord, key: &str, decision: Decision) -> Result<Decision> {
        let k = self.keys().decided(&tx.id, key);
        let txn = Txn::new()
            .when([Compare::create_revision(k.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k.as_str(), encode(&decision), None)])
            .or_else([get_op(&k)]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            tracing::debug!(tx = %tx.id, key, commit = decision.is_commit(), by = %decision.by, "decided");
            return Ok(decision);
        }
        ranges(&resp)[0]
            .first()
            .ok_or_else(|| Error::Invalid(format!("decision {k} vanished")))?
            .decode()
    }

    /// Records that `voter`'s node began running the transaction's RPC. Refused once
    /// the creator's lease is gone, so a voter that had not started by then never will,
    /// and the others need not wait for it.
    pub async fn start_voter(&self, tx: &str, voter: &str) -> Result<()> {
        let keys = self.keys();
        let txn = Txn::new()
            .when([
                Compare::create_revision(keys.tx_record(tx), CompareOp::Greater, 0),
                Compare::create_revision(keys.tx_alive(tx), CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(keys.started(tx, voter), Vec::new(), None)])
            .or_else([get_op(&keys.tx_record(tx))]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            Ok(())
        } else if ranges(&resp)[0].is_empty() {
            Err(Error::UnknownTx(tx.to_owned()))
        } else {
            Err(Error::Abandoned(tx.to_owned()))
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
    pub async fn done(&self, tx: &str, voter: &str, ok: bool, detail: &str) -> Result<()> {
        let keys = self.keys();
        let rec = DoneRecord {
            ok,
            detail: detail.to_owned(),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(
                keys.tx_record(tx),
                CompareOp::Greater,
                0,
            )])
            .and_then([TxnOp::put(keys.done(tx, voter), encode(&rec), None)]);
        if self.txn(txn).await?.succeeded() {
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
            // Every voter finished or failed, so every key with votes can be decided.
            let finished: BTreeSet<String> = record.voters.iter().cloned().collect();
            let mut decided = data.decided.clone();
            for (key, state) in &data.votes {
                if decided.contains_key(key) {
                    continue;
                }
                let d = quorum::evaluate(
                    &record.voters,
                    record.threshold,
                    record.assigned,
                    state,
                    &finished,
                    by,
                )
                .unwrap_or_else(|| quorum::abort(0, record.threshold, record.assigned, by));
                decided.insert(key.clone(), self.decide(&record, key, d).await?);
            }
            let committed_keys: BTreeSet<String> = decided
                .iter()
                .filter(|(_, d)| d.is_commit())
                .map(|(k, _)| k.clone())
                .collect();

            let Some(repo_entry) = r[1].first().cloned() else {
                // The repository was removed: nothing to promote; just clean up.
                return self
                    .close(&record, &record_entry, None, outcome_lease, by)
                    .await;
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
            if !promoted.is_empty() && !others.is_empty() {
                if let Some(w) = self.pending_elsewhere(&others, &promoted).await? {
                    return Err(Error::NotFinished {
                        tx: tx.to_owned(),
                        waiting: w,
                    });
                }
            }

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
                        rep.checksum.clear();
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
                        let job = JobRecord {
                            repo: repo.clone(),
                            node: node.clone(),
                            generation,
                            reason,
                            attempts: 0,
                        };
                        ops.push(TxnOp::put(keys.repair_job(repo, node), encode(&job), None));
                    }
                    ops.push(TxnOp::put(keys.replica(repo, node), encode(&rep), None));
                }
            } else {
                outcome.acknowledged = record
                    .voters
                    .iter()
                    .filter(|v| reports[*v].current && reports[*v].done == Some(true))
                    .count()
                    >= record.threshold;
            }
            match self
                .close(
                    &record,
                    &record_entry,
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
    /// outcome), deletes the transaction's keys and its index entry.
    async fn close(
        &self,
        record: &TxRecord,
        record_entry: &Entry,
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
                for (key, d) in &data.decided {
                    let Some(hash) = &d.hash else { continue };
                    for voter in voters {
                        let voted_winner = data
                            .votes
                            .get(key)
                            .and_then(|k| k.votes.get(voter))
                            .is_some_and(|h| h == hash);
                        let confirmed = data.confirmed.get(voter).is_some_and(|c| c.contains(key));
                        if voted_winner && !confirmed && !data.done.contains_key(voter) {
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
    decided: BTreeMap<String, Decision>,
    /// voter → keys it confirmed.
    confirmed: BTreeMap<String, BTreeSet<String>>,
    done: BTreeMap<String, DoneRecord>,
    started: BTreeSet<String>,
    alive: bool,
}

impl TxData {
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
            data.decided.insert(key, e.decode()?);
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
