//! Finalizing a transaction (DESIGN.md §2 step 7): the read, the abort of undecided
//! keys, the wait for confirmations owed elsewhere, and the one txn that ends it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::time::Instant;

use super::ATTEMPTS;
use crate::decide::finalize::{self, RepoRead, Step, TxState};
use crate::decide::holds_lease;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::records::{
    PendingPostReceive, ReplicaRecord, RepoRecord, TxOutcome, TxRecord, VoteRecord,
};
use crate::repository::put_job_if_absent;
use crate::store::{Entry, Store, by_tail, encode, get_op, get_prefix_op, ranges, revision};

/// How long [`Store::finalize`] keeps trying while etcd does not answer (a leader
/// election takes a second or two), within its own wait.
const TRANSIENT_ETCD_WAIT: Duration = Duration::from_secs(5);

impl Store {
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
                    .close(
                        Closing {
                            record: &record,
                            entry: &record_entry,
                            state: &state,
                            read_at,
                        },
                        None,
                        outcome_lease,
                        by,
                    )
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
            for w in &changes.replicas {
                // The plan writes only replicas it was given, all read here.
                let (_, entry) = &replicas[&w.node];
                cmp.push(Compare::mod_revision(
                    keys.replica(repo, &w.node),
                    CompareOp::Equal,
                    entry.mod_revision,
                ));
                if let Some(job) = &w.job {
                    ops.push(put_job_if_absent(keys, job));
                }
                ops.push(TxnOp::put(
                    keys.replica(repo, &w.node),
                    encode(&w.record),
                    None,
                ));
            }
            match self
                .close(
                    Closing {
                        record: &record,
                        entry: &record_entry,
                        state: &state,
                        read_at,
                    },
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
        read: Closing<'_>,
        changes: Option<(Vec<Compare>, Vec<TxnOp>, TxOutcome)>,
        outcome_lease: i64,
        by: &str,
    ) -> Result<TxOutcome> {
        let Closing {
            record,
            entry: record_entry,
            state,
            read_at,
        } = read;
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
        // GitLab's post-receive is owed from here on, whoever asks for it (DESIGN.md
        // §8, DESIGN-CHANGES-12.md): the marker lands with the outcome or not at all,
        // carrying what a promoted voter's `done` said running it needs, so a voter
        // that restarted since can still run it.
        if PendingPostReceive::owed(record, &outcome) {
            let pending = PendingPostReceive::of(record, &outcome, by).carrying(&state.done);
            ops.push(TxnOp::put(
                keys.post_receive_pending(&record.id),
                encode(&pending),
                None,
            ));
        }
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
/// What [`Store::close`] ends a transaction from: its record (and the record's
/// entry), its keys as read, and the revision they were read at.
struct Closing<'a> {
    record: &'a TxRecord,
    entry: &'a Entry,
    state: &'a TxState,
    read_at: i64,
}

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
    if let Some(e) = entries.iter().find(|e| e.key == keys.verdict(&record.id)) {
        state.verdict = Some(e.decode()?);
    }
    Ok(state)
}
