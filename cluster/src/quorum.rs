//! The quorum rules, as pure functions over what was read from etcd: when a vote key is
//! decided, and which voters a finished transaction promotes.

use std::collections::{BTreeMap, BTreeSet};

use crate::records::{Decision, RepoRecord};

/// Votes needed out of `assigned` replicas: a strict majority.
pub fn threshold(assigned: usize) -> usize {
    assigned / 2 + 1
}

impl RepoRecord {
    /// Votes needed to commit: a majority of the assigned replicas, whatever is alive.
    pub fn threshold(&self) -> usize {
        threshold(self.assigned.len())
    }
}

/// What is known about one vote key of one transaction.
#[derive(Debug, Default, Clone)]
pub struct KeyState {
    /// voter → hash it voted.
    pub votes: BTreeMap<String, String>,
}

/// Decides a key if the votes allow it: a hash with at least `threshold` votes commits;
/// when no hash can reach `threshold` any more (counting voters that may still vote,
/// i.e. neither voted, finished nor failed), the key aborts. `None`: wait.
pub fn evaluate(
    voters: &[String],
    threshold: usize,
    assigned: usize,
    key: &KeyState,
    finished: &BTreeSet<String>,
    by: &str,
) -> Option<Decision> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (voter, hash) in &key.votes {
        if voters.contains(voter) {
            *counts.entry(hash.as_str()).or_default() += 1;
        }
    }
    if let Some((hash, &n)) = counts.iter().max_by_key(|(_, n)| **n)
        && n >= threshold
    {
        return Some(Decision {
            hash: Some((*hash).to_owned()),
            agreed: n,
            threshold,
            assigned,
            by: by.to_owned(),
            reason: format!("{n} of {assigned} replicas agreed, {threshold} needed"),
        });
    }
    let best = counts.values().copied().max().unwrap_or(0);
    let pending = voters
        .iter()
        .filter(|v| !key.votes.contains_key(*v) && !finished.contains(*v))
        .count();
    if best + pending < threshold {
        return Some(abort(best, threshold, assigned, by));
    }
    None
}

/// How many votes the most popular hash of a key has.
pub fn most_votes(key: &KeyState) -> usize {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for h in key.votes.values() {
        *counts.entry(h.as_str()).or_default() += 1;
    }
    counts.values().copied().max().unwrap_or(0)
}

/// An abort decision with `best` votes for the most popular hash.
pub fn abort(best: usize, threshold: usize, assigned: usize, by: &str) -> Decision {
    Decision {
        hash: None,
        agreed: best,
        threshold,
        assigned,
        by: by.to_owned(),
        reason: format!("{best} of {assigned} replicas agreed, {threshold} needed"),
    }
}

/// What one voter did in a transaction, as finalize sees it.
#[derive(Debug, Clone, Default)]
pub struct VoterReport {
    /// Keys this voter confirmed (saw `committed` for).
    pub confirmed: BTreeSet<String>,
    /// `Some(ok)` once git finished on it; `None` if it has not (or failed silently).
    pub done: Option<bool>,
    /// Its replica was up to date at the repository's current generation.
    pub current: bool,
}

/// Voters promoted by a finished transaction. With committed keys: the voters that
/// confirmed every one and were current. With none (no ref changed anywhere): the
/// voters that were current and whose RPC succeeded — never vacuously.
pub fn promoted(
    committed_keys: &BTreeSet<String>,
    reports: &BTreeMap<String, VoterReport>,
) -> BTreeSet<String> {
    reports
        .iter()
        .filter(|(_, r)| r.current)
        .filter(|(_, r)| {
            if committed_keys.is_empty() {
                r.done == Some(true)
            } else {
                committed_keys.is_subset(&r.confirmed)
            }
        })
        .map(|(v, _)| v.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voters() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    fn key(votes: &[(&str, &str)]) -> KeyState {
        KeyState {
            votes: votes
                .iter()
                .map(|(v, h)| (v.to_string(), h.to_string()))
                .collect(),
        }
    }

    #[test]
    fn thresholds() {
        assert_eq!(threshold(1), 1);
        assert_eq!(threshold(2), 2);
        assert_eq!(threshold(3), 2);
        assert_eq!(threshold(4), 3);
        assert_eq!(threshold(5), 3);
    }

    #[test]
    fn majority_commits() {
        let d = evaluate(
            &voters(),
            2,
            3,
            &key(&[("a", "h1"), ("b", "h1")]),
            &BTreeSet::new(),
            "x",
        )
        .unwrap();
        assert_eq!(d.hash.as_deref(), Some("h1"));
        assert_eq!(d.agreed, 2);
    }

    #[test]
    fn waits_while_a_majority_is_possible() {
        assert!(evaluate(&voters(), 2, 3, &key(&[("a", "h1")]), &BTreeSet::new(), "x").is_none());
        assert!(
            evaluate(
                &voters(),
                2,
                3,
                &key(&[("a", "h1"), ("b", "h2")]),
                &BTreeSet::new(),
                "x"
            )
            .is_none()
        );
    }

    #[test]
    fn split_votes_abort_once_everyone_voted() {
        let d = evaluate(
            &voters(),
            2,
            3,
            &key(&[("a", "h1"), ("b", "h2"), ("c", "h3")]),
            &BTreeSet::new(),
            "x",
        )
        .unwrap();
        assert!(!d.is_commit());
        assert_eq!(d.reason, "1 of 3 replicas agreed, 2 needed");
    }

    #[test]
    fn finished_voters_count_as_no() {
        let finished: BTreeSet<String> = ["b".to_string(), "c".to_string()].into();
        let d = evaluate(&voters(), 2, 3, &key(&[("a", "h1")]), &finished, "x").unwrap();
        assert!(!d.is_commit());
        // Threshold counts over assigned replicas, not over the voters present.
        let two = vec!["a".to_string(), "b".to_string()];
        let finished: BTreeSet<String> = ["b".to_string()].into();
        assert!(
            !evaluate(&two, 2, 3, &key(&[("a", "h1")]), &finished, "x")
                .unwrap()
                .is_commit()
        );
    }

    #[test]
    fn votes_from_outside_the_voter_set_do_not_count() {
        assert!(
            evaluate(
                &voters(),
                2,
                3,
                &key(&[("a", "h1"), ("z", "h1")]),
                &BTreeSet::new(),
                "x"
            )
            .is_none()
        );
    }

    #[test]
    fn promotion_needs_every_committed_key_and_a_current_replica() {
        let keys: BTreeSet<String> = ["k1".to_string(), "k2".to_string()].into();
        let mut reports = BTreeMap::new();
        reports.insert(
            "a".to_string(),
            VoterReport {
                confirmed: keys.clone(),
                done: Some(true),
                current: true,
            },
        );
        reports.insert(
            "b".to_string(),
            VoterReport {
                confirmed: ["k1".to_string()].into(),
                done: Some(true),
                current: true,
            },
        );
        reports.insert(
            "c".to_string(),
            VoterReport {
                confirmed: keys.clone(),
                done: None,
                current: false,
            },
        );
        assert_eq!(promoted(&keys, &reports), ["a".to_string()].into());
    }

    #[test]
    fn no_ref_change_promotes_on_rpc_success_only() {
        let mut reports = BTreeMap::new();
        reports.insert(
            "a".to_string(),
            VoterReport {
                confirmed: BTreeSet::new(),
                done: Some(true),
                current: true,
            },
        );
        reports.insert(
            "b".to_string(),
            VoterReport {
                confirmed: BTreeSet::new(),
                done: Some(false),
                current: true,
            },
        );
        reports.insert(
            "c".to_string(),
            VoterReport {
                confirmed: BTreeSet::new(),
                done: None,
                current: true,
            },
        );
        assert_eq!(
            promoted(&BTreeSet::new(), &reports),
            ["a".to_string()].into()
        );
    }
}
