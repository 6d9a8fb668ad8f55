//! Repair's choices (DESIGN.md §4): what a claim marks, what a finished copy records
//! (a repair's, or one made under the repository's lock by an admin call),
//! what a failed attempt records and how long the job then waits. Whether a copy may
//! be recorded at all is etcd's to say, through the compares of the one txn that
//! records it (the repository record, the job, the target, the claim, the lock, and no
//! open transaction, all as the plan read them before the copy): a copy made from an
//! older state can never be recorded as current.

use std::time::Duration;

use crate::records::{JobRecord, ReplicaRecord, ReplicaState};

/// The target replica's record as a claim marks it: `repairing`, unless it is up to date
/// (nothing to mark: a job whose replica is up to date has nothing to do, and the
/// worker drops it).
pub fn claimed(target: &ReplicaRecord) -> Option<ReplicaRecord> {
    (target.state != ReplicaState::UpToDate).then(|| ReplicaRecord {
        state: ReplicaState::Repairing,
        ..target.clone()
    })
}

/// The record of `node`'s replica once a copy made after the plan (a repair, or a copy
/// made under the repository's lock) is up to date at the plan's `generation`, with the
/// `checksum` taken after it: a new repair epoch (the first, 0, for a replica that had
/// no record: `previous` is `None`), no reason left.
pub fn copied(
    previous: Option<&ReplicaRecord>,
    node: &str,
    generation: u64,
    checksum: &str,
) -> ReplicaRecord {
    ReplicaRecord {
        node: node.to_owned(),
        generation,
        state: ReplicaState::UpToDate,
        repair_epoch: previous.map_or(0, |p| p.repair_epoch + 1),
        checksum: checksum.to_owned(),
        reason: String::new(),
    }
}

/// Whether `target` already holds the repository at `generation`, so its repair needs
/// no copy: its record is at that generation with a checksum, and the checksum of what
/// it holds now (`live`) is that one. A replica outdated only because it *may* hold an
/// update no replica confirmed (its votes landed late, after git had given up and
/// applied nothing) is in this state; when every replica is, there is no source to copy
/// from, and without this the repository would wait for an operator although every
/// replica holds exactly its last committed state. Recording it is fenced like a copy:
/// a write after the plan moves the generation or opens a transaction, and etcd
/// refuses the record. An empty recorded checksum (none was known to hold at the last
/// write) never matches.
pub fn holds_generation(target: &ReplicaRecord, generation: u64, live: &str) -> bool {
    target.generation == generation && !target.checksum.is_empty() && target.checksum == live
}

/// The job after a failed attempt at `now_unix_ms`: one more attempt counted, why it
/// failed, and no worker tries again before its [`backoff`].
pub fn failed_attempt(job: &JobRecord, error: &str, now_unix_ms: u64) -> JobRecord {
    let attempts = job.attempts + 1;
    JobRecord {
        attempts,
        last_error: error.to_owned(),
        last_attempt_unix_ms: now_unix_ms,
        not_before_unix_ms: now_unix_ms + backoff(attempts).as_millis() as u64,
        ..job.clone()
    }
}

/// A replica a failed attempt left `repairing`, back to `outdated` with why. `None`:
/// it is not `repairing` (a write or another repair changed it since): leave it.
pub fn unmarked(replica: &ReplicaRecord, error: &str) -> Option<ReplicaRecord> {
    (replica.state == ReplicaState::Repairing).then(|| ReplicaRecord {
        state: ReplicaState::Outdated,
        reason: format!("repair failed: {error}"),
        ..replica.clone()
    })
}

/// Back-off after `attempts` failures: 0.25 s doubling up to 2 s. Short on purpose:
/// most failures are the target or source being unreachable for a while (cheap to
/// retry: a failed try costs one call), and a replica should be back soon after its
/// node is reachable again (one cut off from the routers does not register again, so
/// only the back-off stands between its return and its repair).
pub fn backoff(attempts: u32) -> Duration {
    let factor = 1u64 << attempts.saturating_sub(1).min(6);
    (Duration::from_millis(250) * factor as u32).min(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{replica, repo_id};
    use super::*;

    #[test]
    fn a_claim_marks_a_replica_behind_as_repairing() {
        let out = replica("b", ReplicaState::Outdated, 5);
        let marked = claimed(&out).unwrap();
        assert_eq!(marked.state, ReplicaState::Repairing);
        assert_eq!((marked.generation, marked.repair_epoch), (5, 4), "kept");
        let again = claimed(&replica("b", ReplicaState::Repairing, 5)).unwrap();
        assert_eq!(again.state, ReplicaState::Repairing);
        assert_eq!(claimed(&replica("b", ReplicaState::UpToDate, 5)), None);
    }

    #[test]
    fn a_finished_copy_is_recorded_up_to_date_at_the_plans_generation() {
        let mut target = replica("b", ReplicaState::Repairing, 5);
        target.reason = "missed transaction t1".into();
        let rec = copied(Some(&target), "b", 9, "sum");
        assert_eq!((rec.state, rec.generation), (ReplicaState::UpToDate, 9));
        assert_eq!((rec.repair_epoch, rec.checksum.as_str()), (5, "sum"));
        assert_eq!((rec.node.as_str(), rec.reason.as_str()), ("b", ""));
    }

    #[test]
    fn a_new_replicas_first_copy_starts_the_repair_epochs() {
        let rec = copied(None, "d", 9, "sum");
        assert_eq!((rec.state, rec.generation), (ReplicaState::UpToDate, 9));
        assert_eq!((rec.repair_epoch, rec.node.as_str()), (0, "d"));
    }

    #[test]
    fn a_replica_whose_checksum_is_its_recorded_one_at_the_generation_needs_no_copy() {
        let mut target = replica("b", ReplicaState::Repairing, 5);
        target.checksum = "sum".into();
        assert!(holds_generation(&target, 5, "sum"));
        assert!(
            !holds_generation(&target, 5, "other"),
            "it holds something else"
        );
        assert!(!holds_generation(&target, 6, "sum"), "it missed a write");
        target.checksum.clear();
        assert!(
            !holds_generation(&target, 5, ""),
            "no checksum was known at its last write"
        );
    }

    #[test]
    fn a_failed_attempt_is_counted_and_backs_off() {
        let mut job = JobRecord::new(repo_id(), "b".into(), 3, "missed a write".into());
        job.attempts = 2;
        let failed = failed_attempt(&job, "source unreachable", 10_000);
        assert_eq!(failed.attempts, 3);
        assert_eq!(failed.last_error, "source unreachable");
        assert_eq!(failed.last_attempt_unix_ms, 10_000);
        assert_eq!(
            failed.not_before_unix_ms, 11_000,
            "1 s after the third failure"
        );
        assert_eq!(
            (failed.generation, failed.reason.as_str()),
            (3, "missed a write")
        );
    }

    #[test]
    fn a_failed_repair_unmarks_only_a_replica_still_repairing() {
        let back = unmarked(&replica("b", ReplicaState::Repairing, 5), "timeout").unwrap();
        assert_eq!(back.state, ReplicaState::Outdated);
        assert_eq!(back.reason, "repair failed: timeout");
        assert_eq!(back.generation, 5);
        assert_eq!(
            unmarked(&replica("b", ReplicaState::UpToDate, 5), "x"),
            None
        );
        assert_eq!(
            unmarked(&replica("b", ReplicaState::Outdated, 5), "x"),
            None
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_bound() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(2));
        assert_eq!(backoff(40), Duration::from_secs(2));
    }
}
