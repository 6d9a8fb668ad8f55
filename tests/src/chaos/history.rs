//! The record of a run: every client operation with when it started and ended and what
//! the client was told, and every fault with when it was injected and healed.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the client was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success: the update must be durable and visible to every later read.
    Ack,
    /// A definite failure: the update must never be visible.
    Failed,
    /// A timeout, a broken connection, "outcome unknown": either is allowed.
    Unknown,
    /// A read's answer: the branch's commit, or `None` for no such branch.
    Read(Option<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// A push of `value` to `branch` (a fast-forward, or `--force` on the race branch;
    /// also `UserCreateBranch` and `UpdateReferences`).
    Push,
    /// A commit made on the server with `UserCommitFiles`, told apart by its commit
    /// `message` (unique in a run): `value` is the commit id the response returned, or,
    /// for an outcome the client never heard, the one found by its message in the
    /// final state.
    Commit { message: String },
    /// A push deleting `branch` (also `UserDeleteBranch` and `DeleteRefs`).
    Delete,
    /// A read of `branch`.
    Read,
}

#[derive(Debug, Clone)]
pub struct Op {
    pub client: String,
    pub router: usize,
    pub kind: OpKind,
    pub branch: String,
    /// The commit pushed (for pushes).
    pub value: Option<String>,
    pub start: Duration,
    pub end: Duration,
    pub outcome: Outcome,
    /// The client's error, shortened.
    pub detail: String,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:>8.3}s..{:>8.3}s] {} via router{} {:?} {} {} -> {:?}",
            self.start.as_secs_f64(),
            self.end.as_secs_f64(),
            self.client,
            self.router + 1,
            self.kind,
            self.branch,
            self.value.as_deref().map(short).unwrap_or("-"),
            self.outcome,
        )?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// The first 10 hex digits of an object id.
pub fn short(oid: &str) -> &str {
    &oid[..oid.len().min(10)]
}

#[derive(Debug, Clone)]
pub struct FaultEvent {
    pub kind: String,
    pub target: String,
    pub injected: Duration,
    /// When the fault itself ended: the member or process restarted, the link healed,
    /// the process continued (recovery is counted from here).
    pub ended: Duration,
    /// When the injector was done with it (after waiting for a restarted process to be
    /// ready).
    pub healed: Duration,
    /// Every replica was up to date on a live node when it was injected: nothing but
    /// this fault stood in the way of writes.
    pub clean: bool,
}

/// Shared by the workload tasks and the fault scheduler.
pub struct History {
    t0: Instant,
    ops: Mutex<Vec<Op>>,
    faults: Mutex<Vec<FaultEvent>>,
}

impl History {
    pub fn new() -> History {
        History {
            t0: Instant::now(),
            ops: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Time since the run began.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    pub fn record(&self, op: Op) {
        self.ops.lock().expect("poisoned").push(op);
    }

    pub fn fault(&self, event: FaultEvent) {
        self.faults.lock().expect("poisoned").push(event);
    }

    pub fn ops(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().expect("poisoned").clone();
        ops.sort_by_key(|o| o.start);
        ops
    }

    pub fn faults(&self) -> Vec<FaultEvent> {
        self.faults.lock().expect("poisoned").clone()
    }
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}
