//! A voter's choices on one vote key (DESIGN.md §2 step 5): whether its vote counts,
//! which voters can no longer vote, and whether the key is decided, must be aborted, or
//! needs waiting for. Nobody decides from their own clock: a wait ends on what etcd
//! shows (a vote, a report, a lease lost, the transaction gone) or on the voter's own
//! deadline, which makes it abort without a decision.

use crate::error::Error;
use crate::quorum;
use crate::records::{Decision, TxRecord, VerdictRecord};

pub use super::key::KeyView;
use super::verdict::{self, Gate};

/// The record `voter`'s vote on the key of `view` counts in, or why it does not: the
/// transaction is unknown (finished or never created), `voter` is none of its voters,
/// or — when etcd refused to store the vote (`stored` false) although the key is
/// undecided and the voter has no vote on it yet — the voter was reported done, the
/// creator's lease is gone, or the voter never started. `tx` names the transaction in
/// the error.
pub fn admitted<'a>(
    view: &'a KeyView,
    tx: &str,
    voter: &str,
    stored: bool,
) -> Result<&'a TxRecord, Error> {
    let record = view
        .record
        .as_ref()
        .ok_or_else(|| Error::UnknownTx(tx.to_owned()))?;
    let who = || (tx.to_owned(), voter.to_owned());
    if !record.voters.iter().any(|v| v == voter) {
        let (tx, voter) = who();
        return Err(Error::NotAVoter { tx, voter });
    }
    // A refused vote still waits for the decision when the key is decided or this
    // voter's vote is already there (a retried vote finds its first attempt).
    if stored || view.aborted.is_some() || view.key.votes.contains_key(voter) {
        return Ok(record);
    }
    if view.done.contains(voter) {
        let (tx, voter) = who();
        return Err(Error::VoterDone { tx, voter });
    }
    if !view.alive {
        return Err(Error::Abandoned(tx.to_owned()));
    }
    if !view.started.contains(voter) {
        let (tx, voter) = who();
        return Err(Error::NotStarted { tx, voter });
    }
    Ok(record)
}

/// What a voter does next on its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// An abort is stored: adopt it.
    Adopt(Decision),
    /// Threshold voters voted one hash: that is the decision (a commit needs no write
    /// of its own; everyone sees it in the votes).
    Commit(Decision),
    /// No hash can reach threshold any more: write this abort (create-only, and only
    /// while no new vote arrived), then adopt whatever is stored.
    Abort(Decision),
    /// The transaction is gated and its designated voter can give no verdict any more:
    /// write this deny (create-only), then evaluate again.
    Fence(VerdictRecord),
    /// A majority is still possible: wait for anything that can change this.
    Wait,
    /// The transaction is gone (finalized meanwhile).
    Gone,
}

/// The next step of `voter` on the key `view` shows. In a gated transaction a key
/// commits only under an allow verdict, and a deny is every key's abort.
pub fn next(view: &KeyView, voter: &str) -> Next {
    if let Some(d) = &view.aborted {
        return Next::Adopt(d.clone());
    }
    let Some(record) = &view.record else {
        return Next::Gone;
    };
    let gate = verdict::gate(record, view.verdict.as_ref());
    match gate {
        Gate::Deny(v) => return Next::Adopt(verdict::denied(record, v)),
        Gate::Waiting => {
            if let Some(why) = verdict::designated_gone(view) {
                return Next::Fence(verdict::fence(record, voter, &why));
            }
        }
        Gate::Open | Gate::Allow => {}
    }
    match quorum::evaluate(
        &record.voters,
        record.threshold,
        record.assigned,
        &view.key,
        &view.finished(),
        voter,
    ) {
        Some(d) if d.is_commit() && gate.lets_commit() => Next::Commit(d),
        // Threshold votes without the verdict: no update commits unchecked.
        Some(d) if d.is_commit() => Next::Wait,
        Some(d) => Next::Abort(d),
        None => Next::Wait,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use crate::quorum::KeyState;

    use super::super::fixtures::{abort, leases, record, set};
    use super::*;

    /// A live transaction, every voter started, no vote yet.
    fn view() -> KeyView {
        KeyView {
            record: Some(record()),
            alive: true,
            started: set(&["a", "b", "c"]),
            done: BTreeSet::new(),
            node_leases: leases(),
            key: KeyState::default(),
            aborted: None,
            verdict: None,
        }
    }

    fn voted(mut view: KeyView, votes: &[(&str, &str)]) -> KeyView {
        for (v, h) in votes {
            view.key.votes.insert(v.to_string(), h.to_string());
        }
        view
    }

    #[test]
    fn finished_voters_are_done_failed_or_never_started_once_the_creator_died() {
        let mut v = view();
        assert!(v.finished().is_empty());
        v.done.insert("a".into());
        assert_eq!(v.finished(), set(&["a"]));
        v.node_leases.insert("b".into(), 99);
        assert_eq!(v.finished(), set(&["a", "b"]), "b registered again");
        v.node_leases.remove("c");
        assert_eq!(v.finished(), set(&["a", "b", "c"]), "c not registered");

        let mut v = view();
        v.started = set(&["a"]);
        assert!(
            v.finished().is_empty(),
            "the creator lives: b and c may start"
        );
        v.alive = false;
        assert_eq!(v.finished(), set(&["b", "c"]));

        let mut v = view();
        v.record = None;
        v.done.insert("a".into());
        assert!(v.finished().is_empty(), "no record, no voters");
    }

    #[test]
    fn a_stored_vote_counts_in_its_record() {
        let v = view();
        assert_eq!(admitted(&v, "t1", "a", true).unwrap().id, "t1");
        // Stored, even though the view says otherwise (read in the same txn, so it
        // cannot; the store is what counts).
        let mut odd = view();
        odd.done.insert("a".into());
        assert!(admitted(&odd, "t1", "a", true).is_ok());
    }

    #[test]
    fn a_vote_in_an_unknown_transaction_or_by_a_stranger_never_counts() {
        let mut v = view();
        v.record = None;
        assert!(matches!(
            admitted(&v, "t1", "a", true),
            Err(Error::UnknownTx(t)) if t == "t1"
        ));
        assert!(matches!(
            admitted(&view(), "t1", "z", true),
            Err(Error::NotAVoter { voter, .. }) if voter == "z"
        ));
    }

    #[test]
    fn a_refused_vote_says_why() {
        let mut v = view();
        v.done.insert("a".into());
        v.alive = false;
        v.started.clear();
        // Reported done first: it counts as "no" everywhere already.
        assert!(matches!(
            admitted(&v, "t1", "a", false),
            Err(Error::VoterDone { .. })
        ));
        v.done.clear();
        assert!(matches!(
            admitted(&v, "t1", "a", false),
            Err(Error::Abandoned(t)) if t == "t1"
        ));
        v.alive = true;
        assert!(matches!(
            admitted(&v, "t1", "a", false),
            Err(Error::NotStarted { .. })
        ));
        // Refused with every condition of the vote's compares holding in the read: it
        // cannot happen (one read, one revision); the voter then waits like any other.
        v.started.insert("a".into());
        assert!(admitted(&v, "t1", "a", false).is_ok());
    }

    #[test]
    fn a_refused_vote_still_waits_when_the_key_is_decided_or_it_voted_before() {
        let mut v = view();
        v.alive = false;
        v.aborted = Some(abort(1));
        assert!(admitted(&v, "t1", "a", false).is_ok(), "decided");
        let v = voted(
            KeyView {
                alive: false,
                ..view()
            },
            &[("a", "h1")],
        );
        assert!(admitted(&v, "t1", "a", false).is_ok(), "a retried vote");
        assert!(
            admitted(&v, "t1", "b", false).is_err(),
            "another voter's vote is not b's"
        );
    }

    #[test]
    fn threshold_equal_hashes_commit() {
        let v = voted(view(), &[("a", "h1"), ("b", "h1")]);
        let Next::Commit(d) = next(&v, "b") else {
            panic!("{:?}", next(&v, "b"))
        };
        assert_eq!(d.hash.as_deref(), Some("h1"));
        assert_eq!((d.agreed, d.threshold, d.assigned), (2, 2, 3));
        assert_eq!(d.by, "b");
    }

    #[test]
    fn a_stored_abort_is_adopted_whatever_the_votes_say() {
        let mut v = voted(view(), &[("a", "h1"), ("b", "h1")]);
        v.aborted = Some(abort(1));
        assert_eq!(next(&v, "a"), Next::Adopt(abort(1)));
        v.record = None;
        assert_eq!(next(&v, "a"), Next::Adopt(abort(1)), "even once gone");
    }

    #[test]
    fn a_key_stays_open_while_a_majority_is_possible() {
        assert_eq!(next(&view(), "a"), Next::Wait);
        assert_eq!(next(&voted(view(), &[("a", "h1")]), "a"), Next::Wait);
        let split = voted(view(), &[("a", "h1"), ("b", "h2")]);
        assert_eq!(next(&split, "a"), Next::Wait, "c may still agree with one");
    }

    #[test]
    fn a_key_no_hash_can_win_is_aborted() {
        let split = voted(view(), &[("a", "h1"), ("b", "h2"), ("c", "h3")]);
        let Next::Abort(d) = next(&split, "c") else {
            panic!()
        };
        assert_eq!(d.hash, None);
        assert_eq!(d.reason, "1 of 3 replicas agreed, 2 needed");

        // c cannot vote any more: done, failed, or never started with the creator dead.
        let mut done = voted(view(), &[("a", "h1"), ("b", "h2")]);
        done.done.insert("c".into());
        assert!(matches!(next(&done, "a"), Next::Abort(_)));
        let mut failed = voted(view(), &[("a", "h1"), ("b", "h2")]);
        failed.node_leases.insert("c".into(), 42);
        assert!(matches!(next(&failed, "a"), Next::Abort(_)));
        let mut unstarted = voted(view(), &[("a", "h1"), ("b", "h2")]);
        unstarted.started = set(&["a", "b"]);
        assert_eq!(next(&unstarted, "a"), Next::Wait, "the creator may start c");
        unstarted.alive = false;
        assert!(matches!(next(&unstarted, "a"), Next::Abort(_)));
    }

    #[test]
    fn one_vote_and_two_finished_voters_abort() {
        let mut v = voted(view(), &[("a", "h1")]);
        v.done = set(&["b", "c"]);
        let Next::Abort(d) = next(&v, "a") else {
            panic!()
        };
        assert_eq!(d.agreed, 1);
    }

    fn gated(view: KeyView, verdict: Option<VerdictRecord>) -> KeyView {
        let record = view.record.clone().map(|r| TxRecord {
            designated: Some("b".into()),
            ..r
        });
        KeyView {
            record,
            verdict,
            ..view
        }
    }

    fn verdict_of(allow: bool) -> VerdictRecord {
        VerdictRecord {
            allow,
            by: "b".into(),
            message: if allow {
                String::new()
            } else {
                "GitLab: no".into()
            },
            detail: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_gated_key_commits_only_under_an_allow_verdict() {
        let votes = [("a", "h1"), ("b", "h1")];
        let waiting = gated(voted(view(), &votes), None);
        assert_eq!(
            next(&waiting, "a"),
            Next::Wait,
            "threshold votes, no verdict"
        );
        let allowed = gated(voted(view(), &votes), Some(verdict_of(true)));
        assert!(matches!(next(&allowed, "a"), Next::Commit(_)));
        // A key no hash can win still aborts while waiting.
        let split = gated(
            voted(view(), &[("a", "h1"), ("b", "h2"), ("c", "h3")]),
            None,
        );
        assert!(matches!(next(&split, "a"), Next::Abort(_)));
    }

    #[test]
    fn a_deny_verdict_aborts_every_key_without_a_write() {
        let denied = gated(
            voted(view(), &[("a", "h1"), ("b", "h1")]),
            Some(verdict_of(false)),
        );
        let Next::Adopt(d) = next(&denied, "a") else {
            panic!("{:?}", next(&denied, "a"))
        };
        assert_eq!((d.hash, d.reason.as_str()), (None, "GitLab: no"));
        // A stored abort still comes first.
        let mut aborted = denied.clone();
        aborted.aborted = Some(abort(1));
        assert_eq!(next(&aborted, "a"), Next::Adopt(abort(1)));
    }

    #[test]
    fn a_gated_voter_fences_a_designated_voter_that_can_give_no_verdict() {
        let mut v = gated(voted(view(), &[("a", "h1"), ("c", "h1")]), None);
        v.done.insert("b".into());
        let Next::Fence(f) = next(&v, "a") else {
            panic!("{:?}", next(&v, "a"))
        };
        assert!(!f.allow);
        assert_eq!(f.by, "a");
        // Once the verdict is there, it decides.
        v.verdict = Some(verdict_of(true));
        assert!(
            matches!(next(&v, "a"), Next::Commit(_)),
            "an allow that won the race stands"
        );
    }

    #[test]
    fn a_finalized_transaction_is_gone() {
        let mut v = voted(view(), &[("a", "h1"), ("b", "h1")]);
        v.record = None;
        assert_eq!(next(&v, "a"), Next::Gone);
    }
}
