//! A thin layer over the etcd client: every request bounded by a timeout and moved to
//! another endpoint when one cannot serve, and helpers
//! to read records out of range and transaction responses. The requests that failed
//! are counted ([`ETCD_ERRORS`]) for whichever process runs the store.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, GetOptions, GetResponse, KeyValue, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use refvote_telemetry::metrics::{Counter, Family, Text};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::keys::Keys;

/// etcd requests that failed, by kind (`timeout`, `unavailable`, `other`), counted by
/// [`Store`] for whichever process it runs in.
pub static ETCD_ERRORS: LazyLock<Family<Counter>> = LazyLock::new(|| Family::new(&["kind"], 8));

/// Writes [`ETCD_ERRORS`] as `<prefix>_etcd_errors_total`, every kind present from the
/// first scrape.
pub fn render_etcd_errors(t: &mut Text, prefix: &str) {
    for kind in ["timeout", "unavailable", "other"] {
        ETCD_ERRORS.with(&[kind]);
    }
    t.counter_family(
        &format!("{prefix}_etcd_errors_total"),
        "etcd requests that failed, by kind.",
        &ETCD_ERRORS,
    );
}

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Bound on every single request.
    pub request_timeout: Duration,
    /// TLS towards `https://` endpoints; `None`: plaintext only.
    pub tls: Option<EtcdTls>,
}

/// PEM files for TLS towards etcd.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA that signed the members' certificates.
    pub ca: PathBuf,
    /// A client certificate and key, for members run with `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    fn options(&self) -> Result<etcd_client::TlsOptions> {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| Error::Invalid(format!("etcd TLS: cannot read {}: {e}", p.display())))
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)?));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(tls)
    }
}

/// Connected etcd clients, one per endpoint, with refvote's key schema.
///
/// Requests go to one endpoint at a time; when it fails to answer (down, no leader,
/// cut off) the request moves to the next one within the same timeout. A single
/// balanced client would keep routing some requests to a dead member. Every request
/// refvote makes is safe to repeat: puts are idempotent and every conditional write
/// is re-read when its compare fails.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    clients: Vec<Client>,
    current: AtomicUsize,
    keys: Keys,
    timeout: Duration,
    /// Whether the last request ended without an answer from etcd.
    failing: AtomicBool,
    /// Counts the times etcd answered again after a request had failed: what
    /// [`Store::pause`] wakes on.
    answered_again: watch::Sender<u64>,
}

/// One key as read: its value and revisions.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

impl Entry {
    fn from_kv(kv: &KeyValue) -> Entry {
        Entry {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }

    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.value).map_err(|source| Error::Corrupt {
            key: self.key.clone(),
            source,
        })
    }
}

/// Whether an error says "this endpoint cannot serve now" rather than "this request
/// is wrong": only the former moves a request to another endpoint.
fn is_endpoint_failure(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::Cancelled
        ),
        // etcd's answer that a lease is gone is an answer, not a failing endpoint:
        // asking every other member again only delays the new grant.
        etcd_client::Error::LeaseKeepAliveError(m) => !m.contains("lease not found"),
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_) => true,
        _ => false,
    }
}

impl Store {
    /// Sets up a client per endpoint. Connections are made lazily and remade by the
    /// clients, so a store made while etcd is down works once it is up.
    pub async fn connect(config: &StoreConfig) -> Result<Store> {
        if config.endpoints.is_empty() {
            return Err(Error::Invalid("no etcd endpoints configured".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(2), config.request_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let options = match &config.tls {
            Some(tls) => options.with_tls(tls.options()?),
            None => options,
        };
        let mut clients = Vec::new();
        for endpoint in &config.endpoints {
            let connect = Client::connect([endpoint], Some(options.clone()));
            let client = tokio::time::timeout(config.request_timeout, connect)
                .await
                .map_err(|_| Error::Timeout(config.request_timeout))??;
            clients.push(client);
        }
        Ok(Store {
            inner: Arc::new(Inner {
                clients,
                current: AtomicUsize::new(0),
                keys: Keys::new(&config.prefix),
                timeout: config.request_timeout,
                failing: AtomicBool::new(false),
                answered_again: watch::channel(0).0,
            }),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The client of the endpoint in use, for watches and leases.
    pub fn client(&self) -> Client {
        let i = self.inner.current.load(Ordering::Relaxed);
        self.inner.clients[i].clone()
    }

    /// Moves future requests off the endpoint in use (after it failed a stream).
    pub fn fail_over(&self) {
        let i = self.inner.current.load(Ordering::Relaxed);
        self.rotate(i);
    }

    fn rotate(&self, failed: usize) {
        let next = (failed + 1) % self.inner.clients.len();
        let _ =
            self.inner
                .current
                .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// A retry's back-off: sleeps `wait`, or less, returning as soon as etcd answers a
    /// request of this store after one had failed. Whoever waits out an etcd outage
    /// this way resumes right after etcd is back (every process keeps its lease
    /// renewals going every 100 ms while etcd fails, so the return is noticed at once),
    /// not when a back-off grown during the outage runs out.
    pub async fn pause(&self, wait: Duration) {
        let mut answered = self.inner.answered_again.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = answered.changed() => {}
        }
    }

    /// etcd answered a request (or a lease renewal).
    pub(crate) fn answered(&self) {
        if self.inner.failing.swap(false, Ordering::Relaxed) {
            self.inner.answered_again.send_modify(|n| *n += 1);
        }
    }

    /// A request (or a lease renewal) got no answer from etcd.
    pub(crate) fn unanswered(&self) {
        self.inner.failing.store(true, Ordering::Relaxed);
    }

    /// Runs `op` against the endpoint in use, moving to the next endpoint when one
    /// cannot serve, all under the request timeout.
    pub async fn request<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let n = self.inner.clients.len();
        let mut last = None;
        for attempt in 0..(2 * n) {
            let i = self.inner.current.load(Ordering::Relaxed);
            let client = self.inner.clients[i].clone();
            match tokio::time::timeout_at(deadline, op(client)).await {
                Ok(Ok(v)) => {
                    self.answered();
                    return Ok(v);
                }
                Ok(Err(e)) if is_endpoint_failure(&e) => {
                    ETCD_ERRORS.with(&["unavailable"]).inc();
                    self.unanswered();
                    tracing::debug!(endpoint = i, attempt, error = %e, "etcd endpoint failed; trying the next");
                    self.rotate(i);
                    last = Some(e);
                    // A member without a leader answers at once; do not spin.
                    if attempt + 1 >= n {
                        tokio::time::sleep(
                            Duration::from_millis(50).min(
                                deadline.saturating_duration_since(tokio::time::Instant::now()),
                            ),
                        )
                        .await;
                    }
                }
                Ok(Err(e)) => {
                    // etcd answered (a refusal of this request).
                    self.answered();
                    ETCD_ERRORS.with(&["other"]).inc();
                    return Err(e.into());
                }
                Err(_) => {
                    ETCD_ERRORS.with(&["timeout"]).inc();
                    self.unanswered();
                    self.rotate(i);
                    return Err(Error::Timeout(self.inner.timeout));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Err(last
            .map(Error::from)
            .unwrap_or(Error::Timeout(self.inner.timeout)))
    }

    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.request(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    pub async fn get(&self, key: &str) -> Result<Option<Entry>> {
        let resp = self
            .request(|mut c| async move { c.get(key, None).await })
            .await?;
        Ok(resp.kvs().first().map(Entry::from_kv))
    }

    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<Entry>, i64)> {
        let resp = self
            .request(
                |mut c| async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await },
            )
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((entries(&resp), rev))
    }
}

/// A range read inside a transaction.
pub fn get_op(key: &str) -> TxnOp {
    TxnOp::get(key, None)
}

/// A prefix range read inside a transaction.
pub fn get_prefix_op(prefix: &str) -> TxnOp {
    TxnOp::get(prefix, Some(GetOptions::new().with_prefix()))
}

pub fn entries(resp: &GetResponse) -> Vec<Entry> {
    resp.kvs().iter().map(Entry::from_kv).collect()
}

/// The range responses of a transaction, in order; other responses are skipped.
pub fn ranges(resp: &TxnResponse) -> Vec<Vec<Entry>> {
    resp.op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(entries(&g)),
            _ => None,
        })
        .collect()
}

pub fn revision(resp: &TxnResponse) -> i64 {
    resp.header().map(|h| h.revision()).unwrap_or(0)
}

/// Entries keyed by what follows `parent` in their key.
pub fn by_tail(entries: &[Entry], parent: &str) -> BTreeMap<String, Entry> {
    entries
        .iter()
        .filter_map(|e| {
            e.key
                .strip_prefix(parent)
                .map(|tail| (tail.to_owned(), e.clone()))
        })
        .collect()
}

pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}
