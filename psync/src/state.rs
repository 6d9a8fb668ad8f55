//! The consumer's record of what each repository's target holds, for targets that
//! cannot keep it themselves (a plain git remote): one JSON file, rewritten atomically
//! after every applied sequence, never before the apply is done. With the target's
//! fingerprint beside each sequence, a crash between apply and record is recognised on
//! the next run (the target is already at the sequence's tip) and nothing is applied
//! twice. (A refvote target keeps the same record in its etcd.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::SyncError;
use crate::metrics::write_atomic;
use crate::plan::Applied;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    pub repositories: BTreeMap<String, Record>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub sequence: u64,
    pub fingerprint: String,
    /// Unix seconds.
    pub applied_at: u64,
}

/// The state file at one path.
#[derive(Debug, Clone)]
pub struct FileState {
    path: PathBuf,
}

impl FileState {
    pub fn new(path: &Path) -> FileState {
        FileState {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's content; empty if it does not exist yet.
    pub fn load(&self) -> Result<StateFile, SyncError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                SyncError::Target(format!(
                    "the state file {} does not parse ({e}); restore it or remove it (the consumer then finds each target's sequence again)",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile {
                version: 1,
                ..Default::default()
            }),
            Err(e) => Err(SyncError::io(&self.path, e)),
        }
    }

    pub fn applied(&self, repository: &str) -> Result<Option<Applied>, SyncError> {
        Ok(self.load()?.repositories.get(repository).map(|r| Applied {
            sequence: r.sequence,
            fingerprint: r.fingerprint.clone(),
        }))
    }

    /// Records `applied` for `repository`, durably.
    pub fn record(&self, repository: &str, applied: &Applied, now: u64) -> Result<(), SyncError> {
        let mut state = self.load()?;
        state.version = 1;
        state.repositories.insert(
            repository.to_owned(),
            Record {
                sequence: applied.sequence,
                fingerprint: applied.fingerprint.clone(),
                applied_at: now,
            },
        );
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| SyncError::io(dir, e))?;
        }
        let data = serde_json::to_vec_pretty(&state).expect("serializable");
        write_atomic(&self.path, &data).map_err(|e| SyncError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileState::new(&dir.path().join("sub/state.json"));
        assert_eq!(s.applied("g/p.git").unwrap(), None);
        let a = Applied {
            sequence: 3,
            fingerprint: "f".into(),
        };
        s.record("g/p.git", &a, 10).unwrap();
        s.record(
            "g/q.git",
            &Applied {
                sequence: 1,
                fingerprint: "q".into(),
            },
            11,
        )
        .unwrap();
        assert_eq!(s.applied("g/p.git").unwrap(), Some(a));
        std::fs::write(s.path(), "{").unwrap();
        assert!(
            s.applied("g/p.git")
                .unwrap_err()
                .to_string()
                .contains("does not parse")
        );
    }
}
