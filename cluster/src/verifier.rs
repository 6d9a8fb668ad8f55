//! The background verifier's records in etcd: which router verifies which shard of the
//! repositories (claims under the router's lease), each verifier's progress (a status
//! record under its lease, read by the ops web and `votingctl status`), and the reads
//! a quiet comparison needs. The choices are in [`crate::decide::verify`]; marking a
//! changed replica outdated is [`Store::mark_outdated_if_unchanged`], the one fence
//! `votingctl verify` uses too.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::repo::RepoId;
use crate::repository::RepoView;
use crate::store::{Store, by_tail, encode, entries, get_prefix_op, ranges};

/// A router's verifier, as it last reported itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifierStatus {
    pub router: String,
    /// Shards of the repositories this router verifies (of
    /// [`SHARDS`](crate::decide::verify::SHARDS)).
    pub shards: Vec<u32>,
    /// Passes started since the router started (the current one included).
    pub pass: u64,
    pub pass_started_unix_ms: u64,
    /// Repositories of its shards looked at in the current pass, and how many of them
    /// its shards held when the pass began (0 until the listing is done).
    pub pass_done: u64,
    pub pass_total: u64,
    /// When the last full pass ended (0: none yet) and how long it took.
    pub last_full_pass_unix_ms: u64,
    pub last_full_pass_ms: u64,
    /// Since the router started: replicas whose checksums were compared, repositories
    /// skipped because writes kept them busy, replicas found changed and outdated.
    pub replicas_checked: u64,
    pub busy_skipped: u64,
    pub mismatches: u64,
    /// The last replicas found changed: `<repo> <node> <unix ms>: <why>`, newest first.
    pub recent_mismatches: Vec<String>,
}

impl VerifierStatus {
    /// One line for a person (`votingctl status`), `now_unix_ms` being the time now.
    pub fn line(&self, now_unix_ms: u64) -> String {
        let last = if self.last_full_pass_unix_ms == 0 {
            "no full pass yet".to_string()
        } else {
            format!(
                "last full pass {}s ago ({} ms)",
                now_unix_ms.saturating_sub(self.last_full_pass_unix_ms) / 1000,
                self.last_full_pass_ms
            )
        };
        format!(
            "{}: {} shards, pass {} at {}/{}, {last}, {} replicas checked, {} busy skipped, {} mismatches",
            self.router,
            self.shards.len(),
            self.pass,
            self.pass_done,
            self.pass_total,
            self.replicas_checked,
            self.busy_skipped,
            self.mismatches
        )
    }
}

impl Store {
    /// The live routers and the shard claims, at one revision.
    pub async fn verifier_claims(&self) -> Result<(BTreeSet<String>, BTreeMap<u32, String>)> {
        let keys = self.keys();
        let routers = format!("{}routers/", keys.prefix());
        let claims = keys.verifier_claims();
        let resp = self
            .txn(Txn::new().and_then([get_prefix_op(&routers), get_prefix_op(&claims)]))
            .await?;
        let r = ranges(&resp);
        let live = by_tail(&r[0], &routers).into_keys().collect();
        let held = by_tail(&r[1], &claims)
            .into_iter()
            .filter_map(|(shard, e)| {
                Some((
                    shard.parse().ok()?,
                    String::from_utf8_lossy(&e.value).into_owned(),
                ))
            })
            .collect();
        Ok((live, held))
    }

    /// Claims `shard` for `me` under `lease` if nobody holds it. Whether it did.
    pub async fn claim_shard(&self, shard: u32, me: &str, lease: i64) -> Result<bool> {
        let key = self.keys().verifier_claim(shard);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                me,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// Gives `shard` back, if `me` holds it.
    pub async fn release_shard(&self, shard: u32, me: &str) -> Result<()> {
        let key = self.keys().verifier_claim(shard);
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, me)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.txn(txn).await?;
        Ok(())
    }

    pub async fn put_verifier_status(&self, status: &VerifierStatus, lease: i64) -> Result<()> {
        let key = self.keys().verifier_status(&status.router);
        let value = encode(status);
        self.request(|mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    /// Every live router's verifier status, by router id.
    pub async fn verifier_statuses(&self) -> Result<Vec<VerifierStatus>> {
        let (list, _) = self.get_prefix(&self.keys().verifier_statuses()).await?;
        Ok(list.iter().filter_map(|e| e.decode().ok()).collect())
    }

    /// Up to `limit` registered repositories after `after` (a key segment; `None`:
    /// from the start), by key: one keys-only range read, whatever the number
    /// registered.
    pub async fn repo_segments_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        let prefix = self.keys().repos();
        let start = match after {
            Some(s) => {
                let mut k = format!("{prefix}{s}").into_bytes();
                k.push(0);
                k
            }
            None => prefix.clone().into_bytes(),
        };
        // The prefix ends in '/': the range ends before '0'.
        let mut range_end = prefix.clone().into_bytes();
        if let Some(last) = range_end.last_mut() {
            *last += 1;
        }
        let resp = self
            .request(|mut c| {
                let (start, range_end) = (start.clone(), range_end.clone());
                async move {
                    c.get(
                        start,
                        Some(
                            GetOptions::new()
                                .with_range(range_end)
                                .with_limit(limit as i64)
                                .with_keys_only(),
                        ),
                    )
                    .await
                }
            })
            .await?;
        Ok(entries(&resp)
            .iter()
            .filter_map(|e| e.key.strip_prefix(&prefix).map(str::to_owned))
            .collect())
    }

    /// The repository's view and how many of its transactions are open, at one
    /// revision.
    pub async fn quiet_view(&self, repo: &RepoId) -> Result<(RepoView, usize)> {
        let (view, rest) = self
            .repo_view_with(repo, vec![get_prefix_op(&self.keys().txrepo(repo))])
            .await?;
        Ok((view, rest.first().map_or(0, Vec::len)))
    }
}
