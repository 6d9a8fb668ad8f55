//! The decisions of a run, apart from the I/O that feeds them: what a producer round
//! uploads for a repository, which sequences a consumer applies and where it must
//! stop, and whether a target is ready for a sequence, already past it, or changed
//! behind partition sync's back. Each function takes what was read and returns what
//! to do; the produce and consume modules read, call, and act.

use std::collections::BTreeSet;

use crate::naming::Kind;
use crate::refs::RefSet;

/// What a producer round does for one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// The refs are what the last sequence carried: nothing to upload.
    Unchanged,
    /// The source has no refs yet: nothing to carry.
    Empty,
    /// A bundle with everything.
    Full { reason: &'static str },
    /// A bundle of what is new since `exclude` (the last sequence's tips).
    Incremental { exclude: Vec<String> },
}

/// `previous` is the last sequence's ref set (from its manifest), `current` the
/// source's now, `previous_present` those of the previous tips the local mirror has.
pub fn round(
    previous: Option<&RefSet>,
    current: &RefSet,
    previous_present: &[String],
    force_full: bool,
) -> Round {
    let Some(previous) = previous else {
        if current.refs.is_empty() {
            return Round::Empty;
        }
        return Round::Full {
            reason: "first upload",
        };
    };
    if force_full {
        return Round::Full {
            reason: "requested with --full",
        };
    }
    if previous == current {
        return Round::Unchanged;
    }
    if previous_present.is_empty() {
        return Round::Full {
            reason: if previous.refs.is_empty() {
                "the last sequence had no refs"
            } else {
                "none of the last sequence's tips exist at the source any more"
            },
        };
    }
    Round::Incremental {
        exclude: previous_present.to_vec(),
    }
}

/// What the bucket holds for one repository, as its listing shows (names only: the
/// manifests are checked when read).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Sequences with a manifest (committed).
    pub manifests: BTreeSet<u64>,
    /// Sequences whose data object's name says it is a full bundle.
    pub full: BTreeSet<u64>,
}

/// Which sequences a consumer applies, in order, and why it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequences {
    pub apply: Vec<u64>,
    pub stop: Option<Stop>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// `missing` has no manifest though later sequences do, and no full bundle after
    /// it bridges the gap.
    Gap { missing: u64, latest: u64 },
    /// The target records a sequence the bucket does not reach: another bucket or
    /// prefix, or the bucket was emptied.
    Ahead { applied: u64, latest: u64 },
}

/// From the last applied sequence (`None`: nothing yet) and the listing: the
/// contiguous run after it; across a gap only by a full bundle.
pub fn sequences(applied: Option<u64>, listing: &Listing) -> Sequences {
    let latest = listing.manifests.iter().next_back().copied();
    let start = applied.map_or(1, |a| a + 1);
    if let (Some(a), Some(l)) = (applied, latest)
        && a > l
    {
        return Sequences {
            apply: vec![],
            stop: Some(Stop::Ahead {
                applied: a,
                latest: l,
            }),
        };
    }
    if applied.is_some() && latest.is_none() {
        return Sequences {
            apply: vec![],
            stop: Some(Stop::Ahead {
                applied: applied.unwrap_or(0),
                latest: 0,
            }),
        };
    }
    let mut apply = Vec::new();
    let mut next = start;
    let Some(latest) = latest else {
        return Sequences { apply, stop: None };
    };
    while next <= latest {
        if listing.manifests.contains(&next) {
            apply.push(next);
            next += 1;
            continue;
        }
        // A gap: only a full bundle after it can carry the target across.
        match listing
            .full
            .range(next + 1..)
            .find(|s| listing.manifests.contains(s))
        {
            Some(&f) => next = f,
            None => {
                return Sequences {
                    apply,
                    stop: Some(Stop::Gap {
                        missing: next,
                        latest,
                    }),
                };
            }
        }
    }
    Sequences { apply, stop: None }
}

/// The target's side, as a consumer reads it before applying a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub sequence: u64,
    /// The target's fingerprint right after it was applied.
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// The target already holds this sequence's refs (a run that crashed after the
    /// apply, before it recorded it): record it, apply nothing.
    AtTip,
    /// Apply it.
    Ready,
    /// The target's refs are not where this sequence starts.
    Diverged(String),
}

/// Whether sequence `sequence` (of kind `kind`, whose tip fingerprint is `tip`) can be
/// applied to a target whose fingerprint is `current` (`None`: the repository does
/// not exist there) and which recorded `applied`.
pub fn position(
    sequence: u64,
    kind: Kind,
    tip: &str,
    current: Option<&str>,
    applied: Option<&Applied>,
) -> Position {
    if current == Some(tip) {
        return Position::AtTip;
    }
    if kind == Kind::Full {
        return Position::Ready;
    }
    match applied {
        Some(a) if a.sequence + 1 == sequence && current == Some(a.fingerprint.as_str()) => {
            Position::Ready
        }
        Some(a) if a.sequence + 1 == sequence => Position::Diverged(format!(
            "the target's refs changed since sequence {} was applied (outside partition sync)",
            a.sequence
        )),
        Some(a) => Position::Diverged(format!(
            "sequence {sequence} builds on {} but the target is at {}",
            sequence - 1,
            a.sequence
        )),
        None => Position::Diverged(format!(
            "sequence {sequence} is incremental and the target has no sequence applied"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(pairs: &[(&str, char)]) -> RefSet {
        RefSet {
            refs: pairs
                .iter()
                .map(|(n, c)| (n.to_string(), c.to_string().repeat(40)))
                .collect(),
            head: None,
        }
    }

    #[test]
    fn rounds() {
        let a = refs(&[("refs/heads/main", 'a')]);
        let b = refs(&[("refs/heads/main", 'b')]);
        assert_eq!(round(None, &RefSet::default(), &[], false), Round::Empty);
        assert!(matches!(round(None, &a, &[], false), Round::Full { .. }));
        assert_eq!(
            round(Some(&a), &a, &["a".repeat(40)], false),
            Round::Unchanged
        );
        assert!(matches!(round(Some(&a), &a, &[], true), Round::Full { .. }));
        assert_eq!(
            round(Some(&a), &b, &["a".repeat(40)], false),
            Round::Incremental {
                exclude: vec!["a".repeat(40)]
            }
        );
        // The old tip is gone from the source (force push, then gc): start over.
        assert!(matches!(
            round(Some(&a), &b, &[], false),
            Round::Full { .. }
        ));
        // Only HEAD moved: still a new sequence.
        let mut moved = a.clone();
        moved.head = Some("refs/heads/main".into());
        assert!(matches!(
            round(Some(&a), &moved, &["a".repeat(40)], false),
            Round::Incremental { .. }
        ));
    }

    fn listing(manifests: &[u64], full: &[u64]) -> Listing {
        Listing {
            manifests: manifests.iter().copied().collect(),
            full: full.iter().copied().collect(),
        }
    }

    #[test]
    fn sequences_run_contiguously() {
        let l = listing(&[1, 2, 3, 4], &[1]);
        assert_eq!(sequences(None, &l).apply, vec![1, 2, 3, 4]);
        assert_eq!(sequences(Some(2), &l).apply, vec![3, 4]);
        assert_eq!(
            sequences(Some(4), &l),
            Sequences {
                apply: vec![],
                stop: None
            }
        );
        assert_eq!(
            sequences(None, &Listing::default()),
            Sequences {
                apply: vec![],
                stop: None
            }
        );
    }

    #[test]
    fn a_gap_stops_unless_a_full_bundle_bridges_it() {
        let l = listing(&[1, 2, 4, 5], &[1]);
        assert_eq!(
            sequences(Some(1), &l),
            Sequences {
                apply: vec![2],
                stop: Some(Stop::Gap {
                    missing: 3,
                    latest: 5
                })
            }
        );
        let l = listing(&[1, 2, 4, 5, 6], &[1, 5]);
        assert_eq!(sequences(Some(1), &l).apply, vec![2, 5, 6]);
        assert_eq!(sequences(Some(1), &l).stop, None);
        // An orphaned full data object (no manifest) bridges nothing.
        let l = listing(&[1, 2, 5], &[1, 4]);
        assert_eq!(
            sequences(Some(2), &l).stop,
            Some(Stop::Gap {
                missing: 3,
                latest: 5
            })
        );
        // Early sequences pruned from the bucket: start at the first full one.
        let l = listing(&[3, 4, 5], &[3]);
        assert_eq!(sequences(None, &l).apply, vec![3, 4, 5]);
    }

    #[test]
    fn a_target_ahead_of_the_bucket_stops() {
        let l = listing(&[1, 2], &[1]);
        assert_eq!(
            sequences(Some(5), &l).stop,
            Some(Stop::Ahead {
                applied: 5,
                latest: 2
            })
        );
        assert_eq!(
            sequences(Some(5), &Listing::default()).stop,
            Some(Stop::Ahead {
                applied: 5,
                latest: 0
            })
        );
    }

    #[test]
    fn positions() {
        let applied = Applied {
            sequence: 3,
            fingerprint: "f3".into(),
        };
        assert_eq!(
            position(4, Kind::Incremental, "f4", Some("f4"), Some(&applied)),
            Position::AtTip
        );
        assert_eq!(
            position(4, Kind::Incremental, "f4", Some("f3"), Some(&applied)),
            Position::Ready
        );
        assert!(matches!(
            position(4, Kind::Incremental, "f4", Some("fx"), Some(&applied)),
            Position::Diverged(_)
        ));
        assert!(matches!(
            position(6, Kind::Incremental, "f6", Some("f3"), Some(&applied)),
            Position::Diverged(_)
        ));
        assert_eq!(position(1, Kind::Full, "f1", None, None), Position::Ready);
        assert_eq!(
            position(7, Kind::Full, "f7", Some("fx"), Some(&applied)),
            Position::Ready
        );
        assert!(matches!(
            position(2, Kind::Incremental, "f2", None, None),
            Position::Diverged(_)
        ));
    }
}
