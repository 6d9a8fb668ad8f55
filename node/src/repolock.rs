//! The per-repository lock that orders git runs which write refs.
//!
//! Mutators share it; maintenance and repair take it exclusively. It is a
//! reader-writer lock and not a mutex on purpose: a mutator holds it while its hook
//! waits for the other replicas' votes, so with a mutex three concurrent pushes that
//! reach the replicas in different orders would each hold one replica and wait for
//! the others (DESIGN.md §5 scenario 4). Mutators exclude each other where git does,
//! on the ref locks, which the vote already orders. What must not overlap a push is
//! `git pack-refs`/`gc` holding `packed-refs.lock`, or a repair rewriting the refs.
//!
//! The lock is fair (tokio's RwLock): a waiting exclusive holder stops new shared
//! ones, so maintenance is not starved. Because a mutator then waits too, exclusive
//! acquisition is always bounded by a timeout; giving up leaves the queue at once.
//!
//! Also here: removing the ref lock files a crash leaves behind (git removes its own on
//! SIGTERM, not on SIGKILL or power loss). A stale `packed-refs.lock` or
//! `refs/heads/x.lock` fails every later update of those refs, on this replica only.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use super::error::NodeError;
use super::storage::{PRIVATE_DIR, is_repository};

/// Held by a mutator's git run; shared with other mutators.
pub type SharedGuard = OwnedRwLockReadGuard<()>;
/// Held by maintenance or repair; excludes everything else on the repository.
pub type ExclusiveGuard = OwnedRwLockWriteGuard<()>;

/// The locks of every repository of the node, by git directory. Entries live as long
/// as someone holds or waits for them.
#[derive(Default)]
pub struct RepoLocks {
    locks: Mutex<HashMap<PathBuf, Weak<RwLock<()>>>>,
}

impl RepoLocks {
    fn lock_for(&self, repo: &Path) -> Arc<RwLock<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = locks.get(repo).and_then(Weak::upgrade) {
            return lock;
        }
        let lock = Arc::new(RwLock::new(()));
        locks.insert(repo.to_owned(), Arc::downgrade(&lock));
        // Forget repositories nobody holds any more, now and then, so the map stays
        // as large as the set of repositories in use.
        if locks.len() > 64 && locks.len().is_power_of_two() {
            locks.retain(|_, l| l.strong_count() > 0);
        }
        lock
    }

    /// For a git run that writes refs on behalf of a client (a mutator). Waits only
    /// for exclusive holders (maintenance, repair), never for other mutators.
    pub async fn shared(&self, repo: &Path) -> SharedGuard {
        self.lock_for(repo).read_owned().await
    }

    /// For maintenance and repair: waits until no mutator runs on `repo`, at most
    /// `timeout`.
    pub async fn exclusive(
        &self,
        repo: &Path,
        timeout: Duration,
    ) -> Result<ExclusiveGuard, NodeError> {
        let lock = self.lock_for(repo);
        tokio::time::timeout(timeout, lock.write_owned())
            .await
            .map_err(|_| NodeError::Busy {
                what: format!(
                    "{}: writes still running after {timeout:?}; try again later",
                    repo.display()
                ),
            })
    }

    /// Removes the ref lock files a crash left in `repo`, holding its lock exclusively
    /// (so no running git's lock file is taken for a stale one). Call before a repair.
    /// Returns the files removed.
    pub async fn clear_stale_ref_locks(
        &self,
        repo: &Path,
        timeout: Duration,
    ) -> Result<Vec<PathBuf>, NodeError> {
        let _guard = self.exclusive(repo, timeout).await?;
        let dir = repo.to_owned();
        tokio::task::spawn_blocking(move || remove_ref_locks(&dir))
            .await
            .map_err(|e| NodeError::io("removing stale ref locks", io::Error::other(e)))?
            .map_err(|e| {
                NodeError::io(format!("removing stale ref locks in {}", repo.display()), e)
            })
    }

    /// At start-up, before the service accepts calls: clears stale ref locks in every
    /// repository under `root` (a storage). Returns the files removed.
    pub async fn clear_stale_ref_locks_in_storage(
        &self,
        root: &Path,
        timeout: Duration,
    ) -> Result<Vec<PathBuf>, NodeError> {
        let root = root.to_owned();
        let repos = tokio::task::spawn_blocking(move || find_repositories(&root))
            .await
            .map_err(|e| NodeError::io("listing repositories", io::Error::other(e)))?
            .map_err(|e| NodeError::io("listing repositories", e))?;
        let mut removed = Vec::new();
        for repo in repos {
            removed.extend(self.clear_stale_ref_locks(&repo, timeout).await?);
        }
        Ok(removed)
    }
}

/// git's lock files for refs: `*.lock` anywhere under `refs/`, `packed-refs.lock`, and
/// `HEAD.lock` (a symbolic-ref update of HEAD uses the same ref lock). Only regular
/// files are removed.
fn remove_ref_locks(repo: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for name in ["packed-refs.lock", "HEAD.lock"] {
        let p = repo.join(name);
        if p.symlink_metadata().is_ok_and(|m| m.is_file()) {
            found.push(p);
        }
    }
    let mut dirs = vec![repo.join("refs")];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "lock") {
                found.push(path);
            }
        }
    }
    for p in &found {
        match std::fs::remove_file(p) {
            Ok(()) => tracing::warn!(path = %p.display(), "removed a stale ref lock"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// Every git directory under a storage root, not descending into repositories or the
/// node's private area.
fn find_repositories(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut repos = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        if is_repository(&dir) {
            repos.push(dir);
            continue;
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() && entry.file_name() != PRIVATE_DIR {
                dirs.push(entry.path());
            }
        }
    }
    Ok(repos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn mutators_share_and_maintenance_excludes() {
        let locks = RepoLocks::default();
        let a = Path::new("/s/a.git");
        let b = Path::new("/s/b.git");
        // Three mutators at once: none waits for another (a mutex would block here).
        let m1 = locks.shared(a).await;
        let m2 = tokio::time::timeout(SHORT, locks.shared(a)).await.unwrap();
        let m3 = tokio::time::timeout(SHORT, locks.shared(a)).await.unwrap();
        // Maintenance waits for them, and gives up after its timeout.
        let err = locks.exclusive(a, SHORT).await.unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
        // Another repository is independent.
        let other = locks.exclusive(b, SHORT).await.unwrap();
        drop((m1, m2));
        assert!(locks.exclusive(a, SHORT).await.is_err(), "m3 still runs");
        drop(m3);
        let maintenance = locks.exclusive(a, SHORT).await.unwrap();
        // While maintenance runs, a mutator waits...
        let waiting = tokio::spawn({
            let locks = Arc::new(locks);
            let l = locks.clone();
            async move {
                let _g = l.shared(Path::new("/s/a.git")).await;
                drop(locks);
            }
        });
        tokio::time::sleep(SHORT).await;
        assert!(!waiting.is_finished());
        // ...and goes on once it is over.
        drop(maintenance);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        drop(other);
    }

    #[tokio::test]
    async fn a_waiting_maintenance_that_gives_up_leaves_the_queue() {
        let locks = RepoLocks::default();
        let a = Path::new("/s/a.git");
        let m1 = locks.shared(a).await;
        assert!(locks.exclusive(a, SHORT).await.is_err());
        // The fair lock would queue new readers behind a waiting writer; the timed-out
        // one is gone, so mutators go on.
        tokio::time::timeout(SHORT, locks.shared(a)).await.unwrap();
        drop(m1);
    }

    #[tokio::test]
    async fn unused_locks_are_forgotten() {
        let locks = RepoLocks::default();
        for i in 0..200 {
            let _g = locks.shared(&PathBuf::from(format!("/s/{i}.git"))).await;
        }
        let held = locks.shared(Path::new("/s/held.git")).await;
        for i in 200..400 {
            let _g = locks.shared(&PathBuf::from(format!("/s/{i}.git"))).await;
        }
        let n = locks.locks.lock().unwrap().len();
        assert!(n < 300, "{n} entries kept");
        drop(held);
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[tokio::test]
    async fn stale_ref_locks_are_removed_and_git_can_update_again() {
        let tmp = tempfile::tempdir().unwrap();
        let storage = tmp.path();
        let repo = storage.join("group/project.git");
        std::fs::create_dir_all(&repo).unwrap();
        git(
            &repo,
            &["init", "--bare", "--quiet", "--initial-branch=main"],
        );
        let tree = git(&repo, &["mktree"]);
        let commit = git(
            &repo,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit-tree",
                &tree,
                "-m",
                "x",
            ],
        );
        git(&repo, &["update-ref", "refs/heads/main", &commit]);
        git(&repo, &["pack-refs", "--all"]);
        // What a SIGKILLed git leaves: a packed-refs lock and a loose ref's lock.
        std::fs::create_dir_all(repo.join("refs/heads/team")).unwrap();
        for f in ["packed-refs.lock", "refs/heads/team/x.lock"] {
            std::fs::write(repo.join(f), format!("{commit}\n")).unwrap();
        }
        // A file that merely looks like one outside refs/ stays.
        std::fs::write(repo.join("config.lock"), "").unwrap();
        let update = |r: &str| {
            std::process::Command::new("git")
                .current_dir(&repo)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .args(["update-ref", "-d", r])
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(!update("refs/heads/main"), "the stale lock blocks git");

        let locks = RepoLocks::default();
        let removed = locks
            .clear_stale_ref_locks_in_storage(storage, SHORT)
            .await
            .unwrap();
        let mut removed: Vec<_> = removed
            .iter()
            .map(|p| p.strip_prefix(&repo).unwrap().display().to_string())
            .collect();
        removed.sort();
        assert_eq!(removed, ["packed-refs.lock", "refs/heads/team/x.lock"]);
        assert!(repo.join("config.lock").exists());
        assert!(update("refs/heads/main"), "git updates refs again");

        // Not while a mutator runs: its lock files are live.
        let running = locks.shared(&repo).await;
        std::fs::write(repo.join("packed-refs.lock"), "").unwrap();
        assert!(locks.clear_stale_ref_locks(&repo, SHORT).await.is_err());
        assert!(repo.join("packed-refs.lock").exists());
        drop(running);
        assert_eq!(
            locks
                .clear_stale_ref_locks(&repo, SHORT)
                .await
                .unwrap()
                .len(),
            1
        );
    }
}
