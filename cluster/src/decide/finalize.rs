//! Finalize's choices (DESIGN.md §2 step 7), from one read of the transaction, its
//! repository and the voters' nodes: whether it must wait, which keys abort, which
//! count as committed, who is promoted and who is outdated (with a repair job), the new
//! generation, and whether the client may be told "success". Also what a voter still
//! owes in another open transaction, which finalize waits for.

use std::collections::{BTreeMap, BTreeSet};

use crate::quorum::{self, KeyState, VoterReport};
use crate::records::{
    Decision, DoneRecord, JobRecord, ReplicaRecord, ReplicaState, RepoRecord, TxOutcome, TxRecord,
    VerdictRecord,
};

/// A transaction's keys, as read at one revision.
#[derive(Debug, Clone, Default)]
pub struct TxState {
    /// vote key → the votes on it.
    pub votes: BTreeMap<String, KeyState>,
    /// Stored abort decisions.
    pub aborted: BTreeMap<String, Decision>,
    /// voter → keys it confirmed.
    pub confirmed: BTreeMap<String, BTreeSet<String>>,
    pub done: BTreeMap<String, DoneRecord>,
    pub started: BTreeSet<String>,
    /// The creator's lease holds.
    pub alive: bool,
    /// GitLab's verdict, in a gated transaction.
    pub verdict: Option<VerdictRecord>,
}

impl TxState {
    /// Every decided key: the stored aborts, and the keys where threshold voters voted
    /// one hash (commits need no write of their own) — in a gated transaction only
    /// under an allow verdict.
    pub fn decisions(&self, record: &TxRecord) -> BTreeMap<String, Decision> {
        let mut out = self.aborted.clone();
        if !super::verdict::gate(record, self.verdict.as_ref()).lets_commit() {
            return out;
        }
        for (key, state) in &self.votes {
            if out.contains_key(key) {
                continue;
            }
            let none = BTreeSet::new();
            if let Some(d) = quorum::evaluate(
                &record.voters,
                record.threshold,
                record.assigned,
                state,
                &none,
                "votes",
            ) && d.is_commit()
            {
                out.insert(key.clone(), d);
            }
        }
        out
    }

    /// Keys with votes but no decision, each with the abort to write: once every voter
    /// finished or failed (or the creator is gone and no new vote is taken), no hash
    /// can reach threshold any more.
    pub fn undecided(&self, record: &TxRecord, by: &str) -> Vec<(String, Decision)> {
        let decided = self.decisions(record);
        self.votes
            .iter()
            .filter(|(key, _)| !decided.contains_key(*key))
            .map(|(key, state)| {
                let most = quorum::most_votes(state);
                let d = quorum::abort(most, record.threshold, record.assigned, by);
                (key.clone(), d)
            })
            .collect()
    }

    /// `voter` reported done itself. Voters confirm before they report done, so one
    /// that did without a confirmation did not apply the key; one reported failed by
    /// someone else (a router that saw its call fail, a reaper that gave up on it) may
    /// have applied what it voted for.
    fn reported_itself(&self, voter: &str) -> bool {
        self.done
            .get(voter)
            .is_some_and(|d| d.reported_by.is_empty())
    }

    /// Whether `voter` voted `hash` on `key`.
    fn voted(&self, key: &str, voter: &str, hash: &str) -> bool {
        self.votes
            .get(key)
            .and_then(|k| k.votes.get(voter))
            .is_some_and(|h| h == hash)
    }
}

/// Everything one finalize attempt read, at one etcd revision.
#[derive(Debug, Clone, Copy)]
pub struct Read<'a> {
    pub record: &'a TxRecord,
    /// The transaction record's create revision.
    pub record_revision: i64,
    pub state: &'a TxState,
    /// voter → the lease its node's registration has now (absent: not registered).
    pub node_leases: &'a BTreeMap<String, i64>,
    /// The repository record, if one is registered.
    pub repo: Option<RepoRead<'a>>,
    /// node → its replica record, for every replica that has one.
    pub replicas: &'a BTreeMap<String, ReplicaRecord>,
    /// The other open transactions of the repository.
    pub others: &'a [String],
    /// Who finalizes (a router id, `reaper:<id>`...), for the decisions it writes.
    pub by: &'a str,
}

/// The repository record as read, with its revisions.
#[derive(Debug, Clone, Copy)]
pub struct RepoRead<'a> {
    pub record: &'a RepoRecord,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// What finalize does with what it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A voter may still vote, confirm or report: try again later.
    Wait(String),
    /// Every voter finished or failed: end the transaction.
    Settle(Box<Settlement>),
}

/// How a transaction ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// Keys to abort first, each with its decision (a create-only write that yields to a
    /// late vote: then everything is read again).
    pub aborts: Vec<(String, Decision)>,
    /// Keys a majority voted for that no replica confirmed applying: not committed.
    pub unconfirmed: Vec<String>,
    /// `None`: the repository was removed (perhaps re-created since): nothing to
    /// promote, nothing to resurrect, the transaction is only cleaned up (with
    /// [`unchanged`] as its outcome).
    pub changes: Option<Changes>,
}

/// What ending the transaction writes: the repository's and replicas' records, and the
/// outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Confirmations the promoted voters may still owe in the other open transactions
    /// must be waited for first ([`owed`]).
    pub check_others: bool,
    /// The repository record at its new generation (`None`: nothing committed).
    pub repo: Option<RepoRecord>,
    /// Replica records to write, each compared against its revision as read.
    pub replicas: Vec<ReplicaWrite>,
    pub outcome: TxOutcome,
}

/// One replica's new record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaWrite {
    pub node: String,
    pub record: ReplicaRecord,
    /// The repair job to create unless one exists (an existing job keeps its attempts
    /// and back-off, and a worker's claim on it stays valid).
    pub job: Option<JobRecord>,
}

impl ReplicaWrite {
    /// `rep` outdated for `job`'s reason, with the job.
    fn outdated(rep: &ReplicaRecord, job: JobRecord) -> ReplicaWrite {
        ReplicaWrite {
            node: job.node.clone(),
            record: rep.outdated(&job.reason),
            job: Some(job),
        }
    }
}

/// The next step of finalizing `read.record`.
pub fn plan(read: &Read) -> Step {
    let (record, state) = (read.record, read.state);
    let running: Vec<&String> = record
        .voters
        .iter()
        .filter(|v| {
            !state.done.contains_key(*v)
                && super::holds_lease(record, v, read.node_leases.get(*v).copied())
        })
        .filter(|v| state.alive || state.started.contains(*v))
        .collect();
    if !running.is_empty() {
        return Step::Wait(format!("voters still running: {running:?}"));
    }
    // Every voter finished or failed, so every key with votes can be decided: a key
    // without a majority aborts.
    let aborts = state.undecided(record, read.by);
    let applied = applied(record, state);
    // Nothing resurrects a removed repository: the record must be the one the
    // transaction began on (0: a transaction recorded before that was kept).
    let same_repo = |r: &RepoRead| {
        record.repo_create_revision == 0 || r.create_revision == record.repo_create_revision
    };
    let changes = read
        .repo
        .filter(same_repo)
        .map(|repo| changes(read, &repo, &applied));
    Step::Settle(Box::new(Settlement {
        aborts,
        unconfirmed: applied.unconfirmed,
        changes,
    }))
}

/// The committed keys, and what is known of those that did not commit.
#[derive(Debug, Default)]
struct Applied {
    committed: BTreeSet<String>,
    unconfirmed: Vec<String>,
    /// Voters in an unknown state: they voted for an unconfirmed key.
    suspects: BTreeSet<String>,
}

/// A key a majority voted for counts as committed only if some voter confirmed applying
/// it. Votes can land after their voter gave up (a request that timed out while etcd
/// had no quorum is applied when it regains one), so a majority of votes alone may
/// stand for an update no replica applied. Voters confirm before they report done, so
/// a voter that reported done itself without a confirmation did not apply the key.
/// Voters that voted for such a key and never reported (failed), or were reported
/// failed by someone else, are in an unknown state: they are marked outdated.
fn applied(record: &TxRecord, state: &TxState) -> Applied {
    let mut out = Applied::default();
    for (key, d) in state.decisions(record) {
        let Some(hash) = &d.hash else { continue };
        if state.confirmed.values().any(|keys| keys.contains(&key)) {
            out.committed.insert(key);
            continue;
        }
        let winners = state.votes.get(&key).map(|k| &k.votes);
        for (voter, h) in winners.into_iter().flatten() {
            if h == hash && !state.reported_itself(voter) {
                out.suspects.insert(voter.clone());
            }
        }
        out.unconfirmed.push(key);
    }
    out
}

fn changes(read: &Read, repo: &RepoRead, applied: &Applied) -> Changes {
    let record = read.record;
    let tx = &record.id;
    let reports: BTreeMap<String, VoterReport> = record
        .voters
        .iter()
        .map(|v| {
            let report = VoterReport {
                confirmed: read.state.confirmed.get(v).cloned().unwrap_or_default(),
                done: read.state.done.get(v).map(|d| d.ok),
                current: read
                    .replicas
                    .get(v)
                    .is_some_and(|rep| rep.is_up_to_date(repo.record)),
            };
            (v.clone(), report)
        })
        .collect();
    let promoted = quorum::promoted(&applied.committed, &reports);
    // A voter may still owe a confirmation in another open transaction of this
    // repository; promoting it now could show a reader a state without that write
    // after it was visible elsewhere. Wait for it to settle.
    let check_others = !promoted.is_empty() && !read.others.is_empty();
    // A voter's checksum describes the repository at the new generation only if no
    // other write can have landed between its own and this finalize: no other
    // transaction of the repository is open, and none finalized since this one began
    // (the repository record is older than this transaction).
    let checksums_hold = read.others.is_empty() && repo.mod_revision < read.record_revision;
    let committed = !applied.committed.is_empty();
    let mut outcome = TxOutcome {
        id: tx.clone(),
        repo: record.repo.clone(),
        committed,
        generation: repo.record.generation,
        promoted: promoted.iter().cloned().collect(),
        outdated: Vec::new(),
        threshold: record.threshold,
        acknowledged: promoted.len() >= record.threshold,
        reaped: reaped(read.by),
    };
    let mut replicas = Vec::new();
    let mut new_repo = None;
    if committed {
        let generation = repo.record.generation + 1;
        outcome.generation = generation;
        new_repo = Some(RepoRecord {
            generation,
            ..repo.record.clone()
        });
        for node in &repo.record.assigned {
            let Some(rep) = read.replicas.get(node) else {
                continue;
            };
            if promoted.contains(node) {
                let checksum = match read.state.done.get(node) {
                    Some(d) if checksums_hold => d.checksum.clone(),
                    _ => String::new(),
                };
                let rep = ReplicaRecord {
                    generation,
                    state: ReplicaState::UpToDate,
                    reason: String::new(),
                    checksum,
                    ..rep.clone()
                };
                replicas.push(ReplicaWrite {
                    node: node.clone(),
                    record: rep,
                    job: None,
                });
            } else {
                let reason = if record.voters.contains(node) {
                    format!("did not confirm every update of transaction {tx}")
                } else {
                    format!("missed transaction {tx}")
                };
                let job = JobRecord::new(record.repo.clone(), node.clone(), generation, reason);
                replicas.push(ReplicaWrite::outdated(rep, job));
                outcome.outdated.push(node.clone());
            }
        }
    } else {
        // Nothing committed: success means threshold voters finished their RPC on a
        // current replica (never vacuously), not counting those in an unknown state.
        outcome.acknowledged = record
            .voters
            .iter()
            .filter(|v| !applied.suspects.contains(*v))
            .filter(|v| reports[*v].current && reports[*v].done == Some(true))
            .count()
            >= record.threshold;
        for node in &applied.suspects {
            let Some(rep) = read.replicas.get(node) else {
                continue;
            };
            let reason =
                format!("may hold an update of transaction {tx} that no replica confirmed");
            let job = JobRecord::new(
                record.repo.clone(),
                node.clone(),
                repo.record.generation,
                reason,
            );
            replicas.push(ReplicaWrite::outdated(rep, job));
            outcome.outdated.push(node.clone());
        }
    }
    Changes {
        check_others,
        repo: new_repo,
        replicas,
        outcome,
    }
}

/// The outcome of a transaction that ends changing nothing (its repository is gone).
pub fn unchanged(record: &TxRecord, by: &str) -> TxOutcome {
    TxOutcome {
        id: record.id.clone(),
        repo: record.repo.clone(),
        committed: false,
        generation: record.base_generation,
        promoted: Vec::new(),
        outdated: Vec::new(),
        threshold: record.threshold,
        acknowledged: false,
        reaped: reaped(by),
    }
}

/// Finalized by the reaper after the creator's lease expired.
fn reaped(by: &str) -> bool {
    by.starts_with("reaper")
}

/// Confirmations any of `voters` still owes in the open transaction `record` (whose
/// keys are `state`), as (key, voter), keys in order: a committed key (threshold equal
/// votes) it voted for and has not confirmed. One that reported done itself did not
/// apply it and owes nothing; one reported failed by someone else may still confirm,
/// and is waited for while its node lives ([`super::holds_lease`]), as one not done.
pub fn owed(
    record: &TxRecord,
    state: &TxState,
    voters: &BTreeSet<String>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (key, d) in &state.decisions(record) {
        let Some(hash) = &d.hash else { continue };
        for voter in voters {
            let confirmed = state.confirmed.get(voter).is_some_and(|c| c.contains(key));
            if state.voted(key, voter, hash) && !confirmed && !state.reported_itself(voter) {
                out.push((key.clone(), voter.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{abort, leases, record, replica, replicas, repo, set};
    use super::*;

    /// A live transaction with every voter started and nothing else yet.
    fn state() -> TxState {
        TxState {
            alive: true,
            started: set(&["a", "b", "c"]),
            ..TxState::default()
        }
    }

    fn vote(state: &mut TxState, key: &str, votes: &[(&str, &str)]) {
        let k = state.votes.entry(key.into()).or_default();
        for (v, h) in votes {
            k.votes.insert(v.to_string(), h.to_string());
        }
    }

    fn confirm(state: &mut TxState, key: &str, voters: &[&str]) {
        for v in voters {
            state
                .confirmed
                .entry(v.to_string())
                .or_default()
                .insert(key.into());
        }
    }

    fn done(state: &mut TxState, voter: &str, ok: bool, checksum: &str) {
        state.done.insert(
            voter.into(),
            DoneRecord {
                ok,
                detail: String::new(),
                checksum: checksum.into(),
                reported_by: String::new(),
                post_receive: serde_json::Value::Null,
            },
        );
    }

    fn failed_by(state: &mut TxState, voter: &str, by: &str) {
        state.done.insert(
            voter.into(),
            DoneRecord {
                ok: false,
                detail: "its call failed".into(),
                checksum: String::new(),
                reported_by: by.into(),
                post_receive: serde_json::Value::Null,
            },
        );
    }

    /// Every voter voted `h1` on `k`, confirmed it and reported done with checksum
    /// `sum-<voter>`.
    fn all_confirmed() -> TxState {
        let mut s = state();
        vote(&mut s, "k", &[("a", "h1"), ("b", "h1"), ("c", "h1")]);
        confirm(&mut s, "k", &["a", "b", "c"]);
        for v in ["a", "b", "c"] {
            done(&mut s, v, true, &format!("sum-{v}"));
        }
        s
    }

    /// The read of a repository at generation 7 with every replica up to date, no other
    /// open transaction, repository record older than the transaction.
    struct Fixture {
        record: TxRecord,
        state: TxState,
        leases: BTreeMap<String, i64>,
        repo: RepoRecord,
        repo_create_revision: i64,
        repo_mod_revision: i64,
        registered: bool,
        replicas: BTreeMap<String, ReplicaRecord>,
        others: Vec<String>,
        by: String,
    }

    impl Fixture {
        fn new(state: TxState) -> Fixture {
            Fixture {
                record: record(),
                state,
                leases: leases(),
                repo: repo(7),
                repo_create_revision: 10,
                repo_mod_revision: 50,
                registered: true,
                replicas: replicas(&["a", "b", "c"], 7),
                others: Vec::new(),
                by: "router1".into(),
            }
        }

        fn plan(&self) -> Step {
            plan(&Read {
                record: &self.record,
                record_revision: 60,
                state: &self.state,
                node_leases: &self.leases,
                repo: self.registered.then_some(RepoRead {
                    record: &self.repo,
                    create_revision: self.repo_create_revision,
                    mod_revision: self.repo_mod_revision,
                }),
                replicas: &self.replicas,
                others: &self.others,
                by: &self.by,
            })
        }

        fn settle(&self) -> Settlement {
            match self.plan() {
                Step::Settle(s) => *s,
                Step::Wait(w) => panic!("waits: {w}"),
            }
        }

        fn changes(&self) -> Changes {
            self.settle().changes.expect("the repository is there")
        }
    }

    fn written<'a>(c: &'a Changes, node: &str) -> (&'a ReplicaRecord, Option<&'a JobRecord>) {
        let w = c
            .replicas
            .iter()
            .find(|w| w.node == node)
            .unwrap_or_else(|| panic!("{node} not written"));
        (&w.record, w.job.as_ref())
    }

    #[test]
    fn all_confirmed_promotes_every_voter_at_the_next_generation() {
        let c = Fixture::new(all_confirmed()).changes();
        assert_eq!(c.outcome.generation, 8);
        assert!(c.outcome.committed && c.outcome.acknowledged && !c.outcome.reaped);
        assert_eq!(c.outcome.promoted, ["a", "b", "c"]);
        assert!(c.outcome.outdated.is_empty());
        assert_eq!(c.repo.as_ref().map(|r| r.generation), Some(8));
        assert!(!c.check_others);
        assert_eq!(c.replicas.len(), 3);
        for w in &c.replicas {
            let rep = &w.record;
            assert_eq!((rep.generation, rep.state), (8, ReplicaState::UpToDate));
            assert_eq!(
                rep.checksum,
                format!("sum-{}", w.node),
                "nothing else was open"
            );
            assert_eq!(rep.repair_epoch, 4, "kept");
            assert!(w.job.is_none());
        }
    }

    #[test]
    fn a_gated_transaction_commits_only_under_an_allow_verdict() {
        let gated = |verdict: Option<bool>| {
            let mut state = all_confirmed();
            state.verdict = verdict.map(|allow| VerdictRecord {
                allow,
                by: "b".into(),
                message: String::new(),
                detail: serde_json::Value::Null,
            });
            let mut f = Fixture::new(state);
            f.record.designated = Some("b".into());
            f
        };
        let c = gated(Some(true)).changes();
        assert!(c.outcome.committed && c.outcome.acknowledged);
        assert_eq!(c.outcome.promoted, ["a", "b", "c"]);
        // No verdict or a deny: threshold votes (even confirmed ones) commit nothing;
        // the keys are aborted.
        for verdict in [None, Some(false)] {
            let s = gated(verdict).settle();
            assert_eq!(s.aborts.len(), 1, "{verdict:?}");
            let c = s.changes.expect("the repository is there");
            assert!(!c.outcome.committed, "{verdict:?}");
            assert_eq!(c.repo, None);
        }
        // The same votes in a transaction that is not gated commit, verdict or not.
        assert!(Fixture::new(all_confirmed()).changes().outcome.committed);
    }

    #[test]
    fn a_voter_that_did_not_confirm_is_outdated_with_a_job_at_the_new_generation() {
        let mut s = state();
        vote(&mut s, "k", &[("a", "h1"), ("b", "h1"), ("c", "h1")]);
        confirm(&mut s, "k", &["a", "b"]);
        for v in ["a", "b", "c"] {
            done(&mut s, v, true, "");
        }
        let c = Fixture::new(s).changes();
        assert_eq!(c.outcome.promoted, ["a", "b"]);
        assert_eq!(c.outcome.outdated, ["c"]);
        assert!(c.outcome.acknowledged, "2 of 3 promoted, 2 needed");
        let (rep, job) = written(&c, "c");
        assert_eq!((rep.state, rep.generation), (ReplicaState::Outdated, 7));
        assert_eq!(rep.reason, "did not confirm every update of transaction t1");
        let job = job.unwrap();
        assert_eq!((job.node.as_str(), job.generation), ("c", 8));
        assert_eq!(job.reason, rep.reason);
    }

    #[test]
    fn a_voter_must_confirm_every_committed_key() {
        let mut s = all_confirmed();
        vote(&mut s, "k2", &[("a", "x"), ("b", "x"), ("c", "x")]);
        confirm(&mut s, "k2", &["a", "c"]);
        let c = Fixture::new(s).changes();
        assert_eq!(c.outcome.promoted, ["a", "c"]);
        assert_eq!(c.outcome.outdated, ["b"]);
    }

    #[test]
    fn fewer_than_threshold_promoted_is_outcome_unknown_not_success() {
        let mut s = state();
        vote(&mut s, "k", &[("a", "h1"), ("b", "h1"), ("c", "h1")]);
        confirm(&mut s, "k", &["a"]);
        for v in ["a", "b", "c"] {
            done(&mut s, v, true, "");
        }
        let c = Fixture::new(s).changes();
        assert!(c.outcome.committed, "committed on a");
        assert!(!c.outcome.acknowledged, "1 promoted, 2 needed");
        assert_eq!(c.outcome.promoted, ["a"]);
        assert_eq!(c.outcome.outdated, ["b", "c"]);
        assert_eq!(c.outcome.generation, 8, "repair rolls it forward from a");
    }

    #[test]
    fn a_replica_not_at_the_latest_generation_is_not_promoted() {
        let mut f = Fixture::new(all_confirmed());
        f.replicas
            .insert("b".into(), replica("b", ReplicaState::UpToDate, 6));
        f.replicas
            .insert("c".into(), replica("c", ReplicaState::Repairing, 7));
        let c = f.changes();
        assert_eq!(c.outcome.promoted, ["a"]);
        assert_eq!(c.outcome.outdated, ["b", "c"]);
        assert!(!c.outcome.acknowledged);
        let (b, _) = written(&c, "b");
        assert_eq!((b.state, b.generation), (ReplicaState::Outdated, 6));
        let (rc, job) = written(&c, "c");
        assert_eq!(rc.state, ReplicaState::Repairing, "a repair's mark stays");
        assert_eq!(rc.reason, "", "and so does its reason");
        assert!(job.is_some(), "the job is created if absent");
    }

    #[test]
    fn an_assigned_replica_that_was_no_voter_missed_the_transaction() {
        let mut f = Fixture::new(all_confirmed());
        f.repo.assigned.push("d".into());
        f.replicas
            .insert("d".into(), replica("d", ReplicaState::Outdated, 5));
        let c = f.changes();
        let (d, job) = written(&c, "d");
        assert_eq!(d.reason, "", "already outdated: kept as it was");
        assert_eq!(job.unwrap().reason, "missed transaction t1");
        assert_eq!(c.outcome.outdated, ["d"]);
    }

    #[test]
    fn replicas_without_a_record_or_not_assigned_are_not_written() {
        let mut f = Fixture::new(all_confirmed());
        f.replicas.remove("c");
        f.replicas
            .insert("z".into(), replica("z", ReplicaState::UpToDate, 7));
        let c = f.changes();
        let nodes: Vec<&str> = c.replicas.iter().map(|w| w.node.as_str()).collect();
        assert_eq!(nodes, ["a", "b"], "in placement order");
        assert_eq!(c.outcome.promoted, ["a", "b"]);
        assert!(c.outcome.outdated.is_empty());
    }

    #[test]
    fn checksums_are_kept_only_when_no_other_write_can_have_landed() {
        let mut f = Fixture::new(all_confirmed());
        f.repo_mod_revision = 70; // another transaction finalized since this one began
        assert!(
            f.changes()
                .replicas
                .iter()
                .all(|w| w.record.checksum.is_empty())
        );
        let mut f = Fixture::new(all_confirmed());
        f.others = vec!["t2".into()];
        let c = f.changes();
        assert!(c.replicas.iter().all(|w| w.record.checksum.is_empty()));
        assert!(c.check_others, "promoted voters may owe t2 a confirmation");
    }

    #[test]
    fn others_are_checked_only_for_promoted_voters() {
        let mut s = state();
        vote(&mut s, "k", &[("a", "h1"), ("b", "h1"), ("c", "h1")]);
        confirm(&mut s, "k", &["a", "b", "c"]);
        for v in ["a", "b", "c"] {
            done(&mut s, v, true, "");
        }
        let mut f = Fixture::new(s);
        f.others = vec!["t2".into()];
        f.replicas = replicas(&["a", "b", "c"], 6);
        let c = f.changes();
        assert!(c.outcome.promoted.is_empty());
        assert!(!c.check_others);
    }

    #[test]
    fn finalize_waits_for_voters_still_running() {
        let mut s = all_confirmed();
        s.done.remove("b");
        assert_eq!(
            Fixture::new(s.clone()).plan(),
            Step::Wait("voters still running: [\"b\"]".into())
        );
        // Its node lost its lease: failed, nobody waits.
        let mut f = Fixture::new(s.clone());
        f.leases.insert("b".into(), 9);
        assert!(matches!(f.plan(), Step::Settle(_)));
        let mut f = Fixture::new(s.clone());
        f.leases.remove("b");
        assert!(matches!(f.plan(), Step::Settle(_)));
        // Not started and the creator gone: it never will start.
        let mut gone = s.clone();
        gone.alive = false;
        gone.started = set(&["a", "c"]);
        assert!(matches!(Fixture::new(gone.clone()).plan(), Step::Settle(_)));
        // Started, creator gone: it may still confirm what was decided.
        gone.started.insert("b".into());
        assert!(matches!(Fixture::new(gone).plan(), Step::Wait(_)));
        // Not started while the creator lives: it may start.
        let mut early = s;
        early.started = set(&["a", "c"]);
        assert!(matches!(Fixture::new(early).plan(), Step::Wait(_)));
    }

    #[test]
    fn keys_without_a_majority_are_aborted_once_every_voter_finished() {
        let mut s = state();
        vote(&mut s, "k1", &[("a", "h1"), ("b", "h2")]);
        vote(&mut s, "k2", &[("a", "x"), ("b", "x")]);
        vote(&mut s, "k3", &[("c", "y")]);
        s.aborted.insert("k3".into(), abort(1));
        confirm(&mut s, "k2", &["a", "b"]);
        for v in ["a", "b", "c"] {
            done(&mut s, v, true, "");
        }
        let mut f = Fixture::new(s);
        f.by = "reaper:r1".into();
        let settled = f.settle();
        assert_eq!(settled.aborts.len(), 1, "k2 committed, k3 already aborted");
        let (key, d) = &settled.aborts[0];
        assert_eq!(key, "k1");
        assert_eq!(
            (d.hash.as_ref(), d.agreed, d.by.as_str()),
            (None, 1, "reaper:r1")
        );
        assert_eq!(d.reason, "1 of 3 replicas agreed, 2 needed");
        let c = settled.changes.unwrap();
        assert!(c.outcome.reaped);
        assert_eq!(c.outcome.promoted, ["a", "b"]);
    }

    #[test]
    fn an_abort_with_no_winning_hash_marks_nobody_outdated() {
        let mut s = state();
        vote(&mut s, "k", &[("a", "h1"), ("b", "h2"), ("c", "h3")]);
        for v in ["a", "b", "c"] {
            done(&mut s, v, false, "");
        }
        let settled = Fixture::new(s).settle();
        assert_eq!(settled.aborts.len(), 1);
        let c = settled.changes.unwrap();
        assert!(!c.outcome.committed && !c.outcome.acknowledged);
        assert!(c.outcome.outdated.is_empty() && c.replicas.is_empty());
        assert_eq!((c.repo, c.outcome.generation), (None, 7));
    }

    #[test]
    fn no_ref_change_succeeds_on_threshold_rpc_successes_only() {
        let mut s = state();
        done(&mut s, "a", true, "");
        done(&mut s, "b", false, "");
        done(&mut s, "c", true, "");
        let c = Fixture::new(s.clone()).changes();
        assert!(!c.outcome.committed);
        assert!(c.outcome.acknowledged);
        assert_eq!(c.outcome.promoted, ["a", "c"]);
        assert!(c.replicas.is_empty(), "nothing to record");
        // c's replica is behind: its success does not count.
        let mut f = Fixture::new(s);
        f.replicas
            .insert("c".into(), replica("c", ReplicaState::Outdated, 7));
        assert!(!f.changes().outcome.acknowledged);
    }

    #[test]
    fn an_unconfirmed_majority_is_not_committed_and_voters_that_may_hold_it_are_outdated() {
        // a and b voted h1 (a majority) but nobody confirmed: a reported done itself
        // (it did not apply it), b was reported failed by the router (it may have),
        // c voted otherwise.
        let mut s = state();
        vote(&mut s, "k", &[("a", "h1"), ("b", "h1"), ("c", "h2")]);
        done(&mut s, "a", false, "");
        failed_by(&mut s, "b", "router1");
        done(&mut s, "c", true, "");
        let settled = Fixture::new(s).settle();
        assert!(settled.aborts.is_empty(), "decided by the votes");
        assert_eq!(settled.unconfirmed, ["k"]);
        let c = settled.changes.unwrap();
        assert!(!c.outcome.committed);
        assert_eq!(c.outcome.outdated, ["b"]);
        assert_eq!(c.outcome.generation, 7);
        let (b, job) = written(&c, "b");
        assert_eq!(b.state, ReplicaState::Outdated);
        assert_eq!(
            b.reason,
            "may hold an update of transaction t1 that no replica confirmed"
        );
        assert_eq!(job.unwrap().generation, 7);
        // Only c may count towards success, and alone it is not enough.
        assert!(!c.outcome.acknowledged);
    }

    #[test]
    fn a_voter_that_never_reported_on_an_unconfirmed_majority_is_outdated() {
        let mut s = state();
        vote(&mut s, "k", &[("a", "h1"), ("b", "h1")]);
        done(&mut s, "a", false, "");
        done(&mut s, "c", true, "");
        let mut f = Fixture::new(s);
        f.leases.remove("b"); // failed: its node is gone
        let c = f.changes();
        assert_eq!(c.outcome.outdated, ["b"]);
        // Without a replica record (removed meanwhile) there is nothing to mark.
        f.replicas.remove("b");
        let c = f.changes();
        assert!(c.outcome.outdated.is_empty() && c.replicas.is_empty());
    }

    #[test]
    fn a_removed_or_recreated_repository_changes_nothing() {
        let mut f = Fixture::new(all_confirmed());
        f.registered = false;
        assert_eq!(f.settle().changes, None);
        let mut f = Fixture::new(all_confirmed());
        f.repo_create_revision = 11;
        assert_eq!(f.settle().changes, None, "re-created since");
        f.record.repo_create_revision = 0;
        assert!(
            f.settle().changes.is_some(),
            "a record from before the check"
        );
        let out = unchanged(&f.record, "reaper:x");
        assert!(!out.committed && !out.acknowledged && out.reaped);
        assert_eq!(out.generation, 7);
    }

    #[test]
    fn votes_are_matched_by_key() {
        // The same hashes on different keys do not add up, and each key is decided on
        // its own votes.
        let mut s = state();
        vote(&mut s, "refs/heads/x.0", &[("a", "h")]);
        vote(&mut s, "refs/heads/x.1", &[("b", "h")]);
        vote(&mut s, "refs/heads/y.0", &[("a", "g"), ("c", "g")]);
        let d = s.decisions(&record());
        assert_eq!(d.keys().collect::<Vec<_>>(), ["refs/heads/y.0"]);
        let aborts: Vec<String> = s
            .undecided(&record(), "r")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(aborts, ["refs/heads/x.0", "refs/heads/x.1"]);
    }

    #[test]
    fn a_voter_owes_a_confirmation_of_a_committed_key_it_voted_for() {
        let mut s = state();
        vote(&mut s, "k1", &[("a", "h"), ("b", "h"), ("c", "other")]);
        vote(&mut s, "k2", &[("a", "x"), ("b", "y")]);
        let all = set(&["a", "b", "c"]);
        assert_eq!(
            owed(&record(), &s, &all),
            [("k1".into(), "a".into()), ("k1".into(), "b".into())],
            "c voted otherwise; k2 is not committed"
        );
        confirm(&mut s, "k1", &["a"]);
        assert_eq!(owed(&record(), &s, &all), [("k1".into(), "b".into())]);
        assert!(
            owed(&record(), &s, &set(&["a", "c"])).is_empty(),
            "b not asked"
        );
        // Reported failed by a router: it may still confirm.
        failed_by(&mut s, "b", "router1");
        assert_eq!(owed(&record(), &s, &all), [("k1".into(), "b".into())]);
        // Reported done itself: it did not apply it and never will.
        done(&mut s, "b", false, "");
        assert!(owed(&record(), &s, &all).is_empty());
        // An abort stored over a majority of votes is no commit.
        let mut s = state();
        vote(&mut s, "k1", &[("a", "h"), ("b", "h")]);
        s.aborted.insert("k1".into(), abort(2));
        assert!(owed(&record(), &s, &all).is_empty());
    }
}
