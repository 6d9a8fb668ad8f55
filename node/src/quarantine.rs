//! A private object directory for git runs that write objects a read must not leave
//! behind (Gitaly's quarantine): git writes into it and reads the repository's objects
//! through it as an alternate; it is removed when dropped.

use crate::error::NodeError;
use crate::git::Command;
use crate::storage::{RepoPath, Storages, TempDir};

pub struct Quarantine {
    dir: TempDir,
    objects: String,
}

impl Quarantine {
    /// A new empty object directory in `repo`'s storage (same file system).
    pub fn new(repo: &RepoPath, what: &str) -> Result<Quarantine, NodeError> {
        let dir = Storages::tmp_dir(&repo.root).join(format!("{what}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| NodeError::io(format!("creating {}", dir.display()), e))?;
        Ok(Quarantine {
            dir: TempDir(dir),
            objects: repo.path.join("objects").display().to_string(),
        })
    }

    /// `cmd` writing its objects here, reading the repository's too.
    pub fn apply(&self, cmd: Command) -> Command {
        cmd.env("GIT_OBJECT_DIRECTORY", self.dir.0.display().to_string())
            .env("GIT_ALTERNATE_OBJECT_DIRECTORIES", self.objects.clone())
    }
}
