//! The keys of a run: every configured key opens objects sealed under its id; the
//! producer seals with one of them (`encryption.key_id`).

use crate::config::{ConfigError, EncryptionConfig};
use crate::crypto::{Cipher, MasterKey};
use crate::error::SyncError;

#[derive(Debug, Clone)]
pub struct Keys {
    keys: Vec<MasterKey>,
    sealing: Option<usize>,
    pub cipher: Cipher,
}

impl Keys {
    /// Reads the key files; `sealing` asks for the producer's key to be named.
    pub fn load(config: &EncryptionConfig, sealing: bool) -> Result<Keys, ConfigError> {
        let keys = config.load_keys()?;
        let sealing = if sealing {
            let id = config.sealing_id()?;
            keys.iter().position(|k| k.id == id)
        } else {
            None
        };
        Ok(Keys {
            keys,
            sealing,
            cipher: config.cipher,
        })
    }

    pub fn from_keys(keys: Vec<MasterKey>, sealing: Option<usize>, cipher: Cipher) -> Keys {
        Keys {
            keys,
            sealing,
            cipher,
        }
    }

    /// The key objects sealed under `id` open with.
    pub fn get(&self, id: &str) -> Result<&MasterKey, SyncError> {
        self.keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| SyncError::UnknownKey {
                id: id.to_owned(),
                have: self
                    .keys
                    .iter()
                    .map(|k| k.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Every configured key.
    pub fn all(&self) -> &[MasterKey] {
        &self.keys
    }

    /// The producer's key.
    pub fn sealing(&self) -> &MasterKey {
        &self.keys[self.sealing.expect("loaded with sealing = true")]
    }
}
