//! Load shedding for the costly calls: concurrency limits on clones and fetches
//! (upload-pack) and pushes (receive-pack), per repository and across the router, with
//! a bounded queue and a bounded wait in it, the way Gitaly's concurrency limiter
//! works. A call over the limit is refused RESOURCE_EXHAUSTED with Gitaly's messages
//! ("maximum queue size reached", "maximum time in concurrency queue reached") and its
//! structured `gitaly.LimitError` detail; the HTTP front answers it 429 with
//! `Retry-After`. Refusals are counted in metrics (`refvote_router_limited_total`).
//!
//! The `[limits]` section also holds the HTTP front's bounds against large and slow
//! clients (body size, header and idle timeouts), which the HTTP listener applies.
//!
//! It does not limit cheap calls (ref advertisements, the many small reads), nor rate:
//! only how many costly calls run and wait at once.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prost::Message;
use refvote_telemetry::metrics::{Counter, Family, Gauge, GaugeGuard};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};

/// Costly calls holding their slots, all classes (with a limit configured).
pub static IN_PROGRESS: LazyLock<Gauge> = LazyLock::new(Gauge::default);
/// Costly calls waiting in a queue.
pub static QUEUED: LazyLock<Gauge> = LazyLock::new(Gauge::default);

/// Refusals by class and reason (`queue_full`, `queue_timeout`).
pub static LIMITED: LazyLock<Family<Counter>> =
    LazyLock::new(|| Family::new(&["class", "reason"], 8));

/// The `[limits]` section of the router's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Clones and fetches (upload-pack, over gRPC, SSH or HTTP) of one repository run
    /// at once; more wait in its queue. 0 (the default): no limit.
    #[serde(default)]
    pub upload_pack_per_repository: usize,
    /// Pushes (receive-pack) to one repository run at once. 0 (the default): no limit.
    #[serde(default)]
    pub receive_pack_per_repository: usize,
    /// Costly calls (upload-pack and receive-pack together) this router runs at once,
    /// all repositories together. 0 (the default): no limit.
    #[serde(default)]
    pub max_concurrent: usize,
    /// Calls that may wait for a slot, per repository and class (and, for
    /// `max_concurrent`, across the router); one more is refused at once.
    #[serde(default = "defaults::max_queue_size")]
    pub max_queue_size: usize,
    /// How long a call waits in the queue before it is refused.
    #[serde(default = "defaults::max_queue_wait_ms")]
    pub max_queue_wait_ms: u64,
    /// What a refusal tells clients to wait before retrying (`Retry-After`, and
    /// `retry_after` of the gRPC LimitError detail).
    #[serde(default = "defaults::retry_after_secs")]
    pub retry_after_secs: u64,
    /// Largest request body the HTTP front accepts (a push's pack); larger gets 413.
    /// Keep nginx's `client_max_body_size` at least as large, so this limit decides.
    /// 0: no limit.
    #[serde(default = "defaults::max_request_body_bytes")]
    pub max_request_body_bytes: u64,
    /// How long the HTTP front waits for a request's headers, from the connection's
    /// first byte (or the end of the previous request) on; a client trickling its
    /// headers is cut off after it.
    #[serde(default = "defaults::header_timeout_secs")]
    pub header_timeout_secs: u64,
    /// How long the HTTP front waits for the next piece of a request body; a client
    /// that stops sending mid-body is cut off after it (408), freeing its slot.
    #[serde(default = "defaults::idle_timeout_secs")]
    pub idle_timeout_secs: u64,
}

mod defaults {
    pub fn max_queue_size() -> usize {
        100
    }
    pub fn max_queue_wait_ms() -> u64 {
        60_000
    }
    pub fn retry_after_secs() -> u64 {
        1
    }
    /// nginx's `client_max_body_size 2g` in install/nginx/refvote.conf.
    pub fn max_request_body_bytes() -> u64 {
        2 * 1024 * 1024 * 1024
    }
    pub fn header_timeout_secs() -> u64 {
        30
    }
    pub fn idle_timeout_secs() -> u64 {
        120
    }
}

impl Default for LimitSettings {
    fn default() -> LimitSettings {
        LimitSettings {
            upload_pack_per_repository: 0,
            receive_pack_per_repository: 0,
            max_concurrent: 0,
            max_queue_size: defaults::max_queue_size(),
            max_queue_wait_ms: defaults::max_queue_wait_ms(),
            retry_after_secs: defaults::retry_after_secs(),
            max_request_body_bytes: defaults::max_request_body_bytes(),
            header_timeout_secs: defaults::header_timeout_secs(),
            idle_timeout_secs: defaults::idle_timeout_secs(),
        }
    }
}

impl LimitSettings {
    /// The first bad key (`limits.…`) and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=3_600_000).contains(&self.max_queue_wait_ms) {
            return Err((
                "limits.max_queue_wait_ms",
                "must be between 1 and 3600000".into(),
            ));
        }
        if self.retry_after_secs > 3600 {
            return Err(("limits.retry_after_secs", "must be at most 3600".into()));
        }
        for (key, value) in [
            ("limits.header_timeout_secs", self.header_timeout_secs),
            ("limits.idle_timeout_secs", self.idle_timeout_secs),
        ] {
            if !(1..=86_400).contains(&value) {
                return Err((key, "must be between 1 and 86400".into()));
            }
        }
        Ok(())
    }

    pub fn retry_after(&self) -> Duration {
        Duration::from_secs(self.retry_after_secs)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// The body limit, if there is one.
    pub fn max_body(&self) -> Option<u64> {
        (self.max_request_body_bytes > 0).then_some(self.max_request_body_bytes)
    }

    fn per_repository(&self, class: Class) -> usize {
        match class {
            Class::UploadPack => self.upload_pack_per_repository,
            Class::ReceivePack => self.receive_pack_per_repository,
        }
    }
}

/// The costly kinds of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    UploadPack,
    ReceivePack,
}

impl Class {
    /// The class of a full gRPC method name, if it is a costly one.
    pub fn of(method: &str) -> Option<Class> {
        match method {
            "/gitaly.SmartHTTPService/PostUploadPack"
            | "/gitaly.SmartHTTPService/PostUploadPackWithSidechannel"
            | "/gitaly.SSHService/SSHUploadPack"
            | "/gitaly.SSHService/SSHUploadPackWithSidechannel"
            | "/gitaly.SSHService/SSHUploadArchive" => Some(Class::UploadPack),
            "/gitaly.SmartHTTPService/PostReceivePack" | "/gitaly.SSHService/SSHReceivePack" => {
                Some(Class::ReceivePack)
            }
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Class::UploadPack => "upload_pack",
            Class::ReceivePack => "receive_pack",
        }
    }
}

/// Why a call was shed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    /// Gitaly's `ErrMaxQueueSize`.
    #[error("maximum queue size reached")]
    QueueFull,
    /// Gitaly's `ErrMaxQueueTime`.
    #[error("maximum time in concurrency queue reached")]
    QueueTimeout,
}

/// A shed call, with what the client is told.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{why} ({scope}); retry in {retry_after_secs} s")]
pub struct Limited {
    pub why: Shed,
    /// Which limit: "3 upload-pack calls of default/a.git at once" and the like.
    pub scope: String,
    pub retry_after_secs: u64,
}

impl Limited {
    /// RESOURCE_EXHAUSTED with Gitaly's `gitaly.LimitError` detail.
    pub fn status(&self) -> Status {
        let detail = refvote_proto::gitaly::LimitError {
            error_message: self.why.to_string(),
            retry_after: Some(prost_types::Duration {
                seconds: self.retry_after_secs as i64,
                nanos: 0,
            }),
        };
        let message = self.to_string();
        let details = RpcStatus {
            code: Code::ResourceExhausted as i32,
            message: message.clone(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/gitaly.LimitError".into(),
                value: detail.encode_to_vec(),
            }],
        };
        Status::with_details(
            Code::ResourceExhausted,
            message,
            details.encode_to_vec().into(),
        )
    }
}

/// `google.rpc.Status`, the envelope of gRPC status details.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// The `gitaly.LimitError` in a status's details, if it carries one.
pub fn limit_error_of(status: &Status) -> Option<refvote_proto::gitaly::LimitError> {
    let envelope = RpcStatus::decode(status.details()).ok()?;
    envelope
        .details
        .iter()
        .find(|a| a.type_url == "type.googleapis.com/gitaly.LimitError")
        .and_then(|a| refvote_proto::gitaly::LimitError::decode(a.value.as_slice()).ok())
}

/// One limit: a semaphore and how many calls it has admitted (running or waiting).
struct Gate {
    slots: Arc<Semaphore>,
    admitted: usize,
}

/// Whether one more call may join a gate of `slots` slots with `admitted` calls
/// running or waiting, given the queue bound.
fn admits(admitted: usize, slots: usize, max_queue: usize) -> bool {
    admitted < slots.saturating_add(max_queue)
}

/// The limiter one router holds.
pub struct Limiter {
    settings: LimitSettings,
    /// Per (class, repository); a key is dropped when its last call leaves.
    keys: Mutex<HashMap<(Class, String), Gate>>,
    /// Across the router (`max_concurrent`).
    global: Mutex<Option<Gate>>,
}

/// A call's slots; dropping it frees them.
pub struct Permit {
    _in_progress: Option<GaugeGuard<'static>>,
    _slots: Vec<OwnedSemaphorePermit>,
    _admission: Vec<Admission>,
}

/// One admission to a gate, undone on drop.
struct Admission {
    limiter: Arc<Limiter>,
    key: Option<(Class, String)>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        match self.key.take() {
            Some(key) => {
                let mut keys = self.limiter.keys.lock().expect("limiter lock");
                if let Some(gate) = keys.get_mut(&key) {
                    gate.admitted -= 1;
                    if gate.admitted == 0 {
                        keys.remove(&key);
                    }
                }
            }
            None => {
                if let Some(gate) = self.limiter.global.lock().expect("limiter lock").as_mut() {
                    gate.admitted -= 1;
                }
            }
        }
    }
}

impl Limiter {
    pub fn new(settings: LimitSettings) -> Arc<Limiter> {
        let global = (settings.max_concurrent > 0).then(|| Gate {
            slots: Arc::new(Semaphore::new(settings.max_concurrent)),
            admitted: 0,
        });
        Arc::new(Limiter {
            settings,
            keys: Mutex::default(),
            global: Mutex::new(global),
        })
    }

    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    /// Waits for the slots a `class` call on `repo` needs (its repository's, then the
    /// router's), up to `max_queue_wait_ms`; refuses at once when a queue is full.
    pub async fn acquire(self: &Arc<Self>, class: Class, repo: &str) -> Result<Permit, Limited> {
        let per_repo = self.settings.per_repository(class);
        let max_queue = self.settings.max_queue_size;
        let limited = |why: Shed, scope: String| {
            LIMITED.with(&[class.label(), why.label()]).inc();
            tracing::info!(class = class.label(), repo, %why, %scope, "call shed");
            Limited {
                why,
                scope,
                retry_after_secs: self.settings.retry_after_secs,
            }
        };
        let repo_scope = || {
            format!(
                "{} {} calls of {repo} at once, {max_queue} waiting",
                per_repo,
                class.label().replace('_', "-")
            )
        };
        let global_scope = || {
            format!(
                "{} costly calls on this router at once, {max_queue} waiting",
                self.settings.max_concurrent
            )
        };
        let mut admissions = Vec::new();
        let mut waits = Vec::new();
        if per_repo > 0 {
            let key = (class, repo.to_owned());
            let mut keys = self.keys.lock().expect("limiter lock");
            let gate = keys.entry(key.clone()).or_insert_with(|| Gate {
                slots: Arc::new(Semaphore::new(per_repo)),
                admitted: 0,
            });
            if !admits(gate.admitted, per_repo, max_queue) {
                return Err(limited(Shed::QueueFull, repo_scope()));
            }
            gate.admitted += 1;
            waits.push((gate.slots.clone(), true));
            admissions.push(Admission {
                limiter: self.clone(),
                key: Some(key),
            });
        }
        if let Some(gate) = self.global.lock().expect("limiter lock").as_mut() {
            if !admits(gate.admitted, self.settings.max_concurrent, max_queue) {
                return Err(limited(Shed::QueueFull, global_scope()));
            }
            gate.admitted += 1;
            waits.push((gate.slots.clone(), false));
            admissions.push(Admission {
                limiter: self.clone(),
                key: None,
            });
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.max_queue_wait_ms);
        let queued = (!waits.is_empty()).then(|| QUEUED.track());
        let mut slots = Vec::new();
        for (sem, per_repository) in waits {
            match tokio::time::timeout_at(deadline, sem.acquire_owned()).await {
                Ok(Ok(permit)) => slots.push(permit),
                Ok(Err(_closed)) => unreachable!("limiter semaphores are never closed"),
                Err(_) => {
                    let scope = if per_repository {
                        repo_scope()
                    } else {
                        global_scope()
                    };
                    return Err(limited(Shed::QueueTimeout, scope));
                }
            }
        }
        drop(queued);
        let limited = !slots.is_empty();
        Ok(Permit {
            _in_progress: limited.then(|| IN_PROGRESS.track()),
            _slots: slots,
            _admission: admissions,
        })
    }

    /// Calls admitted (running or waiting) for `class` on `repo`; for tests.
    pub fn admitted(&self, class: Class, repo: &str) -> usize {
        self.keys
            .lock()
            .expect("limiter lock")
            .get(&(class, repo.to_owned()))
            .map_or(0, |g| g.admitted)
    }
}

impl Shed {
    fn label(&self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueTimeout => "queue_timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_repo: usize, global: usize, queue: usize, wait_ms: u64) -> Arc<Limiter> {
        Limiter::new(LimitSettings {
            upload_pack_per_repository: per_repo,
            max_concurrent: global,
            max_queue_size: queue,
            max_queue_wait_ms: wait_ms,
            ..LimitSettings::default()
        })
    }

    #[test]
    fn the_costly_methods_have_a_class() {
        assert_eq!(
            Class::of("/gitaly.SmartHTTPService/PostUploadPackWithSidechannel"),
            Some(Class::UploadPack)
        );
        assert_eq!(
            Class::of("/gitaly.SSHService/SSHReceivePack"),
            Some(Class::ReceivePack)
        );
        assert_eq!(Class::of("/gitaly.RefService/FindBranch"), None);
        assert_eq!(
            Class::of("/gitaly.SmartHTTPService/InfoRefsUploadPack"),
            None
        );
    }

    #[test]
    fn queue_bound_counts_running_and_waiting() {
        assert!(admits(0, 2, 0));
        assert!(admits(1, 2, 0));
        assert!(!admits(2, 2, 0));
        assert!(admits(4, 2, 3));
        assert!(!admits(5, 2, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_limit_calls_queue_then_time_out() {
        let l = limiter(2, 0, 1, 1000);
        let a = l.acquire(Class::UploadPack, "r").await.unwrap();
        let _b = l.acquire(Class::UploadPack, "r").await.unwrap();
        // Another repository has its own slots.
        let _other = l.acquire(Class::UploadPack, "s").await.unwrap();
        // The third waits; the fourth finds the queue full.
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.acquire(Class::UploadPack, "r").await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(l.admitted(Class::UploadPack, "r"), 3);
        let full = l.acquire(Class::UploadPack, "r").await.err().unwrap();
        assert_eq!(full.why, Shed::QueueFull);
        // A slot freed in time lets the waiting call in.
        drop(a);
        waiting.await.unwrap().unwrap();
        // Now nothing frees: the next one times out after the queue wait.
        let _c = l.acquire(Class::UploadPack, "r").await.unwrap();
        let started = tokio::time::Instant::now();
        let late = l.acquire(Class::UploadPack, "r").await.err().unwrap();
        assert_eq!(late.why, Shed::QueueTimeout);
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
        // Pushes are not limited by the clone limit.
        l.acquire(Class::ReceivePack, "r").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn keys_go_away_with_their_last_call() {
        let l = limiter(1, 0, 0, 10);
        let p = l.acquire(Class::UploadPack, "r").await.unwrap();
        assert_eq!(l.admitted(Class::UploadPack, "r"), 1);
        drop(p);
        assert_eq!(l.admitted(Class::UploadPack, "r"), 0);
        assert!(l.keys.lock().unwrap().is_empty());
        // A refused call leaves nothing behind either.
        let _p = l.acquire(Class::UploadPack, "r").await.unwrap();
        assert!(l.acquire(Class::UploadPack, "r").await.is_err());
        assert_eq!(l.admitted(Class::UploadPack, "r"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_limit_spans_repositories() {
        let l = limiter(0, 1, 0, 10);
        let _a = l.acquire(Class::UploadPack, "r").await.unwrap();
        let e = l.acquire(Class::ReceivePack, "s").await.err().unwrap();
        assert_eq!(e.why, Shed::QueueFull);
        assert!(e.scope.contains("on this router"), "{}", e.scope);
    }

    #[test]
    fn the_status_is_gitalys() {
        let s = Limited {
            why: Shed::QueueTimeout,
            scope: "8 upload-pack calls of default/a.git at once".into(),
            retry_after_secs: 1,
        }
        .status();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message()
                .starts_with("maximum time in concurrency queue reached (8 upload-pack"),
            "{}",
            s.message()
        );
        let detail = limit_error_of(&s).unwrap();
        assert_eq!(
            detail.error_message,
            "maximum time in concurrency queue reached"
        );
        assert_eq!(detail.retry_after.unwrap().seconds, 1);
    }
}
