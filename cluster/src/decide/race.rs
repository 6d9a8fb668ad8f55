//! Writes that race (DESIGN.md §9): open transactions of one repository that voted on
//! the same vote key (the same set of refs, the same occurrence) with none of them
//! decided. Each replica's git holds the refs' locks for the first of them to reach it,
//! so racing pushes can each hold one replica and wait for the others: a vote split in
//! which every one of them aborts. The order between them is the etcd revision at which
//! each transaction was created: only the oldest may still win, the others abort, so
//! their locks are released and the oldest's git, waiting on those locks, can vote on
//! every replica. Whoever sees such a race applies the rule (every contender's voters
//! check after their vote), so the voter that votes last always sees every contender.

use crate::quorum::{KeyState, most_votes};
use crate::records::{Decision, TxRecord};

/// One open transaction with votes on the key and no decision on it.
#[derive(Debug, Clone)]
pub struct Contender {
    pub record: TxRecord,
    /// The etcd revision the transaction was created at: its place in the order.
    pub created: i64,
    pub key: KeyState,
}

/// The contenders that must abort: all but the oldest, the one checking (`own`) last
/// so that a voter whose own abort ends its wait has aborted the others first. Fewer
/// than two contenders: no race. One that already has threshold votes of one hash has
/// committed (commits are never written: the votes are the decision), so the race is
/// won and nobody aborts: an abort written over it would undo a commit.
pub fn losers<'a>(contenders: &'a [Contender], own: &str) -> Vec<&'a Contender> {
    if contenders
        .iter()
        .any(|c| most_votes(&c.key) >= c.record.threshold)
    {
        return Vec::new();
    }
    let Some(oldest) = contenders.iter().min_by_key(|c| (c.created, &c.record.id)) else {
        return Vec::new();
    };
    let mut out: Vec<&Contender> = contenders
        .iter()
        .filter(|c| c.record.id != oldest.record.id)
        .collect();
    out.sort_by_key(|c| (c.record.id == own, c.created));
    out
}

/// The abort of `loser`'s key, written by `by`, naming the transaction that goes first
/// and the ref the pusher asked for.
pub fn abort(loser: &Contender, winner: &str, first_ref: &str, by: &str) -> Decision {
    let what = if first_ref.is_empty() {
        "the same refs".to_owned()
    } else {
        first_ref.to_owned()
    };
    Decision {
        hash: None,
        agreed: most_votes(&loser.key),
        threshold: loser.record.threshold,
        assigned: loser.record.assigned,
        by: by.to_owned(),
        reason: format!(
            "a concurrent write to {what} began first (transaction {winner}) and goes \
             first; fetch and try again"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::record;
    use super::*;

    fn contender(id: &str, created: i64) -> Contender {
        let mut record = record();
        record.id = id.into();
        let mut key = KeyState::default();
        key.votes.insert("a".into(), format!("hash-{id}"));
        Contender {
            record,
            created,
            key,
        }
    }

    fn ids(v: &[&Contender]) -> Vec<String> {
        v.iter().map(|c| c.record.id.clone()).collect()
    }

    #[test]
    fn no_race_without_two_contenders() {
        assert!(losers(&[], "t1").is_empty());
        assert!(losers(&[contender("t1", 5)], "t1").is_empty());
    }

    #[test]
    fn every_contender_but_the_oldest_loses_and_the_checker_comes_last() {
        let all = [contender("t2", 9), contender("t1", 5), contender("t3", 7)];
        assert_eq!(ids(&losers(&all, "t2")), ["t3", "t2"]);
        assert_eq!(ids(&losers(&all, "t3")), ["t2", "t3"]);
        // The oldest checking aborts the two others.
        assert_eq!(ids(&losers(&all, "t1")), ["t3", "t2"]);
    }

    #[test]
    fn a_contender_with_a_majority_has_won_and_nobody_aborts() {
        let mut committed = contender("t3", 7);
        committed.key.votes.insert("b".into(), "hash-t3".into());
        let all = [contender("t1", 5), committed.clone()];
        assert!(losers(&all, "t1").is_empty());
        assert!(losers(&all, "t3").is_empty());
        // Two votes of different hashes are no majority.
        let mut split = contender("t3", 7);
        split.key.votes.insert("b".into(), "other".into());
        assert_eq!(ids(&losers(&[contender("t1", 5), split], "t1")), ["t3"]);
    }

    #[test]
    fn every_checker_agrees_on_the_winner() {
        let all = [contender("t2", 9), contender("t1", 5), contender("t3", 7)];
        for own in ["t1", "t2", "t3"] {
            assert!(!ids(&losers(&all, own)).contains(&"t1".to_owned()));
        }
    }

    #[test]
    fn the_abort_names_the_winner_and_the_ref() {
        let c = contender("t2", 9);
        let d = abort(&c, "t1", "refs/heads/main", "node1");
        assert!(!d.is_commit());
        assert_eq!((d.agreed, d.threshold, d.assigned), (1, 2, 3));
        assert_eq!(d.by, "node1");
        assert!(d.reason.contains("refs/heads/main"), "{}", d.reason);
        assert!(d.reason.contains("transaction t1"), "{}", d.reason);
        let d = abort(&c, "t1", "", "node1");
        assert!(d.reason.contains("the same refs"), "{}", d.reason);
    }
}
