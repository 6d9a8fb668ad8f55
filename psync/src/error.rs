//! Why one repository's sync failed, how bad that is for an alert (integrity, an
//! unreachable bucket or target, or anything else), and what the operator can do.

use std::path::Path;

use crate::crypto::CryptoError;
use crate::git::GitError;
use crate::manifest::ManifestError;
use crate::store::StoreError;

/// How a failure counts towards the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// git, a gap, a diverged target, a conflict: that repository waits.
    Failed,
    /// The bucket or the target could not be reached after retries.
    Unavailable,
    /// An object did not authenticate, or no configured key opens it.
    Integrity,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "sealed with key id {id:?}, which encryption.keys does not list (it lists {have}); add that key"
    )]
    UnknownKey { id: String, have: String },
    #[error(
        "sequence {missing} is missing from the bucket (the latest is {latest}): nothing after it can be applied"
    )]
    Gap { missing: u64, latest: u64 },
    #[error(
        "the target records sequence {applied} but the bucket's latest is {latest}: is this the right bucket and prefix?"
    )]
    Ahead { applied: u64, latest: u64 },
    #[error("cannot apply sequence {sequence}: {reason}")]
    Diverged { sequence: u64, reason: String },
    #[error(
        "sequence {sequence} was written by another producer meanwhile; this run's upload was discarded"
    )]
    Conflict { sequence: u64 },
    #[error("{0}")]
    Target(String),
    #[error("target unavailable: {0}")]
    TargetUnavailable(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl SyncError {
    pub fn io(path: &Path, source: std::io::Error) -> SyncError {
        SyncError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub fn class(&self) -> Class {
        match self {
            SyncError::Store(s) if s.is_unavailable() => Class::Unavailable,
            SyncError::TargetUnavailable(_) => Class::Unavailable,
            SyncError::Crypto(_) | SyncError::UnknownKey { .. } => Class::Integrity,
            SyncError::Manifest(ManifestError::Crypto(_) | ManifestError::Misplaced { .. }) => {
                Class::Integrity
            }
            _ => Class::Failed,
        }
    }

    /// What to do about it, as a command where there is one.
    pub fn hint(&self, repository: &str) -> Option<String> {
        match self {
            SyncError::Gap { .. } => Some(format!(
                "on the source side run `votingctl partition-sync produce --config sync.toml --full {repository}`; the next consume starts over from that full bundle"
            )),
            SyncError::Diverged { .. } => Some(format!(
                "the target was changed outside partition sync; to overwrite it with the source, run `votingctl partition-sync produce --config sync.toml --full {repository}` on the source side"
            )),
            SyncError::Ahead { .. } => Some(
                "check store.bucket and store.prefix; to start over, remove the repository from the consumer's state".into(),
            ),
            SyncError::Crypto(CryptoError::Authentication { .. })
            | SyncError::Manifest(ManifestError::Crypto(CryptoError::Authentication { .. })) => Some(
                "nothing was applied; find out who changed the bucket, then have the producer write the sequence again (--full)".into(),
            ),
            SyncError::Crypto(CryptoError::WrongKey { .. })
            | SyncError::Manifest(ManifestError::Crypto(CryptoError::WrongKey { .. }))
            | SyncError::UnknownKey { .. } => Some(
                "both sides need the same key file under the same id in encryption.keys".into(),
            ),
            SyncError::Conflict { .. } => {
                Some("run one producer per bucket and prefix (one timer, one host)".into())
            }
            _ => None,
        }
    }
}
