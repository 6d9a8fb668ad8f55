//! The bucket: an S3-compatible store through `object_store` (rustls with ring, no
//! OpenSSL), or a local directory for tests and small set-ups, behind one type.
//!
//! Every request is retried with exponential back-off by `object_store`'s retry layer
//! (`store.retries`, bounded overall by `store.retry_timeout_secs`); what still fails
//! becomes a [`StoreError`] saying which bucket and what to check. Small objects
//! (manifests) are one PUT, created only if absent; large ones go up in parts of
//! `store.part_size_mib`, at most `store.upload_concurrency` parts in flight, so memory
//! stays bounded whatever the bundle's size. Sealing and naming happen above this layer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, Certificate, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig,
};
use tokio::io::AsyncWriteExt;

use crate::config::{ConfigError, StoreConfig, StoreKind};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot use {store}: {op} {key:?} failed after retries: {cause}; check that the endpoint answers and the bucket exists"
    )]
    Unavailable {
        store: String,
        op: &'static str,
        key: String,
        cause: String,
    },
    #[error("{store} refused {op} {key}: {cause}; check the credentials and the bucket's policy")]
    Denied {
        store: String,
        op: &'static str,
        key: String,
        cause: String,
    },
    #[error("{key} is not in {store}")]
    NotFound { store: String, key: String },
    #[error("{key} already exists in {store}")]
    Exists { store: String, key: String },
}

impl StoreError {
    /// Whether the store itself could not be used (as opposed to one object's state).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. } | StoreError::Denied { .. }
        )
    }
}

/// A listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
}

/// The bucket, with the settings uploads use.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    describe: String,
    part_size: usize,
    concurrency: usize,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl Bucket {
    /// Builds the store `config` describes. Nothing is contacted yet.
    pub fn open(config: &StoreConfig) -> Result<Bucket, ConfigError> {
        let (store, describe): (Arc<dyn ObjectStore>, String) = match config.kind {
            StoreKind::Local => {
                std::fs::create_dir_all(&config.path).map_err(|e| ConfigError {
                    key: "store.path".into(),
                    reason: format!("cannot create {}: {e}", config.path.display()),
                })?;
                let fs =
                    LocalFileSystem::new_with_prefix(&config.path).map_err(|e| ConfigError {
                        key: "store.path".into(),
                        reason: e.to_string(),
                    })?;
                (
                    Arc::new(fs),
                    format!("the local store {}", config.path.display()),
                )
            }
            StoreKind::S3 => {
                install_crypto_provider();
                let creds = config.credentials()?;
                let mut client = ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(config.connect_timeout_secs))
                    .with_timeout(Duration::from_secs(config.request_timeout_secs))
                    .with_allow_http(config.endpoint.starts_with("http://"));
                if let Some(ca) = &config.ca_file {
                    let pem = std::fs::read(ca).map_err(|e| ConfigError {
                        key: "store.ca_file".into(),
                        reason: format!("cannot read {}: {e}", ca.display()),
                    })?;
                    let certs = Certificate::from_pem_bundle(&pem).map_err(|e| ConfigError {
                        key: "store.ca_file".into(),
                        reason: format!("{}: {e}", ca.display()),
                    })?;
                    for c in certs {
                        client = client.with_root_certificate(c);
                    }
                }
                let retry = RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(200),
                        max_backoff: Duration::from_secs(10),
                        base: 2.0,
                    },
                    max_retries: config.retries,
                    retry_timeout: Duration::from_secs(config.retry_timeout_secs),
                };
                let mut builder = AmazonS3Builder::new()
                    .with_bucket_name(&config.bucket)
                    .with_region(&config.region)
                    .with_access_key_id(creds.access_key_id)
                    .with_secret_access_key(creds.secret_access_key)
                    .with_virtual_hosted_style_request(config.virtual_hosted_style)
                    .with_client_options(client)
                    .with_retry(retry);
                if let Some(token) = creds.session_token {
                    builder = builder.with_token(token);
                }
                let endpoint = if config.endpoint.is_empty() {
                    format!("AWS S3 ({})", config.region)
                } else {
                    builder = builder.with_endpoint(&config.endpoint);
                    config.endpoint.clone()
                };
                let s3 = builder.build().map_err(|e| ConfigError {
                    key: "store".into(),
                    reason: e.to_string(),
                })?;
                (
                    Arc::new(s3),
                    format!("bucket {} at {endpoint}", config.bucket),
                )
            }
        };
        Ok(Bucket {
            store,
            describe,
            part_size: (config.part_size_mib * 1024 * 1024) as usize,
            concurrency: config.upload_concurrency,
        })
    }

    /// What the bucket is, for messages.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> StoreError {
        let store = self.describe.clone();
        let key = key.to_owned();
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound { store, key },
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => StoreError::Exists { store, key },
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => StoreError::Denied {
                store,
                op,
                key,
                cause: source.to_string(),
            },
            other => {
                let mut cause = chain(&other);
                if cause.contains("certificate") {
                    cause.push_str(
                        " (if the endpoint's certificate comes from a private CA, set store.ca_file)",
                    );
                }
                StoreError::Unavailable {
                    store,
                    op,
                    key,
                    cause,
                }
            }
        }
    }

    /// The folders directly under `prefix` (which ends in `/` or is empty).
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let path = (!prefix.is_empty()).then(|| Path::from(prefix));
        let listed = self
            .store
            .list_with_delimiter(path.as_ref())
            .await
            .map_err(|e| match self.error("list", prefix, e) {
                StoreError::NotFound { store, key } => StoreError::Unavailable {
                    store,
                    op: "list",
                    key,
                    cause: "no such bucket".into(),
                },
                other => other,
            })?;
        Ok(listed
            .common_prefixes
            .into_iter()
            .map(|p| format!("{p}/"))
            .collect())
    }

    /// Every object under `prefix` (a folder ending in `/`), sorted by key, after
    /// `offset` if given.
    pub async fn list(
        &self,
        prefix: &str,
        offset: Option<&str>,
    ) -> Result<Vec<Listed>, StoreError> {
        let path = Path::from(prefix);
        let mut stream = match offset {
            Some(o) => self.store.list_with_offset(Some(&path), &Path::from(o)),
            None => self.store.list(Some(&path)),
        };
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            let meta = item.map_err(|e| self.error("list", prefix, e))?;
            out.push(Listed {
                key: meta.location.to_string(),
                size: meta.size,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// A small object, whole.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = Path::from(key);
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.error("get", key, e))?;
        result.bytes().await.map_err(|e| self.error("get", key, e))
    }

    /// An object as a stream of pieces, and its size.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<(u64, BoxStream<'static, Result<Bytes, StoreError>>), StoreError> {
        let path = Path::from(key);
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.error("get", key, e))?;
        let size = result.meta.size;
        let this = self.clone();
        let k = key.to_owned();
        let stream = result
            .into_stream()
            .map(move |r| r.map_err(|e| this.error("get", &k, e)))
            .boxed();
        Ok((size, stream))
    }

    /// Writes a small object only if nothing is at `key` yet ([`StoreError::Exists`]
    /// otherwise): S3's `If-None-Match: *`, a hard link for a local directory.
    pub async fn create(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.store
            .put_opts(&Path::from(key), PutPayload::from(data), opts)
            .await
            .map(|_| ())
            .map_err(|e| self.error("put", key, e))
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    /// Starts a streamed upload to `key`.
    pub fn upload(&self, key: &str) -> Upload {
        Upload {
            writer: BufWriter::with_capacity(self.store.clone(), Path::from(key), self.part_size)
                .with_max_concurrency(self.concurrency),
            bucket: self.clone(),
            key: key.to_owned(),
            size: 0,
        }
    }
}

/// An upload in progress: parts go up as they fill; nothing is visible under the key
/// until [`Upload::finish`] completes it.
pub struct Upload {
    writer: BufWriter,
    bucket: Bucket,
    key: String,
    size: u64,
}

impl Upload {
    /// Adds bytes; waits while `upload_concurrency` parts are in flight.
    pub async fn write(&mut self, data: Bytes) -> Result<(), StoreError> {
        self.size += data.len() as u64;
        self.writer
            .put(data)
            .await
            .map_err(|e| self.bucket.error("upload", &self.key, e))
    }

    /// Completes the object; returns its size.
    pub async fn finish(mut self) -> Result<u64, StoreError> {
        self.writer
            .shutdown()
            .await
            .map_err(|e| StoreError::Unavailable {
                store: self.bucket.describe.clone(),
                op: "upload",
                key: self.key.clone(),
                cause: chain(&e),
            })?;
        Ok(self.size)
    }

    /// Gives the upload up, removing its parts where the store allows.
    pub async fn abort(mut self) {
        if let Err(e) = self.writer.abort().await {
            tracing::warn!(key = %self.key, "aborting an upload: {e}");
        }
    }
}

/// An error with its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}

/// reqwest is built without a default TLS provider (so no aws-lc): ring is installed
/// as the process's provider once, unless someone already installed one.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
