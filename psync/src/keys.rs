//! The keys of a run, read from their key files (refused when others can read them):
//! every configured key opens objects sealed under its id; the producer seals with one
//! of them (`encryption.key_id`).

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
        let keys = read_key_files(config)?;
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

/// Reads every key file. A key file others can read is refused.
pub fn read_key_files(config: &EncryptionConfig) -> Result<Vec<MasterKey>, ConfigError> {
    config
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let key = format!("encryption.keys[{i}].file");
            let meta = std::fs::metadata(&k.file)
                .map_err(|e| bad_key(&key, format!("cannot read {}: {e}", k.file.display())))?;
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o004 != 0 {
                return Err(bad_key(
                    &key,
                    format!(
                        "{} is readable by everyone; chmod 600 it (or 640 for a group)",
                        k.file.display()
                    ),
                ));
            }
            let text = std::fs::read_to_string(&k.file)
                .map_err(|e| bad_key(&key, format!("cannot read {}: {e}", k.file.display())))?;
            MasterKey::parse(k.id.clone(), &text)
                .map_err(|e| bad_key(&key, format!("{}: {e}", k.file.display())))
        })
        .collect()
}

fn bad_key(key: &str, reason: String) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyConfig;

    #[test]
    fn key_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.key");
        std::fs::write(&file, MasterKey::generate_hex()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let enc = EncryptionConfig {
            cipher: Cipher::Aes256Gcm,
            key_id: None,
            keys: vec![KeyConfig {
                id: "k".into(),
                file: file.clone(),
            }],
        };
        let err = read_key_files(&enc).unwrap_err();
        assert!(err.reason.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_key_files(&enc).unwrap()[0].id, "k");
    }
}
