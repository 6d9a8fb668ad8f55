//! A thin layer over the etcd client: every request bounded by a timeout, and helpers
//! to read records out of range and transaction responses.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, GetOptions, GetResponse, KeyValue, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::keys::Keys;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Bound on every single request.
    pub request_timeout: Duration,
}

/// A connected etcd client with refvote's key schema.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    timeout: Duration,
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

impl Store {
    /// Connects lazily: the client reconnects by itself when etcd comes back, so a store
    /// made while etcd is down works once it is up.
    pub async fn connect(config: &StoreConfig) -> Result<Store> {
        let options = ConnectOptions::new()
            .with_connect_timeout(config.request_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(2), config.request_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let connect = Client::connect(&config.endpoints, Some(options));
        let client = tokio::time::timeout(config.request_timeout, connect)
            .await
            .map_err(|_| Error::Timeout(config.request_timeout))??;
        Ok(Store {
            client,
            keys: Keys::new(&config.prefix),
            timeout: config.request_timeout,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The underlying client, for watches and leases.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `fut` under the request timeout.
    pub async fn bounded<T, F>(&self, fut: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(Error::Timeout(self.timeout)),
        }
    }

    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let mut client = self.client.clone();
        self.bounded(client.txn(txn)).await
    }

    pub async fn get(&self, key: &str) -> Result<Option<Entry>> {
        let mut client = self.client.clone();
        let resp = self.bounded(client.get(key, None)).await?;
        Ok(resp.kvs().first().map(Entry::from_kv))
    }

    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<Entry>, i64)> {
        let mut client = self.client.clone();
        let resp = self
            .bounded(client.get(prefix, Some(GetOptions::new().with_prefix())))
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
