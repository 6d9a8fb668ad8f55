//! The transaction protocol (DESIGN.md §2): create, vote and decide (`vote.rs`),
//! confirm, done, finalize (`finalize.rs`). Every step is one etcd transaction with the
//! compares it relies on; nobody decides from their own clock. The choices between the
//! reads and the writes are pure functions in [`crate::decide`].

pub(crate) mod finalize;
mod gate;
mod race;
mod vote;

pub use gate::Claim;

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::time::Instant;

use crate::decide::begin;
use crate::decide::verdict;
use crate::error::{Error, Result};
use crate::records::{DoneRecord, TxRecord};
use crate::repo::RepoId;
use crate::store::{Store, encode, get_op, ranges};

/// How many times a step re-reads and retries after a compare failed.
const ATTEMPTS: u32 = 32;

/// Options for [`Store::begin`].
#[derive(Debug, Clone)]
pub struct Begin {
    pub creator: String,
    /// The creator's lease: the transaction is abandoned when it expires.
    pub lease: i64,
}
impl Store {
    /// Creates a transaction on `repo`: the voters are the up-to-date replicas whose node
    /// holds its lease; the threshold is a majority of the assigned replicas. One etcd
    /// txn compares everything the choice relied on (repository, voters' replicas and
    /// nodes, the admin lock's absence).
    pub async fn begin(&self, repo: &RepoId, opts: &Begin) -> Result<TxRecord> {
        self.begin_with(repo, opts, false).await
    }

    /// [`Store::begin`] for a call GitLab's checks gate (it carries a GitLab user): one
    /// voter is designated to run them, and no key commits without its allow verdict
    /// (DESIGN.md §8). Refused when the voters disagree on calling GitLab's API.
    pub async fn begin_gated(&self, repo: &RepoId, opts: &Begin) -> Result<TxRecord> {
        self.begin_with(repo, opts, true).await
    }

    async fn begin_with(&self, repo: &RepoId, opts: &Begin, gated: bool) -> Result<TxRecord> {
        let keys = self.keys();
        for _ in 0..ATTEMPTS {
            let view = self.repo_view(repo).await?;
            let id = uuid::Uuid::new_v4().simple().to_string();
            let mut record = begin::transaction(&view, &id, &opts.creator)?;
            if gated {
                record = verdict::gated(&view, record)?;
            }
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
                    tracing::debug!(tx = %id, %repo, ?voters, threshold, designated = ?record.designated, "transaction created");
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
        let mut pause = Duration::from_millis(250);
        while Instant::now() < deadline {
            // Woken when etcd answers again (it is open and blocks repairs until ended).
            self.pause(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
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
        self.done_carrying(tx, voter, ok, detail, checksum, serde_json::Value::Null)
            .await
    }

    /// [`Store::done_with_checksum`], carrying what GitLab's post-receive of a gated
    /// transaction needs on this voter ([`DoneRecord::post_receive`]): finalize copies
    /// a promoted voter's into the pending marker, in the txn that writes it.
    pub async fn done_carrying(
        &self,
        tx: &str,
        voter: &str,
        ok: bool,
        detail: &str,
        checksum: &str,
        post_receive: serde_json::Value,
    ) -> Result<()> {
        let rec = DoneRecord {
            ok,
            detail: detail.to_owned(),
            checksum: checksum.to_owned(),
            reported_by: String::new(),
            post_receive,
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
            post_receive: serde_json::Value::Null,
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
}
