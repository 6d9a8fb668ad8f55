//! Test-only fault points: named steps of the protocol where the fault suite can make a
//! process die on the spot, the way a power cut or `kill -9` would, at an exact moment
//! no signal can hit from outside.
//!
//! A process arms one point through its environment,
//! `REFVOTE_FAULT_POINT=<name>[:<n>]`: the `n`-th time (default the first) it reaches
//! [`point`] with that name it aborts at once (no destructors, no lease revoke, no
//! flush; SIGABRT). Without the variable every point is one relaxed load. Points are
//! compiled into release builds on purpose: the suite runs the binaries operators run.
//!
//! A point can also hold the task that reaches it, so a test can act at that exact
//! moment (kill the etcd leader during a decision, call an admin RPC while a
//! transaction is open): `REFVOTE_FAULT_HOLD=<name>[:<n>]` with
//! `REFVOTE_FAULT_HOLD_DIR=<dir>`. The `n`-th arrival writes `<dir>/<name>.held` and
//! waits until `<dir>/<name>.release` exists or `<dir>` is gone (at most [`HOLD_LIMIT`]); only that task
//! waits, the process goes on serving.
//!
//! What this does not do: it changes no behaviour unless the variables are set, and it
//! is not a way to inject errors into production.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The environment variable that arms a point.
pub const ENV: &str = "REFVOTE_FAULT_POINT";
/// The environment variable that arms a hold.
pub const HOLD_ENV: &str = "REFVOTE_FAULT_HOLD";
/// Where a hold writes `<name>.held` and looks for `<name>.release`.
pub const HOLD_DIR_ENV: &str = "REFVOTE_FAULT_HOLD_DIR";
/// The longest a hold waits for its release before it lets the task go on.
pub const HOLD_LIMIT: Duration = Duration::from_secs(300);

/// The points the code has, for the suite to choose from. Each names the step just
/// completed (or about to start).
pub const POINTS: &[&str] = &[
    AFTER_VOTE_RECORDED,
    AFTER_DECISION,
    BEFORE_CONFIRM,
    BEFORE_FINALIZE,
    MID_REPAIR,
];

/// router: the transaction is created in etcd, no voter called yet.
pub const AFTER_BEGIN: &str = "after-begin";

/// votingd: the vote is in etcd, the decision not yet seen.
pub const AFTER_VOTE_RECORDED: &str = "after-vote-recorded";
/// votingd: the key is decided, the hook not yet told.
pub const AFTER_DECISION: &str = "after-decision";
/// votingd: git committed the update, the confirmation is not yet written.
pub const BEFORE_CONFIRM: &str = "before-confirm";
/// router: the first voter's call answered successfully (that replica applied and
/// confirmed the write); the others may still run, nothing is finalized.
pub const AFTER_FIRST_ANSWER: &str = "after-first-answer";
/// router: every voter reported, the transaction not yet finalized.
pub const BEFORE_FINALIZE: &str = "before-finalize";
/// router: a gated write was finalized acknowledged (its post-receive is pending in
/// etcd), no voter asked yet to run post-receive.
pub const BEFORE_POST_RECEIVE: &str = "before-post-receive";
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

impl Armed {
    fn from_env(var: &str) -> Option<Armed> {
        let spec = std::env::var(var).ok()?;
        let (name, nth) = match spec.split_once(':') {
            Some((name, n)) => (name, n.parse().ok()?),
            None => (spec.as_str(), 1),
        };
        Some(Armed {
            name: name.to_owned(),
            nth,
            seen: AtomicU64::new(0),
        })
    }

    /// Whether this arrival at `name` is the armed one.
    fn hit(&self, name: &str) -> bool {
        self.name == name && self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.nth
    }
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| Armed::from_env(ENV)).as_ref()
}

fn armed_hold() -> Option<&'static (Armed, PathBuf)> {
    static HOLD: OnceLock<Option<(Armed, PathBuf)>> = OnceLock::new();
    HOLD.get_or_init(|| {
        let armed = Armed::from_env(HOLD_ENV)?;
        let dir = std::env::var_os(HOLD_DIR_ENV)?;
        Some((armed, PathBuf::from(dir)))
    })
    .as_ref()
}

/// Whether this process armed `name` and this is the chosen arrival: the caller then
/// fails the step the way the real fault would (no crash).
pub fn fail(name: &str) -> bool {
    let Some(armed) = armed() else {
        return false;
    };
    armed.hit(name)
}

/// Dies here if this process armed `name` and this is the chosen arrival.
pub fn point(name: &str) {
    let Some(armed) = armed() else {
        return;
    };
    if armed.hit(name) {
        eprintln!("refvote fault point {name}: aborting the process");
        std::process::abort();
    }
}

/// [`point`], then the hold: if this process armed a hold at `name` and this is the
/// chosen arrival, announces it and waits for the release.
pub async fn reach(name: &str) {
    point(name);
    let Some((armed, dir)) = armed_hold() else {
        return;
    };
    if !armed.hit(name) {
        return;
    }
    let held = dir.join(format!("{name}.held"));
    let release = dir.join(format!("{name}.release"));
    if let Err(e) = std::fs::write(&held, std::process::id().to_string()) {
        eprintln!(
            "refvote fault hold {name}: cannot write {}: {e}",
            held.display()
        );
        return;
    }
    eprintln!(
        "refvote fault hold {name}: waiting for {}",
        release.display()
    );
    let start = Instant::now();
    // The test's directory going away releases too: a finished test never leaves a
    // task waiting.
    while !release.exists() && dir.exists() && start.elapsed() < HOLD_LIMIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("refvote fault hold {name}: released");
}
