//! Test-only fault points: named steps of the protocol where the fault suite can make a
//! process die on the spot, the way a power cut or `kill -9` would, at an exact moment
//! no signal can hit from outside.
//!
//! A process arms one point through its environment,
//! `REFVOTE_FAULT_POINT=<name>[:<n>]`: the `n`-th time (default the first) it reaches
//! [`point`] with that name it aborts at once (no destructors, no lease revoke, no
//! flush; SIGABRT). Without the variable every point is one relaxed load. Points are
//! compiled into release builds on purpose: the suite runs the binaries operators run.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms a point.
pub const ENV: &str = "REFVOTE_FAULT_POINT";

/// The points the code has, for the suite to choose from. Each names the step just
/// completed (or about to start).
pub const POINTS: &[&str] = &[
    AFTER_VOTE_RECORDED,
    AFTER_DECISION,
    BEFORE_CONFIRM,
    BEFORE_FINALIZE,
    MID_REPAIR,
];

/// votingd: the vote is in etcd, the decision not yet seen.
pub const AFTER_VOTE_RECORDED: &str = "after-vote-recorded";
/// votingd: the key is decided, the hook not yet told.
pub const AFTER_DECISION: &str = "after-decision";
/// votingd: git committed the update, the confirmation is not yet written.
pub const BEFORE_CONFIRM: &str = "before-confirm";
/// router: every voter reported, the transaction not yet finalized.
pub const BEFORE_FINALIZE: &str = "before-finalize";
/// node: a repair fetch ran, its refs not yet in place.
pub const MID_REPAIR: &str = "mid-repair";
/// router: its first finalize fails as if etcd had not answered (an error, not a
/// crash: see [`fail`]).
pub const FAIL_FINALIZE: &str = "fail-finalize";

struct Armed {
    name: String,
    nth: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let (name, nth) = match spec.split_once(':') {
                Some((name, n)) => (name, n.parse().ok()?),
                None => (spec.as_str(), 1),
            };
            Some(Armed {
                name: name.to_owned(),
                nth,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Whether this process armed `name` and this is the chosen arrival: the caller then
/// fails the step the way the real fault would (no crash).
pub fn fail(name: &str) -> bool {
    let Some(armed) = armed() else {
        return false;
    };
    armed.name == name && armed.seen.fetch_add(1, Ordering::Relaxed) + 1 == armed.nth
}

/// Dies here if this process armed `name` and this is the chosen arrival.
pub fn point(name: &str) {
    let Some(armed) = armed() else {
        return;
    };
    if armed.name == name && armed.seen.fetch_add(1, Ordering::Relaxed) + 1 == armed.nth {
        eprintln!("refvote fault point {name}: aborting the process");
        std::process::abort();
    }
}
