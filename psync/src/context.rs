//! What every run shares — config, bucket, keys, git, progress — and the reads both
//! sides make of the bucket: a repository's listing and its manifests.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::SyncConfig;
use crate::crypto::CryptoError;
use crate::error::SyncError;
use crate::git::Git;
use crate::keys::Keys;
use crate::manifest::{Manifest, ManifestError};
use crate::naming::{Entry, Header, Kind, Layout};
use crate::plan::Listing;
use crate::progress::Progress;
use crate::refs::RefPatterns;
use crate::store::Bucket;

pub struct Context {
    pub config: SyncConfig,
    pub bucket: Bucket,
    pub layout: Layout,
    pub keys: Keys,
    pub git: Git,
    pub patterns: RefPatterns,
    pub progress: Progress,
    pub dry_run: bool,
}

/// A repository's folder in the bucket, as listed.
#[derive(Debug, Default)]
pub struct RepoListing {
    pub listing: Listing,
    /// Every data object, committed or not.
    pub data: Vec<(String, Header)>,
}

impl Context {
    /// Where local mirrors of one side live: `<cache_dir>/<side>/<R>.git`.
    pub fn mirror_path(&self, side: &str, repository: &str) -> PathBuf {
        use base64::Engine;
        let name = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(repository.as_bytes());
        self.config.cache_dir.join(side).join(format!("{name}.git"))
    }

    /// A fresh path for a temporary bundle.
    pub fn temp_bundle(&self) -> Result<PathBuf, SyncError> {
        let dir = self.config.cache_dir.join("tmp");
        std::fs::create_dir_all(&dir).map_err(|e| SyncError::io(&dir, e))?;
        Ok(dir.join(format!("{}.bundle", random_id())))
    }

    /// Lists `repository`'s folder (after `offset`, a name in it, if given).
    pub async fn list_repository(
        &self,
        repository: &str,
        offset: Option<&str>,
    ) -> Result<RepoListing, SyncError> {
        let dir = self.layout.repo_dir(repository);
        let mut out = RepoListing::default();
        for item in self.bucket.list(&dir, offset).await? {
            match self.layout.parse(&item.key) {
                Some(Entry::Manifest { sequence, .. }) => {
                    out.listing.manifests.insert(sequence);
                }
                Some(Entry::Data(h)) => {
                    if h.kind == Kind::Full {
                        out.listing.full.insert(h.sequence);
                    }
                    out.data.push((item.key, h));
                }
                None => tracing::debug!(key = %item.key, "not a partition-sync name; ignored"),
            }
        }
        Ok(out)
    }

    /// Reads and opens `repository`'s manifest `sequence`, with whichever configured
    /// key it was sealed with.
    pub async fn manifest(&self, repository: &str, sequence: u64) -> Result<Manifest, SyncError> {
        let key = self.layout.manifest(repository, sequence);
        let sealed = self.bucket.get(&key).await?;
        let mut tried = Vec::new();
        for k in self.keys.all() {
            match Manifest::open(k, &key, &sealed, repository, sequence) {
                Err(ManifestError::Crypto(CryptoError::WrongKey { key_id })) => tried.push(key_id),
                Ok(m) => {
                    // The data object's name must say what the manifest says.
                    match self.layout.parse(&m.data_key) {
                        Some(Entry::Data(h)) if h == m.header => {}
                        _ => {
                            return Err(SyncError::Manifest(ManifestError::Misplaced {
                                key: m.data_key.clone(),
                                repository: m.header.repository.clone(),
                                sequence: m.header.sequence,
                            }));
                        }
                    }
                    return Ok(m);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(SyncError::Crypto(CryptoError::WrongKey {
            key_id: tried.join(", "),
        }))
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// 16 random hex digits.
pub fn random_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source works");
    hex::encode(b)
}
