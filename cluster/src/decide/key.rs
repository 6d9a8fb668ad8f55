//! What a voter knows about one vote key of one transaction ([`KeyView`]): the state
//! both the vote's choices ([`super::vote`]) and GitLab's gate ([`super::verdict`])
//! read. No decisions here beyond who can no longer vote.

use std::collections::{BTreeMap, BTreeSet};

use crate::quorum::KeyState;
use crate::records::{Decision, TxRecord, VerdictRecord};

/// What is known about one vote key of one transaction: read at one revision, then
/// kept current from a watch, so a waiting vote never re-reads.
#[derive(Debug, Clone, Default)]
pub struct KeyView {
    /// The transaction's record; `None` once it was finalized (or never existed).
    pub record: Option<TxRecord>,
    /// The creator's lease holds (`tx/<id>/alive` exists).
    pub alive: bool,
    /// Voters whose node began the transaction's RPC.
    pub started: BTreeSet<String>,
    /// Voters reported done (by themselves, or failed by someone else).
    pub done: BTreeSet<String>,
    /// node → lease its registration has now (absent: no registration).
    pub node_leases: BTreeMap<String, i64>,
    pub key: KeyState,
    /// A stored abort decision (`decided/<key>`; commits are never written).
    pub aborted: Option<Decision>,
    /// GitLab's verdict, in a gated transaction ([`super::verdict`]).
    pub verdict: Option<VerdictRecord>,
}

impl KeyView {
    /// Voters that can no longer vote: done, failed (their node lost the lease it had
    /// when the transaction began), or never started by the time the creator died
    /// (a voter not started then never will be: `started` is refused once the creator's
    /// lease is gone).
    pub fn finished(&self) -> BTreeSet<String> {
        let Some(record) = &self.record else {
            return BTreeSet::new();
        };
        record
            .voters
            .iter()
            .filter(|v| {
                self.done.contains(*v)
                    || !super::holds_lease(record, v, self.node_leases.get(*v).copied())
                    || (!self.alive && !self.started.contains(*v))
            })
            .cloned()
            .collect()
    }
}
