//! Test-only crash points at the dangerous steps of a run, armed the way the rest of
//! refvote arms them (`REFVOTE_FAULT_POINT=<name>[:<n>]`, see `refvote_cluster::faults`):
//! the `n`-th arrival (default the first) at the named point aborts the process on
//! the spot, as `kill -9` would, so the crash tests hit exact moments. Without the
//! variable a point is one relaxed load; it changes nothing in normal runs.
//!
//! A copy of the cluster crate's mechanism (without holds) because this crate does not
//! depend on the cluster crate; the variable and its syntax are the same.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

pub const ENV: &str = "REFVOTE_FAULT_POINT";

/// producer: a piece of a sealed bundle went to the upload (parts may be up, the
/// object is not complete, no manifest).
pub const MID_UPLOAD: &str = "psync-mid-upload";
/// producer: the bundle is complete in the bucket, its manifest not yet written.
pub const BEFORE_MANIFEST: &str = "psync-before-manifest";
/// consumer: the bundle is fetched into the local mirror, the target not yet updated.
pub const BEFORE_APPLY: &str = "psync-before-apply";
/// consumer: the target holds the sequence, the state does not record it yet.
pub const AFTER_APPLY: &str = "psync-after-apply";

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
                Some((name, n)) => (name.to_owned(), n.parse().ok()?),
                None => (spec, 1),
            };
            Some(Armed {
                name,
                nth,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
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
