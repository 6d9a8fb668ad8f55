//! Test-only crash points at the dangerous steps of a run: the names of partition
//! sync's points, armed and reached through refvote's one mechanism
//! ([`refvote_cluster::faults`]: `REFVOTE_FAULT_POINT=<name>[:<n>]`, the `n`-th arrival
//! aborts the process on the spot, as `kill -9` would). Without the variable a point
//! is one relaxed load; it changes nothing in normal runs.

pub use refvote_cluster::faults::ENV;

/// producer: a piece of a sealed bundle went to the upload (parts may be up, the
/// object is not complete, no manifest).
pub const MID_UPLOAD: &str = "psync-mid-upload";
/// producer: the bundle is complete in the bucket, its manifest not yet written.
pub const BEFORE_MANIFEST: &str = "psync-before-manifest";
/// consumer: the bundle is fetched into the local mirror, the target not yet updated.
pub const BEFORE_APPLY: &str = "psync-before-apply";
/// consumer: the target holds the sequence, the state does not record it yet.
pub const AFTER_APPLY: &str = "psync-after-apply";

pub use refvote_cluster::faults::point;
