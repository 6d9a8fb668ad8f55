//! `sync.toml`: one file for both sides (the producer reads `[source]`, the consumer
//! `[target]`), validated before anything is touched, with errors that name the key.
//! `partition-sync.toml` beside this crate documents every key with its default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crypto::Cipher;
use crate::naming::{self, Layout};
use crate::refs::RefPatterns;

/// A configuration error: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Which side reads the config: each needs its own sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Produce,
    Consume,
    /// Reading the bucket only (`list`): the store and the keys.
    Inspect,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Local mirrors, temporary bundles and run status.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Where `refvote_partition_sync_<role>.prom` is written for node_exporter's
    /// textfile collector; empty: no metrics file.
    #[serde(default)]
    pub metrics_dir: PathBuf,
    /// Seconds one git run may take.
    #[serde(default = "default_git_timeout")]
    pub git_timeout_secs: u64,
    pub store: StoreConfig,
    pub encryption: EncryptionConfig,
    #[serde(default)]
    pub repositories: RepositoriesConfig,
    pub source: Option<SourceConfig>,
    pub target: Option<TargetConfig>,
}

fn default_cache_dir() -> PathBuf {
    "/var/lib/refvote/partition-sync".into()
}
fn default_git_timeout() -> u64 {
    3600
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    S3,
    Local,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default = "default_kind")]
    pub kind: StoreKind,
    /// S3 endpoint URL (`https://s3.example.net:9000`); empty: AWS for `region`.
    #[serde(default)]
    pub endpoint: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub bucket: String,
    /// Folder inside the bucket (or directory) everything lives under.
    #[serde(default)]
    pub prefix: String,
    /// `kind = "local"`: the directory that plays the bucket.
    #[serde(default)]
    pub path: PathBuf,
    /// A TOML file with `access_key_id`, `secret_access_key` and optionally
    /// `session_token`; unset: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN` from the environment.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// PEM file of the CA(s) the endpoint's certificate is checked against, besides the
    /// system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub virtual_hosted_style: bool,
    /// Objects larger than this are uploaded in parts of this size (S3's minimum is 5).
    #[serde(default = "default_part_size")]
    pub part_size_mib: u64,
    /// Parts uploaded at once.
    #[serde(default = "default_concurrency")]
    pub upload_concurrency: usize,
    /// Retries of one failed request (with exponential back-off).
    #[serde(default = "default_retries")]
    pub retries: usize,
    /// No retry starts later than this after the first try.
    #[serde(default = "default_retry_timeout")]
    pub retry_timeout_secs: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Bound on one request (one part of an upload, one download).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
}

fn default_kind() -> StoreKind {
    StoreKind::S3
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_part_size() -> u64 {
    16
}
fn default_concurrency() -> usize {
    4
}
fn default_retries() -> usize {
    5
}
fn default_retry_timeout() -> u64 {
    120
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_request_timeout() -> u64 {
    600
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    #[serde(default = "default_cipher")]
    pub cipher: Cipher,
    /// The key the producer seals with; default: the only key listed.
    #[serde(default)]
    pub key_id: Option<String>,
    pub keys: Vec<KeyConfig>,
}

fn default_cipher() -> Cipher {
    Cipher::Aes256Gcm
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// A label recorded with each object (e.g. `2026-01`); not secret.
    pub id: String,
    /// 64 hex digits (`votingctl partition-sync keygen`); not readable by others.
    pub file: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoriesConfig {
    /// Exact relative paths (`group/project.git`).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Path prefixes (`group/`): every repository under them.
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// The refs carried (producer) and pushed (consumer): exact names or namespaces
    /// ending in `/*`.
    #[serde(default = "default_refs")]
    pub refs: Vec<String>,
}

fn default_refs() -> Vec<String> {
    vec!["refs/*".into()]
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Base URL the repositories are read from, the relative path appended: the source
    /// cluster's router (`http://router:8080/`), or a directory (`file:///srv/git/`).
    pub url: String,
    /// A source-cluster node's votingd.toml: with it, `votingctl partition-sync
    /// produce` resolves `repositories.prefixes` against the cluster's registry in etcd
    /// and authenticates to the router with the cluster's `[auth]` secret.
    #[serde(default)]
    pub node_config: Option<PathBuf>,
    /// With `node_config`: the virtual storage whose registry is read (the one the
    /// router's git HTTP serves).
    #[serde(default = "default_virtual_storage")]
    pub virtual_storage: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// Any git remote, by push.
    Git,
    /// A refvote cluster, through its router, as voted writes.
    Refvote,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub kind: TargetKind,
    /// Base URL pushed to, the relative path appended. `kind = "git"`: any remote
    /// (`https://gitlab.isolated/`, `ssh://git@host/`, `file:///srv/mirror/`, or a
    /// directory, where missing repositories are created). `kind = "refvote"`: the
    /// target cluster's router, its git HTTP (`http://router.isolated:8080/`).
    #[serde(default)]
    pub url: String,
    /// `kind = "git"`: which sequence each repository is at; default
    /// `<cache_dir>/consumer-state.json`.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// `kind = "refvote"`: a node's votingd.toml (its `[etcd]`, `[auth]`, `[tls]`);
    /// the record of what was applied is kept in that etcd.
    #[serde(default)]
    pub node_config: Option<PathBuf>,
    /// `kind = "refvote"`: a router's gRPC address; default: one registered in etcd.
    #[serde(default)]
    pub router: Option<String>,
    /// `kind = "refvote"`: the virtual storage repositories are created in.
    #[serde(default = "default_virtual_storage")]
    pub virtual_storage: String,
}

fn default_virtual_storage() -> String {
    "default".into()
}

/// S3 credentials as the credentials file holds them.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({})", self.access_key_id)
    }
}

impl SyncConfig {
    /// Reads and validates `path` for `role`.
    pub fn load(path: &Path, role: Role) -> Result<SyncConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(path.display().to_string(), format!("cannot read: {e}")))?;
        let config = SyncConfig::parse(&text)?;
        config.validate(role)?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<SyncConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let key = e
                .span()
                .map(|s| key_at(text, s.start))
                .unwrap_or_else(|| "sync.toml".into());
            bad(key, e.message().to_owned())
        })
    }

    /// Checks every value `role` uses.
    pub fn validate(&self, role: Role) -> Result<(), ConfigError> {
        self.store.validate()?;
        self.encryption.validate(role)?;
        let r = &self.repositories;
        RefPatterns::new(&r.refs)
            .map_err(|(i, reason)| bad(format!("repositories.refs[{i}]"), reason))?;
        for (i, p) in r.paths.iter().enumerate() {
            naming::check_repository(p).map_err(|e| bad(format!("repositories.paths[{i}]"), e))?;
        }
        for (i, p) in r.prefixes.iter().enumerate() {
            if p.starts_with('/') || p.split('/').any(|s| s == "..") {
                return Err(bad(
                    format!("repositories.prefixes[{i}]"),
                    "a relative path prefix, e.g. \"group/\"",
                ));
            }
        }
        if self.git_timeout_secs == 0 {
            return Err(bad("git_timeout_secs", "must be at least 1"));
        }
        match role {
            Role::Produce => {
                if r.paths.is_empty() && r.prefixes.is_empty() {
                    return Err(bad(
                        "repositories",
                        "the producer needs paths or prefixes to carry",
                    ));
                }
                let source = self
                    .source
                    .as_ref()
                    .ok_or_else(|| bad("source", "the producer needs [source] url"))?;
                if source.url.is_empty() {
                    return Err(bad("source.url", "empty"));
                }
            }
            Role::Inspect => {}
            Role::Consume => {
                let target = self
                    .target
                    .as_ref()
                    .ok_or_else(|| bad("target", "the consumer needs [target]"))?;
                match target.kind {
                    TargetKind::Git if target.url.is_empty() => {
                        return Err(bad("target.url", "a git target needs the base URL"));
                    }
                    TargetKind::Refvote if target.url.is_empty() => {
                        return Err(bad(
                            "target.url",
                            "a refvote target needs its router's git HTTP base URL, e.g. \"http://router:8080/\"",
                        ));
                    }
                    TargetKind::Refvote if target.node_config.is_none() => {
                        return Err(bad(
                            "target.node_config",
                            "a refvote target needs a node's votingd.toml (its etcd keeps the record of what was applied)",
                        ));
                    }
                    TargetKind::Refvote if target.virtual_storage != "default" => {
                        return Err(bad(
                            "target.virtual_storage",
                            "the router's git HTTP serves the virtual storage \"default\" only",
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    pub fn layout(&self) -> Layout {
        Layout::new(&self.store.prefix).expect("validated")
    }

    pub fn ref_patterns(&self) -> RefPatterns {
        RefPatterns::new(&self.repositories.refs).expect("validated")
    }

    /// The consumer's state file for a git target.
    pub fn state_file(&self) -> PathBuf {
        self.target
            .as_ref()
            .and_then(|t| t.state_file.clone())
            .unwrap_or_else(|| self.cache_dir.join("consumer-state.json"))
    }
}

/// The dotted key of the line holding byte `offset` of a TOML text (its table's
/// header and the name before `=`), for parse errors; `line N` when there is none.
fn key_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default();
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    match line.split_once('=') {
        Some((name, _)) if !line.trim_start().starts_with('[') => {
            let name = name.trim();
            match table {
                Some(t) => format!("{t}.{name}"),
                None => name.to_owned(),
            }
        }
        _ => format!("line {line_no}"),
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        Layout::new(&self.prefix).map_err(|e| bad("store.prefix", e))?;
        match self.kind {
            StoreKind::S3 => {
                if self.bucket.is_empty() {
                    return Err(bad("store.bucket", "an S3 store needs the bucket's name"));
                }
                let scheme_ok = self.endpoint.is_empty()
                    || self.endpoint.starts_with("https://")
                    || self.endpoint.starts_with("http://");
                if !scheme_ok {
                    return Err(bad(
                        "store.endpoint",
                        "an http:// or https:// URL, e.g. https://s3.example.net:9000",
                    ));
                }
                if self.region.is_empty() {
                    return Err(bad("store.region", "empty"));
                }
            }
            StoreKind::Local => {
                if !self.path.is_absolute() {
                    return Err(bad(
                        "store.path",
                        "a local store needs an absolute directory path",
                    ));
                }
            }
        }
        if !(5..=5120).contains(&self.part_size_mib) {
            return Err(bad("store.part_size_mib", "between 5 and 5120"));
        }
        if !(1..=64).contains(&self.upload_concurrency) {
            return Err(bad("store.upload_concurrency", "between 1 and 64"));
        }
        if self.retry_timeout_secs == 0
            || self.connect_timeout_secs == 0
            || self.request_timeout_secs == 0
        {
            return Err(bad("store", "timeouts are at least 1 second"));
        }
        Ok(())
    }

    /// The S3 credentials, from the credentials file or the environment.
    pub fn credentials(&self) -> Result<Credentials, ConfigError> {
        if let Some(file) = &self.credentials_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                bad(
                    "store.credentials_file",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            return toml::from_str(&text).map_err(|e| {
                bad(
                    "store.credentials_file",
                    format!(
                        "{}: {} (it holds access_key_id = \"…\" and secret_access_key = \"…\")",
                        file.display(),
                        e.message()
                    ),
                )
            });
        }
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
                access_key_id,
                secret_access_key,
                session_token: var("AWS_SESSION_TOKEN"),
            }),
            _ => Err(bad(
                "store.credentials_file",
                "no credentials: set it, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            )),
        }
    }
}

impl EncryptionConfig {
    fn validate(&self, role: Role) -> Result<(), ConfigError> {
        if self.keys.is_empty() {
            return Err(bad("encryption.keys", "at least one key (id and file)"));
        }
        for (i, k) in self.keys.iter().enumerate() {
            let ok = !k.id.is_empty()
                && k.id.len() <= 64
                && k.id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(bad(
                    format!("encryption.keys[{i}].id"),
                    "1-64 letters, digits, '.', '_' or '-'",
                ));
            }
            if self.keys[..i].iter().any(|o| o.id == k.id) {
                return Err(bad(format!("encryption.keys[{i}].id"), "listed twice"));
            }
        }
        if role == Role::Produce {
            self.sealing_id()?;
        }
        Ok(())
    }

    /// The id of the key the producer seals with.
    pub fn sealing_id(&self) -> Result<&str, ConfigError> {
        match &self.key_id {
            Some(id) if self.keys.iter().any(|k| &k.id == id) => Ok(id),
            Some(id) => Err(bad(
                "encryption.key_id",
                format!("{id:?} is not among encryption.keys"),
            )),
            None if self.keys.len() == 1 => Ok(&self.keys[0].id),
            None => Err(bad(
                "encryption.key_id",
                "several keys are listed: name the one the producer seals with",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [store]
        endpoint = "http://127.0.0.1:9000"
        bucket = "sync"
        [encryption]
        keys = [{ id = "k1", file = "/etc/refvote/k1.key" }]
        [repositories]
        paths = ["group/p.git"]
        [source]
        url = "http://router:8080/"
        [target]
        kind = "git"
        url = "file:///srv/mirror/"
    "#;

    fn with(extra: &str, replace: (&str, &str)) -> String {
        format!("{}\n{extra}", BASE.replace(replace.0, replace.1))
    }

    #[test]
    fn the_example_is_valid_for_both_roles() {
        let c = SyncConfig::parse(BASE).unwrap();
        c.validate(Role::Produce).unwrap();
        c.validate(Role::Consume).unwrap();
        assert_eq!(c.store.part_size_mib, 16);
        assert_eq!(c.encryption.sealing_id().unwrap(), "k1");
        assert_eq!(
            c.state_file(),
            PathBuf::from("/var/lib/refvote/partition-sync/consumer-state.json")
        );
    }

    #[test]
    fn the_documented_example_is_valid() {
        let c = SyncConfig::parse(include_str!("../partition-sync.toml")).unwrap();
        c.validate(Role::Produce).unwrap();
        c.validate(Role::Consume).unwrap();
        // The documented defaults are the code's.
        let d = SyncConfig::parse(BASE).unwrap();
        assert_eq!(c.store.part_size_mib, d.store.part_size_mib);
        assert_eq!(c.store.upload_concurrency, d.store.upload_concurrency);
        assert_eq!(c.store.retries, d.store.retries);
        assert_eq!(c.store.retry_timeout_secs, d.store.retry_timeout_secs);
        assert_eq!(c.store.request_timeout_secs, d.store.request_timeout_secs);
        assert_eq!(c.store.connect_timeout_secs, d.store.connect_timeout_secs);
        assert_eq!(c.cache_dir, d.cache_dir);
        assert_eq!(c.git_timeout_secs, d.git_timeout_secs);
        assert_eq!(c.repositories.refs, d.repositories.refs);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, (&str, &str), Role, &str)] = &[
            (
                "",
                ("bucket = \"sync\"", "bucket = \"\""),
                Role::Produce,
                "store.bucket",
            ),
            (
                "",
                ("http://127.0.0.1:9000", "127.0.0.1:9000"),
                Role::Produce,
                "store.endpoint",
            ),
            (
                "",
                ("paths = [\"group/p.git\"]", "paths = [\"../x\"]"),
                Role::Produce,
                "repositories.paths[0]",
            ),
            (
                "",
                ("paths = [\"group/p.git\"]", "paths = []"),
                Role::Produce,
                "repositories",
            ),
            (
                "",
                ("id = \"k1\"", "id = \"k 1\""),
                Role::Consume,
                "encryption.keys[0].id",
            ),
            (
                "",
                ("url = \"file:///srv/mirror/\"", "url = \"\""),
                Role::Consume,
                "target.url",
            ),
            (
                "",
                ("[source]\n        url = \"http://router:8080/\"", ""),
                Role::Produce,
                "source",
            ),
        ];
        for (extra, replace, role, key) in cases {
            let text = with(extra, *replace);
            let err = SyncConfig::parse(&text)
                .and_then(|c| c.validate(*role))
                .unwrap_err();
            assert_eq!(err.key, *key, "{err}");
        }
        let err = SyncConfig::parse(&with(
            "",
            ("bucket = \"sync\"", "bucket = \"sync\"\nbukket = 1"),
        ))
        .unwrap_err();
        assert_eq!(err.key, "store.bukket", "{err}");
        let err = SyncConfig::parse(&with(
            "",
            ("[encryption]", "[encryption]\ncipher = \"rot13\""),
        ))
        .unwrap_err();
        assert_eq!(err.key, "encryption.cipher", "{err}");
        assert!(err.reason.contains("chacha20-poly1305"), "{err}");
    }

    #[test]
    fn a_refvote_target_needs_its_router_and_a_node_config() {
        let refvote = |target: &str| {
            let text = BASE.replace(
                "kind = \"git\"\n        url = \"file:///srv/mirror/\"",
                target,
            );
            SyncConfig::parse(&text).unwrap().validate(Role::Consume)
        };
        let ok = "kind = \"refvote\"\nurl = \"http://r:8080/\"\nnode_config = \"/etc/refvote/votingd.toml\"";
        refvote(ok).unwrap();
        let no_url = "kind = \"refvote\"\nnode_config = \"/etc/refvote/votingd.toml\"";
        assert_eq!(refvote(no_url).unwrap_err().key, "target.url");
        let no_node = "kind = \"refvote\"\nurl = \"http://r:8080/\"";
        assert_eq!(refvote(no_node).unwrap_err().key, "target.node_config");
        let storage = format!("{ok}\nvirtual_storage = \"other\"");
        assert_eq!(refvote(&storage).unwrap_err().key, "target.virtual_storage");
    }

    #[test]
    fn several_keys_need_the_sealing_one_named() {
        let text = BASE.replace(
            "keys = [{ id = \"k1\", file = \"/etc/refvote/k1.key\" }]",
            "keys = [{ id = \"k1\", file = \"/a\" }, { id = \"k2\", file = \"/b\" }]",
        );
        let c = SyncConfig::parse(&text).unwrap();
        assert!(c.validate(Role::Consume).is_ok());
        assert_eq!(
            c.validate(Role::Produce).unwrap_err().key,
            "encryption.key_id"
        );
    }
}
