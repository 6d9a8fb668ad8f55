//! The node's read engine: object lookups answered by long-lived
//! `git cat-file --batch-command` processes, pooled per repository, so the common read
//! paths (commits, trees, blobs, tags, revisions) start no process.
//!
//! ```text
//!   RPC ── engine.reader(&repo) ──► Reader ── info / contents / commit / tree ──► cat-file
//!                 ▲                   │ drop: back to the pool if between answers
//!                 └── pool (per repository, quarantine and mailmap mode) ◄┘
//! ```
//!
//! A [`Reader`] holds one process for as long as the caller needs it (an RPC). Before
//! a pooled process is handed out, [`fresh`] checks that nothing it caches can have
//! changed since it started (packed-refs, config, alternates, the repository
//! directory; the mailmap blob when HEAD moved), so a read never sees refs older than
//! a new `git` would. Loose refs and HEAD git reads from disk at every lookup, and
//! objects that arrive later (a push's new pack) git finds by re-scanning its packs
//! when a lookup misses.
//!
//! Bounds: a few idle processes per repository, a total of idle ones, a cap on
//! processes alive, an idle timeout and a maximum age ([`Limits`]); a background task
//! reaps. [`ReadEngine::evict`] stops a repository's processes when it is removed or
//! repaired. Calls on a quarantine (a push's object directory) get processes keyed by
//! those directories, set in git's environment ([`ObjectDirs`]).
//!
//! Measured against in-process reads with gitoxide before choosing (BENCHMARKS.md,
//! "Read engine"): a pooled process answers a lookup in tens of microseconds, far
//! below a gRPC call, keeps git's own revision syntax, mailmap, SHA-256 and reftable
//! support, and adds no dependency.

mod fresh;
pub mod pool;
mod process;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use refvote_proto::gitaly::GitCommit;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

pub use pool::Limits;
pub use process::{Kind, ObjectInfo, WINDOW};

use self::fresh::{Snapshot, Verdict};
use self::pool::Book;
use self::process::{Ask, Process};
use crate::error::NodeError;
use crate::git::Git;
use crate::object::{self, ParsedCommit, TreeItem};
use crate::storage::RepoPath;

/// Largest commit, tag or tree read whole.
pub const MAX_OBJECT: u64 = 64 * 1024 * 1024;
/// How often idle processes are reaped.
const REAP_EVERY: Duration = Duration::from_secs(5);
/// The blob the mailmap is read from in a bare repository.
const MAILMAP: &str = "HEAD:.mailmap";

/// Object directories a call reads from instead of (or besides) the repository's
/// own: a quarantine. Absolute paths.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ObjectDirs {
    /// `GIT_OBJECT_DIRECTORY`.
    pub object_dir: Option<PathBuf>,
    /// `GIT_ALTERNATE_OBJECT_DIRECTORIES`.
    pub alternates: Vec<PathBuf>,
}

impl ObjectDirs {
    /// The object directories a request on `repo` names: its quarantine, if any.
    pub fn of(repo: &RepoPath) -> ObjectDirs {
        match &repo.quarantine {
            Some(q) => ObjectDirs {
                object_dir: Some(q.objects.clone()),
                alternates: std::env::split_paths(&q.alternates).collect(),
            },
            None => ObjectDirs::default(),
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(d) = &self.object_dir {
            env.push((
                "GIT_OBJECT_DIRECTORY".to_owned(),
                d.to_string_lossy().into_owned(),
            ));
        }
        if !self.alternates.is_empty() {
            let joined: Vec<String> = self
                .alternates
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            env.push((
                "GIT_ALTERNATE_OBJECT_DIRECTORIES".to_owned(),
                joined.join(":"),
            ));
        }
        env
    }
}

/// What a pooled process serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    git_dir: PathBuf,
    dirs: ObjectDirs,
    /// Identities rewritten through the mailmap (Gitaly's object readers), or raw
    /// (signature checks need the signed bytes).
    mailmap: bool,
}

impl Key {
    fn objects(&self) -> PathBuf {
        self.dirs
            .object_dir
            .clone()
            .unwrap_or_else(|| self.git_dir.join("objects"))
    }
}

/// A process and what it was started against.
struct Pooled {
    process: Process,
    snapshot: Snapshot,
    /// The `HEAD:.mailmap` blob it loaded (mailmap mode only).
    mailmap_blob: Option<String>,
    /// Whether it may go back to the pool (its start raced a write to HEAD).
    poolable: bool,
    born: Instant,
    _permit: Permit,
}

/// A place among [`Limits::processes`]; freeing it wakes whoever waits for one.
struct Permit {
    _permit: OwnedSemaphorePermit,
    changed: Arc<Notify>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.changed.notify_waiters();
    }
}

/// Counters since start, for tests, benchmarks and the operator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Processes idle in the pool now.
    pub idle: usize,
    /// Processes alive now (idle and in use).
    pub alive: usize,
    pub started: u64,
    pub reused: u64,
    /// Pooled processes stopped because something they cache changed.
    pub retired: u64,
    /// Pooled processes stopped for idling or age.
    pub reaped: u64,
}

struct Inner {
    git: Git,
    limits: Limits,
    book: Mutex<Book<Key, Pooled>>,
    permits: Arc<Semaphore>,
    /// Notified when a process comes back to the pool or stops.
    changed: Arc<Notify>,
    started: AtomicU64,
    reused: AtomicU64,
    retired: AtomicU64,
    reaped: AtomicU64,
}

/// The pool; cheap to clone.
#[derive(Clone)]
pub struct ReadEngine {
    inner: Arc<Inner>,
}

impl ReadEngine {
    /// A pool bounded by `limits`. Inside a tokio runtime it starts its reaper task,
    /// which ends when the last clone is dropped.
    pub fn new(git: Git, limits: Limits) -> ReadEngine {
        let inner = Arc::new(Inner {
            git,
            limits,
            book: Mutex::new(Book::new(limits)),
            permits: Arc::new(Semaphore::new(limits.processes.max(1))),
            changed: Arc::new(Notify::new()),
            started: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            retired: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reap(Arc::downgrade(&inner)));
        }
        ReadEngine { inner }
    }

    /// A reader of `repo` (identities through the mailmap, as Gitaly's readers),
    /// seeing the push quarantine the request names, if any, beside the repository's
    /// objects.
    pub async fn reader(&self, repo: &RepoPath) -> Result<Reader, NodeError> {
        self.reader_with(&repo.path, ObjectDirs::of(repo), true)
            .await
    }

    /// A reader of the raw objects (no mailmap): what signature checks need. Sees the
    /// request's quarantine like [`ReadEngine::reader`].
    pub async fn raw_reader(&self, repo: &RepoPath) -> Result<Reader, NodeError> {
        self.reader_with(&repo.path, ObjectDirs::of(repo), false)
            .await
    }

    /// A reader of the repository at `git_dir` whose objects come from `dirs` (a
    /// quarantine) when set.
    pub async fn reader_with(
        &self,
        git_dir: &Path,
        dirs: ObjectDirs,
        mailmap: bool,
    ) -> Result<Reader, NodeError> {
        let key = Key {
            git_dir: git_dir.to_owned(),
            dirs,
            mailmap,
        };
        let pooled = self.checkout(&key).await?;
        Ok(Reader {
            pooled: Some(pooled),
            key,
            engine: Arc::downgrade(&self.inner),
        })
    }

    /// Stops the idle processes of the repository at `git_dir` (removed, replaced or
    /// repaired). Busy ones finish their call and are not pooled again, since their
    /// snapshot no longer matches.
    pub fn evict(&self, git_dir: &Path) {
        let gone = self.lock().remove_where(|k| k.git_dir == git_dir);
        self.inner
            .retired
            .fetch_add(gone.len() as u64, Ordering::Relaxed);
        drop(gone);
    }

    /// Stops every idle process (shutdown).
    pub fn clear(&self) {
        let gone = self.lock().drain();
        drop(gone);
    }

    pub fn stats(&self) -> Stats {
        let idle = self.lock().len();
        Stats {
            idle,
            alive: self.inner.limits.processes.max(1) - self.inner.permits.available_permits(),
            started: self.inner.started.load(Ordering::Relaxed),
            reused: self.inner.reused.load(Ordering::Relaxed),
            retired: self.inner.retired.load(Ordering::Relaxed),
            reaped: self.inner.reaped.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book<Key, Pooled>> {
        self.inner.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle process of `key` still fresh, else a new one if there is room: the
    /// process idle longest makes room, else this waits (bounded by git's timeout)
    /// for a process to come back or stop.
    async fn checkout(&self, key: &Key) -> Result<Pooled, NodeError> {
        let deadline = tokio::time::Instant::now() + self.inner.git.timeout();
        loop {
            // Registered before looking, so a return in between still wakes us.
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(pooled) = self.take_fresh(key).await {
                return Ok(pooled);
            }
            if let Ok(p) = self.inner.permits.clone().try_acquire_owned() {
                let permit = Permit {
                    _permit: p,
                    changed: self.inner.changed.clone(),
                };
                return self.start(key, permit).await;
            }
            let oldest = self.lock().pop_oldest();
            if let Some(p) = oldest {
                drop(p);
                self.inner.reaped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(NodeError::Busy {
                    what: format!(
                        "all {} git cat-file processes are in use; try again",
                        self.inner.limits.processes
                    ),
                });
            }
        }
    }

    /// The most recent idle process of `key` that is still fresh; stale ones found on
    /// the way are stopped.
    async fn take_fresh(&self, key: &Key) -> Option<Pooled> {
        loop {
            let mut stale = Vec::new();
            let taken = self.lock().take(key, Instant::now(), &mut stale);
            self.inner
                .reaped
                .fetch_add(stale.len() as u64, Ordering::Relaxed);
            drop(stale);
            let (mut pooled, _) = taken?;
            let now = Snapshot::take(&key.git_dir, &key.objects());
            let keep = match fresh::judge(&pooled.snapshot, &now) {
                Verdict::Reuse => true,
                Verdict::CheckMailmap if !key.mailmap => true,
                Verdict::CheckMailmap => {
                    let blob = mailmap_blob(&mut pooled.process).await;
                    matches!(blob, Ok(b) if b == pooled.mailmap_blob)
                }
                Verdict::Retire => false,
            };
            if keep && pooled.process.reusable() {
                pooled.snapshot = now;
                self.inner.reused.fetch_add(1, Ordering::Relaxed);
                return Some(pooled);
            }
            self.inner.retired.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn start(&self, key: &Key, permit: Permit) -> Result<Pooled, NodeError> {
        let objects = key.objects();
        let before = Snapshot::take(&key.git_dir, &objects);
        let mut process =
            Process::spawn(&self.inner.git, &key.git_dir, &key.dirs.env(), key.mailmap)?;
        self.inner.started.fetch_add(1, Ordering::Relaxed);
        let mut poolable = true;
        let mailmap_blob = if key.mailmap {
            let blob = mailmap_blob(&mut process).await?;
            // HEAD moved while the process started: the mailmap it loaded may be
            // older than the blob just named, so it serves this call only.
            let after = Snapshot::take(&key.git_dir, &objects);
            poolable = fresh::judge(&before, &after) == Verdict::Reuse;
            blob
        } else {
            None
        };
        Ok(Pooled {
            process,
            snapshot: before,
            mailmap_blob,
            poolable,
            born: Instant::now(),
            _permit: permit,
        })
    }
}

/// The blob `HEAD:.mailmap` names now, asked through `process`.
async fn mailmap_blob(process: &mut Process) -> Result<Option<String>, NodeError> {
    process.request(&[(Ask::Info, MAILMAP)]).await?;
    Ok(process.answer(Ask::Info).await?.map(|i| i.oid))
}

async fn reap(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let gone = inner
            .book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reap(Instant::now());
        inner.reaped.fetch_add(gone.len() as u64, Ordering::Relaxed);
        drop(gone);
    }
}

/// An object read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub info: ObjectInfo,
    pub data: Vec<u8>,
}

/// One process, held for a call. Dropped between answers, it goes back to the pool;
/// dropped in the middle of one (the caller went away), it is stopped.
pub struct Reader {
    pooled: Option<Pooled>,
    key: Key,
    engine: Weak<Inner>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        let Some(pooled) = self.pooled.take() else {
            return;
        };
        let Some(inner) = self.engine.upgrade() else {
            return;
        };
        if !pooled.poolable || !pooled.process.reusable() {
            return;
        }
        let born = pooled.born;
        let gone = inner
            .book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .give_back(self.key.clone(), pooled, born, Instant::now());
        inner.reaped.fetch_add(gone.len() as u64, Ordering::Relaxed);
        drop(gone);
        inner.changed.notify_waiters();
    }
}

impl Reader {
    fn process(&mut self) -> &mut Process {
        &mut self.pooled.as_mut().expect("held until dropped").process
    }

    /// What `name` (any revision, `rev:path` included) names; `None` if nothing.
    pub async fn info(&mut self, name: &str) -> Result<Option<ObjectInfo>, NodeError> {
        let p = self.process();
        p.request(&[(Ask::Info, name)]).await?;
        p.answer(Ask::Info).await
    }

    /// Starts reading the object `name` names; its contents follow through
    /// [`Reader::read`] (what is not read is skipped by the next lookup).
    pub async fn open(&mut self, name: &str) -> Result<Option<ObjectInfo>, NodeError> {
        let p = self.process();
        p.request(&[(Ask::Contents, name)]).await?;
        p.answer(Ask::Contents).await
    }

    /// Up to `max` more bytes of the object last opened; empty at its end.
    pub async fn read(&mut self, max: usize) -> Result<Vec<u8>, NodeError> {
        self.process().read(max).await
    }

    /// The object `name` names, whole; more than `limit` bytes is an error.
    pub async fn object(&mut self, name: &str, limit: u64) -> Result<Option<Object>, NodeError> {
        let Some(info) = self.open(name).await? else {
            return Ok(None);
        };
        if info.size > limit {
            return Err(too_large(&info, limit));
        }
        let data = self.process().read_rest().await?;
        Ok(Some(Object { info, data }))
    }

    /// The commit `rev` leads to (`rev^{commit}`), parsed; `None` if none.
    pub async fn commit(&mut self, rev: &str) -> Result<Option<GitCommit>, NodeError> {
        Ok(self.parsed_commit(rev).await?.map(|p| p.commit))
    }

    /// Like [`Reader::commit`], with the signatures and signed payload.
    pub async fn parsed_commit(&mut self, rev: &str) -> Result<Option<ParsedCommit>, NodeError> {
        match self
            .object(&format!("{rev}^{{commit}}"), MAX_OBJECT)
            .await?
        {
            Some(o) if o.info.kind == Kind::Commit => {
                Ok(Some(object::parse_commit(&o.info.oid, &o.data)))
            }
            _ => Ok(None),
        }
    }

    /// The tree `name` names, parsed; `None` if it names no tree.
    pub async fn tree(
        &mut self,
        name: &str,
    ) -> Result<Option<(ObjectInfo, Vec<TreeItem>)>, NodeError> {
        match self.object(name, MAX_OBJECT).await? {
            Some(o) if o.info.kind == Kind::Tree => {
                let items = object::parse_tree(&o.data, o.info.oid.len());
                Ok(Some((o.info, items)))
            }
            _ => Ok(None),
        }
    }

    /// Many objects, whole, in order, [`WINDOW`] per round trip; each at most `limit`
    /// bytes. For commits and tags, not for blobs of any size. A name git could not
    /// be asked for (empty, NUL) names nothing.
    pub async fn objects(
        &mut self,
        names: &[String],
        limit: u64,
    ) -> Result<Vec<Option<Object>>, NodeError> {
        let mut out = Vec::with_capacity(names.len());
        for window in names.chunks(WINDOW) {
            let asks: Vec<(Ask, &str)> = window
                .iter()
                .filter(|n| process::askable(n))
                .map(|n| (Ask::Contents, n.as_str()))
                .collect();
            let p = self.process();
            if !asks.is_empty() {
                p.request(&asks).await?;
            }
            for name in window {
                if !process::askable(name) {
                    out.push(None);
                    continue;
                }
                let Some(info) = p.answer(Ask::Contents).await? else {
                    out.push(None);
                    continue;
                };
                if info.size > limit {
                    return Err(too_large(&info, limit));
                }
                let data = p.read_rest().await?;
                out.push(Some(Object { info, data }));
            }
        }
        Ok(out)
    }

    /// Many headers, in order, [`WINDOW`] per round trip.
    pub async fn infos(&mut self, names: &[String]) -> Result<Vec<Option<ObjectInfo>>, NodeError> {
        let mut out = Vec::with_capacity(names.len());
        for window in names.chunks(WINDOW) {
            let asks: Vec<(Ask, &str)> = window
                .iter()
                .filter(|n| process::askable(n))
                .map(|n| (Ask::Info, n.as_str()))
                .collect();
            let p = self.process();
            if !asks.is_empty() {
                p.request(&asks).await?;
            }
            for name in window {
                if process::askable(name) {
                    out.push(p.answer(Ask::Info).await?);
                } else {
                    out.push(None);
                }
            }
        }
        Ok(out)
    }

    /// Many commits (each `name^{commit}`), parsed, in order.
    pub async fn commits(&mut self, names: &[String]) -> Result<Vec<Option<GitCommit>>, NodeError> {
        let peeled: Vec<String> = names.iter().map(|n| format!("{n}^{{commit}}")).collect();
        Ok(self
            .objects(&peeled, MAX_OBJECT)
            .await?
            .into_iter()
            .map(|o| {
                o.filter(|o| o.info.kind == Kind::Commit)
                    .map(|o| object::parse_commit(&o.info.oid, &o.data).commit)
            })
            .collect())
    }
}

fn too_large(info: &ObjectInfo, limit: u64) -> NodeError {
    NodeError::FailedPrecondition(format!(
        "{} {} is {} bytes, more than this call reads whole ({limit})",
        info.kind.as_str(),
        info.oid,
        info.size
    ))
}

#[cfg(test)]
mod tests;
