//! GitLab's checks inside a transaction (DESIGN.md §8): which voter runs them, what
//! their verdict lets commit, and what a voter waiting for the verdict does next.
//!
//! A transaction whose call carries a GitLab user is *gated*: its record names one
//! designated voter, and `tx/<id>/verdict` (created once) holds what that voter's
//! checks decided. The rule this module adds to the vote is one line: a key commits
//! only with threshold equal votes **and** an allow verdict. A deny aborts every key.
//! When the designated voter can no longer give a verdict (it finished, was reported
//! failed, lost its lease, or never started before the creator died), whoever sees it
//! first writes a deny, create-only: the fence. Both writes are create-only, so exactly
//! one verdict exists, and an allow that loses the race to a fence is simply not the
//! verdict. Nobody fences on their own clock.

use crate::error::{Error, Result};
use crate::records::{Decision, TxRecord, VerdictRecord};
use crate::repository::RepoView;

use super::key::KeyView;

/// The voter of `voters` (in record order) that runs GitLab's checks for transaction
/// `id`: deterministic, so it can be recomputed for a check, and spread over the voters
/// by the id, so one node does not run every repository's checks. `None` without voters.
pub fn designate(id: &str, voters: &[String]) -> Option<String> {
    if voters.is_empty() {
        return None;
    }
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Some(voters[(h % voters.len() as u64) as usize].clone())
}

/// `record` (as [`super::begin::transaction`] chose it from `view`) gated by GitLab's
/// checks: one voter designated, when the voters call GitLab's API or run custom
/// hooks from a global directory (or both). Refused when the voters disagree on either
/// ([`Error::MixedGitlab`]): which voter is designated would then decide what the
/// update is checked by. When none has either, there is nothing to check with: the
/// record stays ungated, as without a GitLab user.
pub fn gated(view: &RepoView, mut record: TxRecord) -> Result<TxRecord> {
    let node = |v: &String| view.live_nodes.get(v).map(|(n, _)| n);
    let api = |v: &String| node(v).is_some_and(|n| n.gitlab_api);
    let custom = |v: &String| node(v).is_some_and(|n| n.custom_hooks);
    for (what, has) in [
        ("internal API", &api as &dyn Fn(&String) -> bool),
        ("custom hooks directory", &custom),
    ] {
        let (with, without): (Vec<String>, Vec<String>) =
            record.voters.iter().cloned().partition(|v| has(v));
        if !with.is_empty() && !without.is_empty() {
            return Err(Error::MixedGitlab {
                what,
                with,
                without,
            });
        }
    }
    if record.voters.iter().any(|v| api(v) || custom(v)) {
        record.designated = designate(&record.id, &record.voters);
    }
    Ok(record)
}

/// What GitLab's checks let a transaction's keys do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate<'a> {
    /// Not gated: the votes alone decide.
    Open,
    /// Gated, no verdict yet: nothing may commit.
    Waiting,
    Allow,
    Deny(&'a VerdictRecord),
}

impl Gate<'_> {
    /// Threshold equal votes commit a key.
    pub fn lets_commit(&self) -> bool {
        matches!(self, Gate::Open | Gate::Allow)
    }
}

/// The gate of transaction `record` given its stored verdict, if any. A verdict counts
/// even in a transaction that is not gated (nobody writes one there; if someone did, a
/// deny must not be ignored).
pub fn gate<'a>(record: &TxRecord, verdict: Option<&'a VerdictRecord>) -> Gate<'a> {
    match (verdict, &record.designated) {
        (Some(v), _) if v.allow => Gate::Allow,
        (Some(v), _) => Gate::Deny(v),
        (None, Some(_)) => Gate::Waiting,
        (None, None) => Gate::Open,
    }
}

/// Why the designated voter of the transaction `view` shows can give no verdict any
/// more, if it cannot: it is one of the finished voters ([`KeyView::finished`]).
pub fn designated_gone(view: &KeyView) -> Option<String> {
    let record = view.record.as_ref()?;
    let designated = record.designated.as_deref()?;
    if !view.finished().contains(designated) {
        return None;
    }
    let lease = view.node_leases.get(designated).copied();
    Some(if view.done.contains(designated) {
        "finished without giving a verdict".to_owned()
    } else if !super::holds_lease(record, designated, lease) {
        "lost its node's lease".to_owned()
    } else {
        "was never started before the transaction's creator died".to_owned()
    })
}

/// The deny `by` writes for the designated voter of `record`, which `why` (see
/// [`designated_gone`]).
pub fn fence(record: &TxRecord, by: &str, why: &str) -> VerdictRecord {
    let designated = record
        .designated
        .as_deref()
        .unwrap_or("the designated voter");
    VerdictRecord {
        allow: false,
        by: by.to_owned(),
        message: format!(
            "refvote: update rejected: GitLab's checks did not finish: {designated}, which ran them, {why}"
        ),
        detail: serde_json::Value::Null,
    }
}

/// The abort every key of `record` adopts under the deny `verdict`, without a write of
/// its own: the verdict is the decision.
pub fn denied(record: &TxRecord, verdict: &VerdictRecord) -> Decision {
    Decision {
        hash: None,
        agreed: 0,
        threshold: record.threshold,
        assigned: record.assigned,
        by: verdict.by.clone(),
        reason: verdict.message.clone(),
    }
}

/// What a voter waiting for the verdict does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Await {
    /// The verdict is stored: adopt it.
    Verdict(VerdictRecord),
    /// The designated voter can give none: write this deny (create-only), then adopt
    /// whatever is stored.
    Fence(VerdictRecord),
    Wait,
    /// The transaction is not gated: there is nothing to wait for.
    Ungated,
    /// The transaction is gone (finalized, or never created).
    Gone,
}

/// The next step of `by`, waiting for the verdict of the transaction `view` shows.
pub fn next(view: &KeyView, by: &str) -> Await {
    if let Some(v) = &view.verdict {
        return Await::Verdict(v.clone());
    }
    let Some(record) = &view.record else {
        return Await::Gone;
    };
    if record.designated.is_none() {
        return Await::Ungated;
    }
    match designated_gone(view) {
        Some(why) => Await::Fence(fence(record, by, &why)),
        None => Await::Wait,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::fixtures::{leases, names, record, set};
    use super::*;
    use crate::records::NodeRecord;
    use crate::store::{Entry, encode};

    fn gated_record() -> TxRecord {
        TxRecord {
            designated: Some("b".into()),
            ..record()
        }
    }

    fn view() -> KeyView {
        KeyView {
            record: Some(gated_record()),
            alive: true,
            started: set(&["a", "b", "c"]),
            node_leases: leases(),
            ..KeyView::default()
        }
    }

    fn allow() -> VerdictRecord {
        VerdictRecord {
            allow: true,
            by: "b".into(),
            message: String::new(),
            detail: serde_json::Value::Null,
        }
    }

    #[test]
    fn the_designated_voter_is_one_of_the_voters_the_same_for_everyone() {
        let voters = names(&["a", "b", "c"]);
        let d = designate("0f3c2a9e4b7d41c8a6e5f0b1c2d3e4f5", &voters).unwrap();
        assert!(voters.contains(&d));
        assert_eq!(
            designate("0f3c2a9e4b7d41c8a6e5f0b1c2d3e4f5", &voters).unwrap(),
            d
        );
        assert_eq!(designate("t", &[]), None);
        assert_eq!(designate("t", &names(&["only"])).as_deref(), Some("only"));
        // Spread over the voters by the id.
        let chosen: std::collections::BTreeSet<String> = (0..64)
            .filter_map(|i| designate(&format!("tx{i}"), &voters))
            .collect();
        assert_eq!(chosen, set(&["a", "b", "c"]));
    }

    fn repo_view(gitlab: &[(&str, bool)]) -> RepoView {
        let entry = |value: Vec<u8>| Entry {
            key: String::new(),
            value,
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        };
        let live_nodes: BTreeMap<_, _> = gitlab
            .iter()
            .map(|(n, api)| {
                let node = NodeRecord {
                    name: n.to_string(),
                    address: String::new(),
                    storages: Vec::new(),
                    version: String::new(),
                    gitlab_api: *api,
                    custom_hooks: false,
                    draining: false,
                };
                (n.to_string(), (node.clone(), entry(encode(&node))))
            })
            .collect();
        RepoView {
            revision: 1,
            record: super::super::fixtures::repo(7),
            record_entry: entry(Vec::new()),
            replicas: BTreeMap::new(),
            live_nodes,
            lock: None,
        }
    }

    #[test]
    fn a_gated_transaction_names_its_designated_voter_unless_the_voters_disagree_on_gitlab() {
        let r = gated(
            &repo_view(&[("a", true), ("b", true), ("c", true)]),
            record(),
        )
        .unwrap();
        assert_eq!(r.designated, designate("t1", &r.voters));
        let r = gated(
            &repo_view(&[("a", false), ("b", false), ("c", false)]),
            record(),
        )
        .unwrap();
        assert_eq!(r.designated, None, "no voter calls GitLab: not gated");
        let e = gated(
            &repo_view(&[("a", true), ("b", false), ("c", true)]),
            record(),
        )
        .unwrap_err();
        let Error::MixedGitlab { with, without, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(
            (with.clone(), without.clone()),
            (names(&["a", "c"]), names(&["b"]))
        );
        assert!(e.to_string().contains("configure [gitlab] alike"), "{e}");
    }

    #[test]
    fn the_gate_follows_the_record_and_the_verdict() {
        let deny = fence(&gated_record(), "a", "lost its node's lease");
        assert_eq!(gate(&record(), None), Gate::Open);
        assert_eq!(gate(&gated_record(), None), Gate::Waiting);
        assert_eq!(gate(&gated_record(), Some(&allow())), Gate::Allow);
        assert_eq!(gate(&gated_record(), Some(&deny)), Gate::Deny(&deny));
        assert_eq!(
            gate(&record(), Some(&deny)),
            Gate::Deny(&deny),
            "a deny counts even where nobody should have written one"
        );
        assert!(Gate::Open.lets_commit() && Gate::Allow.lets_commit());
        assert!(!Gate::Waiting.lets_commit() && !Gate::Deny(&deny).lets_commit());
    }

    #[test]
    fn a_waiter_adopts_the_verdict_or_waits() {
        let mut v = view();
        assert_eq!(next(&v, "a"), Await::Wait);
        v.verdict = Some(allow());
        assert_eq!(next(&v, "a"), Await::Verdict(allow()));
        v.record = None;
        assert_eq!(
            next(&v, "a"),
            Await::Verdict(allow()),
            "stored, even once gone"
        );
        v.verdict = None;
        assert_eq!(next(&v, "a"), Await::Gone);
        let ungated = KeyView {
            record: Some(record()),
            ..view()
        };
        assert_eq!(next(&ungated, "a"), Await::Ungated);
    }

    #[test]
    fn a_waiter_fences_a_designated_voter_that_can_give_no_verdict() {
        let fenced = |v: &KeyView| match next(v, "a") {
            Await::Fence(f) => f,
            other => panic!("{other:?}"),
        };
        let mut done = view();
        done.done.insert("b".into());
        let f = fenced(&done);
        assert!(!f.allow);
        assert_eq!(f.by, "a");
        assert_eq!(
            f.message,
            "refvote: update rejected: GitLab's checks did not finish: b, which ran them, finished without giving a verdict"
        );
        let mut lease = view();
        lease.node_leases.insert("b".into(), 99);
        assert!(fenced(&lease).message.ends_with("lost its node's lease"));
        let mut never = view();
        never.started = set(&["a", "c"]);
        assert_eq!(
            next(&never, "a"),
            Await::Wait,
            "the creator may still start b"
        );
        never.alive = false;
        assert!(
            fenced(&never)
                .message
                .ends_with("never started before the transaction's creator died")
        );
        // Another voter finishing changes nothing.
        let mut other = view();
        other.done.insert("c".into());
        assert_eq!(next(&other, "a"), Await::Wait);
        assert_eq!(designated_gone(&other), None);
    }

    #[test]
    fn a_deny_is_every_keys_abort() {
        let deny = fence(&gated_record(), "a", "finished without giving a verdict");
        let d = denied(&gated_record(), &deny);
        assert_eq!(d.hash, None);
        assert_eq!((d.threshold, d.assigned), (2, 3));
        assert_eq!(d.by, "a");
        assert_eq!(d.reason, deny.message);
    }
}
