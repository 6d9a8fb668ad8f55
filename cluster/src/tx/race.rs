//! Settling writes that race on one vote key (DESIGN.md §9; the rule is
//! [`crate::decide::race`]): one read of the repository's open transactions, one of
//! their votes on the key, and a create-only abort of each contender but the oldest.

use etcd_client::Txn;

use crate::decide::race::{self, Contender};
use crate::error::Result;
use crate::quorum::KeyState;
use crate::records::{Decision, TxRecord, VoteRecord};
use crate::store::{Store, by_tail, get_op, get_prefix_op, ranges};

/// etcd allows 128 operations per txn by default; three reads per transaction.
const PER_TXN: usize = 40;

impl Store {
    /// Run by `voter` after its vote on `key` of transaction `record` was stored and
    /// had to wait: if other open transactions of the repository voted on the same key
    /// and none of them is decided, aborts every one of them but the oldest (this one
    /// included, last). Each abort is [`Store::abort_key`]'s: create-only, and only
    /// while no new vote arrived, so a contender that reached its majority meanwhile
    /// commits and nothing here undoes it. Returns the aborts written.
    pub async fn settle_race(
        &self,
        record: &TxRecord,
        key: &str,
        voter: &str,
        vote: &VoteRecord,
    ) -> Result<Vec<(String, Decision)>> {
        let keys = self.keys();
        let index = keys.txrepo(&record.repo);
        let resp = self
            .txn(Txn::new().and_then([get_prefix_op(&index)]))
            .await?;
        let open: Vec<(String, i64)> = by_tail(&ranges(&resp)[0], &index)
            .into_iter()
            .map(|(id, e)| (id, e.create_revision))
            .collect();
        if open.len() < 2 || !open.iter().any(|(id, _)| *id == record.id) {
            return Ok(Vec::new());
        }
        let mut contenders = Vec::new();
        for chunk in open.chunks(PER_TXN) {
            let reads: Vec<_> = chunk
                .iter()
                .flat_map(|(id, _)| {
                    [
                        get_op(&keys.tx_record(id)),
                        get_prefix_op(&keys.votes(id, key)),
                        get_op(&keys.decided(id, key)),
                    ]
                })
                .collect();
            let resp = self.txn(Txn::new().and_then(reads)).await?;
            let r = ranges(&resp);
            for ((id, created), found) in chunk.iter().zip(r.chunks(3)) {
                let (Some(rec), [], false) = (found[0].first(), &found[2][..], found[1].is_empty())
                else {
                    continue;
                };
                let rec: TxRecord = rec.decode()?;
                let mut state = KeyState::default();
                for (v, e) in by_tail(&found[1], &keys.votes(id, key)) {
                    if rec.voters.contains(&v) {
                        let vote: VoteRecord = e.decode()?;
                        state.votes.insert(v, vote.hash);
                    }
                }
                if !state.votes.is_empty() {
                    contenders.push(Contender {
                        record: rec,
                        created: *created,
                        key: state,
                    });
                }
            }
        }
        let Some(winner) = contenders.iter().min_by_key(|c| (c.created, &c.record.id)) else {
            return Ok(Vec::new());
        };
        let winner = winner.record.id.clone();
        let mut aborted = Vec::new();
        for loser in race::losers(&contenders, &record.id) {
            let d = race::abort(loser, &winner, &vote.first_ref, voter);
            if let Some(stored) = self
                .abort_key(&loser.record, key, &loser.key, d, None)
                .await?
            {
                tracing::info!(
                    tx = %loser.record.id,
                    key,
                    winner = %winner,
                    by = %stored.by,
                    "a write racing an older one on the same refs aborted"
                );
                aborted.push((loser.record.id.clone(), stored));
            }
        }
        Ok(aborted)
    }
}
