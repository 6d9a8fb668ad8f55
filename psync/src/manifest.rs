//! The manifest: one per sequence, written last, sealed like the bundle. It is the
//! state the bucket keeps — a producer with an empty disk reads its repository's
//! latest manifest to know what the last upload carried — and what a consumer trusts:
//! the complete ref set at the sequence's tip (refs missing from it are deleted on the
//! target), where HEAD points, and the name and sizes of the sealed bundle.

use serde::{Deserialize, Serialize};

use crate::crypto::{self, Cipher, CryptoError, MasterKey};
use crate::naming::{Header, Kind};
use crate::refs::RefSet;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub header: Header,
    /// The sealed bundle's name in the bucket.
    pub data_key: String,
    /// Its size in the bucket (sealed).
    pub data_size: u64,
    /// The bundle's own size.
    pub bundle_size: u64,
    /// The refs and HEAD at this sequence's tip: what the target holds once it is
    /// applied.
    pub refs: RefSet,
    /// `sha1` or `sha256`.
    pub object_format: String,
    /// How many commits the bundle requires the target to have.
    pub prerequisites: usize,
    /// Unix seconds when the producer committed it.
    pub created_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("the manifest does not parse ({0}); was it written by a newer version?")]
    Parse(String),
    #[error(
        "the manifest at {key} describes {repository} sequence {sequence}: it was copied or renamed"
    )]
    Misplaced {
        key: String,
        repository: String,
        sequence: u64,
    },
}

impl Manifest {
    pub fn kind(&self) -> Kind {
        self.header.kind
    }

    /// Seals the manifest for its place `key`.
    pub fn seal(&self, master: &MasterKey, cipher: Cipher, key: &str) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a manifest serializes");
        crypto::seal(master, cipher, key.as_bytes(), &json)
    }

    /// Opens the manifest stored at `key`, expected to be `repository`'s `sequence`.
    pub fn open(
        master: &MasterKey,
        key: &str,
        sealed: &[u8],
        repository: &str,
        sequence: u64,
    ) -> Result<Manifest, ManifestError> {
        let json = crypto::open(master, key.as_bytes(), sealed)?;
        let m: Manifest =
            serde_json::from_slice(&json).map_err(|e| ManifestError::Parse(e.to_string()))?;
        if m.version != VERSION {
            return Err(ManifestError::Parse(format!("version {}", m.version)));
        }
        if m.header.repository != repository || m.header.sequence != sequence {
            return Err(ManifestError::Misplaced {
                key: key.to_owned(),
                repository: m.header.repository,
                sequence: m.header.sequence,
            });
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::BundleFormat;

    fn manifest(seq: u64) -> Manifest {
        Manifest {
            version: VERSION,
            header: Header {
                repository: "g/p.git".into(),
                sequence: seq,
                base: "0".into(),
                tip: "1".into(),
                format: BundleFormat::V2,
                kind: Kind::Full,
                key_id: "k".into(),
                upload: "u".into(),
            },
            data_key: "x".into(),
            data_size: 1,
            bundle_size: 1,
            refs: RefSet::default(),
            object_format: "sha1".into(),
            prerequisites: 0,
            created_at: 0,
        }
    }

    #[test]
    fn a_manifest_opens_only_where_it_was_sealed() {
        let k = MasterKey::new("k", [9; 32]);
        let m = manifest(2);
        let sealed = m.seal(&k, Cipher::Aes256Gcm, "p/2.manifest");
        assert_eq!(
            Manifest::open(&k, "p/2.manifest", &sealed, "g/p.git", 2).unwrap(),
            m
        );
        assert!(matches!(
            Manifest::open(&k, "p/3.manifest", &sealed, "g/p.git", 3),
            Err(ManifestError::Crypto(CryptoError::Authentication { .. }))
        ));
        // Sealed for the right place but claiming another sequence: refused too.
        let sealed = manifest(5).seal(&k, Cipher::Aes256Gcm, "p/4.manifest");
        assert!(matches!(
            Manifest::open(&k, "p/4.manifest", &sealed, "g/p.git", 4),
            Err(ManifestError::Misplaced { sequence: 5, .. })
        ));
    }
}
