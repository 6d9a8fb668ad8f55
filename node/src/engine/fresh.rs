//! Whether a pooled `cat-file` process still answers as a new one would.
//!
//! A long-lived `git cat-file` reads loose refs and HEAD from disk at every lookup, but
//! it keeps what it read once: the repository's config, the `packed-refs` snapshot
//! (re-read only when git's own stat check notices a change, at one-second mtime
//! resolution unless git was built with USE_NSEC), the alternates, and the mailmap it
//! loaded at start (`HEAD:.mailmap` in a bare repository). So before a process is
//! reused, the files behind those are compared with what they were just before the
//! process started, by identity (device, inode, size, mtime and ctime in nanoseconds:
//! every rewrite git makes is a new file renamed into place, so it changes the inode
//! and the ctime). A changed `packed-refs`, config, alternates or repository directory
//! retires the process; a changed HEAD or HEAD's loose branch only means the mailmap
//! blob must be asked again (see [`Verdict`]).
//!
//! Why this is enough for "a read after an acknowledged write sees it": the write's
//! files were in place before it was acknowledged, so before the read began; the
//! snapshot a process is compared with was taken before the process started, so
//! anything the process cached is at least that new, and equal identities now mean
//! nothing was replaced since.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A file's identity, as far as a rewrite-and-rename can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// `None` when the file does not exist (a repository without packed refs).
fn file_id(path: &Path) -> Option<FileId> {
    std::fs::symlink_metadata(path).ok().map(|m| FileId::of(&m))
}

/// The files a pooled process depends on, at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The repository directory (device and inode): a removed and re-created
    /// repository is another directory.
    repository: Option<(u64, u64)>,
    config: Option<FileId>,
    packed_refs: Option<FileId>,
    alternates: Option<FileId>,
    /// A quarantine's alternates file besides the repository's own (a quarantine's
    /// alternate is the repository's object directory, whose alternates git follows).
    quarantine_alternates: Option<FileId>,
    head: Option<FileId>,
    /// The loose ref HEAD points at, if HEAD is a symref and that ref is loose.
    head_target: Option<FileId>,
}

impl Snapshot {
    /// Reads the identities now: a few `stat` calls and one small read of HEAD.
    /// `objects` is where the process reads objects (a quarantine, or the
    /// repository's own `objects`).
    pub fn take(repo: &Path, objects: &Path) -> Snapshot {
        let repository = std::fs::metadata(repo).ok().map(|m| (m.dev(), m.ino()));
        let head_path = repo.join("HEAD");
        let head = file_id(&head_path);
        let head_target = std::fs::read(&head_path)
            .ok()
            .and_then(|raw| symref_target(&raw).map(str::to_owned))
            .and_then(|target| file_id(&repo.join(target)));
        Snapshot {
            repository,
            config: file_id(&repo.join("config")),
            packed_refs: file_id(&repo.join("packed-refs")),
            alternates: file_id(&repo.join("objects").join("info").join("alternates")),
            quarantine_alternates: if objects == repo.join("objects") {
                None
            } else {
                file_id(&objects.join("info").join("alternates"))
            },
            head,
            head_target,
        }
    }
}

/// What to do with a process whose start-time snapshot is `then`, seeing `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing it cached can have changed.
    Reuse,
    /// Only HEAD (or its branch) moved: reuse it if `HEAD:.mailmap` still names the
    /// blob it loaded.
    CheckMailmap,
    /// Something it cached may be out of date: stop it.
    Retire,
}

pub fn judge(then: &Snapshot, now: &Snapshot) -> Verdict {
    if now.repository.is_none()
        || then.repository != now.repository
        || then.config != now.config
        || then.packed_refs != now.packed_refs
        || then.alternates != now.alternates
        || then.quarantine_alternates != now.quarantine_alternates
    {
        Verdict::Retire
    } else if then.head != now.head || then.head_target != now.head_target {
        Verdict::CheckMailmap
    } else {
        Verdict::Reuse
    }
}

/// The ref a symbolic HEAD names (`ref: refs/heads/main`), if it is one and it is a
/// plain path below refs/.
fn symref_target(raw: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(raw).ok()?;
    let target = text.strip_prefix("ref: ")?.trim_end();
    (target.starts_with("refs/") && !target.split('/').any(|c| c.is_empty() || c == ".."))
        .then_some(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    fn commit(dir: &Path, message: &str) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit-tree",
                "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
                "-m",
                message,
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn what_each_kind_of_write_does_to_a_pooled_process() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("r.git");
        git(
            dir.path(),
            &[
                "init",
                "--quiet",
                "--bare",
                "--initial-branch=main",
                "r.git",
            ],
        );
        git(&repo, &["hash-object", "-w", "-t", "tree", "/dev/null"]);
        let c = commit(&repo, "one");
        let objects = repo.join("objects");
        git(&repo, &["update-ref", "refs/heads/main", &c]);
        let base = Snapshot::take(&repo, &objects);
        assert_eq!(
            judge(&base, &Snapshot::take(&repo, &objects)),
            Verdict::Reuse
        );

        // Another branch, loose: cat-file reads it fresh anyway.
        git(&repo, &["update-ref", "refs/heads/other", &c]);
        assert_eq!(
            judge(&base, &Snapshot::take(&repo, &objects)),
            Verdict::Reuse
        );

        // HEAD's branch moves: the mailmap may have.
        let c2 = commit(&repo, "two");
        git(&repo, &["update-ref", "refs/heads/main", &c2]);
        let moved = Snapshot::take(&repo, &objects);
        assert_eq!(judge(&base, &moved), Verdict::CheckMailmap);

        // Packing refs rewrites packed-refs: retire.
        git(&repo, &["pack-refs", "--all"]);
        let packed = Snapshot::take(&repo, &objects);
        assert_eq!(judge(&moved, &packed), Verdict::Retire);
        // Deleting a packed ref rewrites it again, same size or not.
        git(&repo, &["update-ref", "-d", "refs/heads/other"]);
        assert_eq!(
            judge(&packed, &Snapshot::take(&repo, &objects)),
            Verdict::Retire
        );

        // Config changes retire too.
        let before = Snapshot::take(&repo, &objects);
        git(&repo, &["config", "core.abbrev", "12"]);
        assert_eq!(
            judge(&before, &Snapshot::take(&repo, &objects)),
            Verdict::Retire
        );

        // A removed and re-created repository is another directory.
        let before = Snapshot::take(&repo, &objects);
        std::fs::rename(&repo, dir.path().join("aside.git")).unwrap();
        assert_eq!(
            judge(&before, &Snapshot::take(&repo, &objects)),
            Verdict::Retire
        );
        git(
            dir.path(),
            &[
                "init",
                "--quiet",
                "--bare",
                "--initial-branch=main",
                "r.git",
            ],
        );
        assert_eq!(
            judge(&before, &Snapshot::take(&repo, &objects)),
            Verdict::Retire
        );
    }

    #[test]
    fn symbolic_heads_are_read_safely() {
        assert_eq!(
            symref_target(b"ref: refs/heads/main\n"),
            Some("refs/heads/main")
        );
        assert_eq!(symref_target(b"ref: refs/heads/../../config\n"), None);
        assert_eq!(symref_target(b"ref: /etc/passwd\n"), None);
        assert_eq!(
            symref_target(b"4b825dc642cb6eb9a060e54bf8d69288fbee4904\n"),
            None
        );
    }
}
