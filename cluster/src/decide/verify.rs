//! The background verifier's choices: how the repositories are split into shards, how
//! many shards each live router takes, and which replicas a checksum comparison made
//! while the repository was quiet finds changed behind the cluster's back.

use std::collections::{BTreeMap, BTreeSet};

/// Shards the repositories are split into for the verifiers. Fixed: every router must
/// put a repository in the same shard.
pub const SHARDS: u32 = 64;

/// The shard of the repository with key segment `segment` (FNV-1a: stable across
/// processes, versions and hosts, unlike std's hasher).
pub fn shard_of(segment: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in segment.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(SHARDS)) as u32
}

/// What a router does with the shard claims: claim these unclaimed shards, release
/// these of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rebalance {
    pub claim: Vec<u32>,
    pub release: Vec<u32>,
}

/// The claims `me` changes, given the live routers and who holds which shard now
/// (claims lapse with their holder's lease, so every holder listed is alive). Each
/// router takes up to its fair share, ⌈shards / routers⌉; a router over it releases
/// its highest shards, so a router that joins gets work once the others next look.
/// Every shard ends up held as long as each router looks now and then.
pub fn rebalance(me: &str, routers: &BTreeSet<String>, held: &BTreeMap<u32, String>) -> Rebalance {
    let count = routers.len().max(1) as u32;
    let fair = SHARDS.div_ceil(count) as usize;
    let mine: Vec<u32> = held
        .iter()
        .filter(|(_, h)| h.as_str() == me)
        .map(|(s, _)| *s)
        .collect();
    let mut out = Rebalance::default();
    if mine.len() > fair {
        out.release = mine[fair..].to_vec();
        return out;
    }
    out.claim = (0..SHARDS)
        .filter(|s| !held.contains_key(s))
        .take(fair - mine.len())
        .collect();
    out
}

/// One replica's checksums in a quiet comparison: the one its record holds for the
/// repository's generation (empty: none was known at its last write) and the one its
/// node computes now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sums {
    pub recorded: String,
    pub live: String,
}

/// A replica's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    /// It holds what its record says.
    Match,
    /// It does not: outdate it, with why.
    Changed(String),
    /// Nothing to compare it with (no recorded checksum, no majority among the others).
    Unknown,
    /// It differs from its record, but so does every other replica, identically: the
    /// records, not the data, look wrong; left for an operator (`votingctl verify`).
    RecordSuspect,
}

/// Judges the up-to-date replicas of one repository, whose checksums were all taken
/// while no transaction of it was open and its records did not move. A replica with a
/// recorded checksum is changed exactly when its live one differs from it; one without
/// is judged against the live checksum a strict majority of `assigned` replicas share.
/// When every compared replica differs from its record and they all agree with each
/// other (two or more), nothing is outdated: identical corruption everywhere is far
/// less likely than a wrong record, and outdating them all would lose the repository.
pub fn judge(assigned: usize, sums: &BTreeMap<String, Sums>) -> BTreeMap<String, Judged> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in sums.values() {
        *counts.entry(s.live.as_str()).or_default() += 1;
    }
    let majority = counts
        .iter()
        .find(|(_, n)| **n * 2 > assigned)
        .map(|(s, _)| *s);
    let all_off_record_alike = sums.len() >= 2
        && counts.len() == 1
        && sums
            .values()
            .all(|s| !s.recorded.is_empty() && s.recorded != s.live);
    sums.iter()
        .map(|(node, s)| {
            let verdict = if all_off_record_alike {
                Judged::RecordSuspect
            } else if !s.recorded.is_empty() {
                if s.live == s.recorded {
                    Judged::Match
                } else {
                    Judged::Changed(format!(
                        "verifier: checksum {} differs from {} recorded at its last write",
                        short(&s.live),
                        short(&s.recorded)
                    ))
                }
            } else {
                match majority {
                    Some(m) if m == s.live => Judged::Match,
                    Some(m) => Judged::Changed(format!(
                        "verifier: checksum {} differs from the majority's {}",
                        short(&s.live),
                        short(m)
                    )),
                    None => Judged::Unknown,
                }
            };
            (node.clone(), verdict)
        })
        .collect()
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(v: &[(&str, &str, &str)]) -> BTreeMap<String, Sums> {
        v.iter()
            .map(|(n, r, l)| {
                (
                    n.to_string(),
                    Sums {
                        recorded: r.to_string(),
                        live: l.to_string(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("default/a.git"), shard_of("default/a.git"));
        let used: BTreeSet<u32> = (0..1000)
            .map(|i| shard_of(&format!("default/g/p{i}.git")))
            .collect();
        assert!(used.len() > 50, "{}", used.len());
        assert!(used.iter().all(|s| *s < SHARDS));
    }

    #[test]
    fn each_router_takes_its_fair_share_and_gives_back_the_excess() {
        let routers: BTreeSet<String> = ["r1", "r2"].iter().map(|s| s.to_string()).collect();
        let none = BTreeMap::new();
        let first = rebalance("r1", &routers, &none);
        assert_eq!(first.claim, (0..32).collect::<Vec<_>>());
        let held: BTreeMap<u32, String> = first.claim.iter().map(|s| (*s, "r1".into())).collect();
        let second = rebalance("r2", &routers, &held);
        assert_eq!(second.claim, (32..64).collect::<Vec<_>>());
        // Alone, r1 holds everything; a second router makes it give half back.
        let alone: BTreeSet<String> = ["r1".to_string()].into();
        let all: BTreeMap<u32, String> = (0..SHARDS).map(|s| (s, "r1".into())).collect();
        assert_eq!(rebalance("r1", &alone, &all), Rebalance::default());
        let r = rebalance("r1", &routers, &all);
        assert_eq!(r.release, (32..64).collect::<Vec<_>>());
        assert!(r.claim.is_empty());
        // Three routers: ⌈64/3⌉ = 22 each at most, every shard held.
        let three: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut held = BTreeMap::new();
        for r in ["a", "b", "c"] {
            for s in rebalance(r, &three, &held).claim {
                held.insert(s, r.to_string());
            }
        }
        assert_eq!(held.len(), SHARDS as usize);
    }

    #[test]
    fn a_replica_is_judged_against_its_own_record_first() {
        let j = judge(
            3,
            &sums(&[("a", "s", "s"), ("b", "s", "x"), ("c", "s", "s")]),
        );
        assert_eq!(j["a"], Judged::Match);
        assert!(matches!(&j["b"], Judged::Changed(why) if why.contains("recorded")));
        // A single replica compared is still judged against its record.
        let j = judge(3, &sums(&[("a", "s", "x")]));
        assert!(matches!(j["a"], Judged::Changed(_)));
    }

    #[test]
    fn without_a_record_the_majority_of_assigned_replicas_decides() {
        let j = judge(3, &sums(&[("a", "", "s"), ("b", "", "x"), ("c", "", "s")]));
        assert_eq!(j["a"], Judged::Match);
        assert!(matches!(&j["b"], Judged::Changed(why) if why.contains("majority")));
        // Two of three compared and they differ: no majority of the assigned ones.
        let j = judge(3, &sums(&[("a", "", "s"), ("b", "", "x")]));
        assert_eq!((&j["a"], &j["b"]), (&Judged::Unknown, &Judged::Unknown));
    }

    #[test]
    fn identical_replicas_that_all_differ_from_their_records_are_not_outdated() {
        let j = judge(
            3,
            &sums(&[("a", "s", "x"), ("b", "s", "x"), ("c", "s", "x")]),
        );
        assert!(j.values().all(|v| *v == Judged::RecordSuspect));
        // Different corruptions are changes.
        let j = judge(3, &sums(&[("a", "s", "x"), ("b", "s", "y")]));
        assert!(j.values().all(|v| matches!(v, Judged::Changed(_))));
    }
}
