//! refvote-router's configuration file (TOML). Every setting has a named default; the
//! file is validated before anything is bound, and an error names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This router's id: the creator of its transactions and the key of its etcd
    /// registration. Default: the host name, so two routers on one host must set it.
    #[serde(default = "defaults::router_id")]
    pub router_id: String,
    /// TCP `ip:port` of the Gitaly-compatible gRPC front (Gitaly's key name).
    #[serde(default = "defaults::listen_addr")]
    pub listen_addr: String,
    /// Replicas a new repository gets (CreateRepository through the router), each on
    /// its own node.
    #[serde(default = "defaults::replication_factor")]
    pub replication_factor: usize,
    #[serde(default)]
    pub etcd: EtcdConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    #[serde(default = "defaults::endpoints")]
    pub endpoints: Vec<String>,
    #[serde(default = "defaults::prefix")]
    pub prefix: String,
    /// Lease the router's transactions are bound to: how long after a router dies its
    /// open transactions are reaped.
    #[serde(default = "defaults::lease_ttl_secs")]
    pub lease_ttl_secs: u64,
    /// Bound on every etcd request; a read that cannot confirm the repository's
    /// records in time fails with UNAVAILABLE.
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
}

mod defaults {
    pub fn router_id() -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "router".into())
    }
    pub fn replication_factor() -> usize {
        3
    }
    pub fn listen_addr() -> String {
        "127.0.0.1:2305".into()
    }
    pub fn endpoints() -> Vec<String> {
        vec!["http://127.0.0.1:2379".into()]
    }
    pub fn prefix() -> String {
        "/refvote/".into()
    }
    pub fn lease_ttl_secs() -> u64 {
        10
    }
    pub fn request_timeout_ms() -> u64 {
        2000
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: defaults::endpoints(),
            prefix: defaults::prefix(),
            lease_ttl_secs: defaults::lease_ttl_secs(),
            request_timeout_ms: defaults::request_timeout_ms(),
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        if self.router_id.is_empty()
            || !self
                .router_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "router_id",
                "must be non-empty and use only letters, digits, '-', '_' and '.'".into(),
            ));
        }
        self.listen_addr.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen_addr",
                format!(
                    "{:?} is not an ip:port address like \"127.0.0.1:2305\"",
                    self.listen_addr
                ),
            )
        })?;
        if self.replication_factor == 0 {
            return Err(invalid("replication_factor", "must be at least 1".into()));
        }
        if self.etcd.endpoints.is_empty() {
            return Err(invalid(
                "etcd.endpoints",
                "needs at least one endpoint, like \"http://127.0.0.1:2379\"".into(),
            ));
        }
        if let Some(e) = self
            .etcd
            .endpoints
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return Err(invalid(
                "etcd.endpoints",
                format!("{e:?} must start with http:// or https://"),
            ));
        }
        if !self.etcd.prefix.starts_with('/') || !self.etcd.prefix.ends_with('/') {
            return Err(invalid(
                "etcd.prefix",
                format!("{:?} must start and end with '/'", self.etcd.prefix),
            ));
        }
        if self.etcd.lease_ttl_secs < 2 {
            return Err(invalid(
                "etcd.lease_ttl_secs",
                "must be at least 2 (the lease is renewed every third of it)".into(),
            ));
        }
        if self.etcd.request_timeout_ms == 0 {
            return Err(invalid(
                "etcd.request_timeout_ms",
                "must be greater than 0".into(),
            ));
        }
        Ok(())
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen_addr.parse().expect("validated")
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.etcd.request_timeout_ms)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.etcd.lease_ttl_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("router.toml"))
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let c = parse("router_id = \"r1\"").unwrap();
        assert_eq!(c.listen_addr, "127.0.0.1:2305");
        assert_eq!(c.etcd.prefix, "/refvote/");
        assert_eq!(c.request_timeout(), Duration::from_secs(2));
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("listen_addr = \"nope\"").unwrap_err().to_string();
        assert!(e.contains("listen_addr"), "{e}");
        let e = parse("[etcd]\nendpoints = []").unwrap_err().to_string();
        assert!(e.contains("etcd.endpoints"), "{e}");
        let e = parse("[etcd]\nprefix = \"x\"").unwrap_err().to_string();
        assert!(e.contains("etcd.prefix"), "{e}");
        let e = parse("router_id = \"a b\"").unwrap_err().to_string();
        assert!(e.contains("router_id"), "{e}");
        let e = parse("bogus = 1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("[etcd]\nlease_ttl = 1").unwrap_err().to_string();
        assert!(e.contains("lease_ttl"), "{e}");
    }
}
