//! refvote-router's configuration file (TOML). Every setting has a named default; the
//! file is validated before anything is bound, and an error names the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use refvote_cluster::settings::{ConfigError, EtcdSettings, load_toml, parse_toml};
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
    /// Serve reads from the router's watched view of etcd when etcd cannot be reached,
    /// instead of failing them UNAVAILABLE. Such a read may miss writes acknowledged
    /// (through any router) after this router lost etcd. Default: false.
    #[serde(default)]
    pub allow_stale_reads: bool,
    /// With `allow_stale_reads`: how long after losing etcd the watched view may still
    /// serve reads; after that they fail UNAVAILABLE. Default: 30.
    #[serde(default = "defaults::max_stale_read_secs")]
    pub max_stale_read_secs: u64,
    #[serde(default)]
    pub etcd: EtcdSettings,
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
    pub fn max_stale_read_secs() -> u64 {
        30
    }
    pub fn listen_addr() -> String {
        "127.0.0.1:2305".into()
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config: Config = load_toml(path)?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = parse_toml(text, path)?;
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
        if self.max_stale_read_secs == 0 {
            return Err(invalid(
                "max_stale_read_secs",
                "must be at least 1 (set allow_stale_reads = false to refuse stale reads)".into(),
            ));
        }
        if self.replication_factor == 0 {
            return Err(invalid("replication_factor", "must be at least 1".into()));
        }
        self.etcd
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        Ok(())
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen_addr.parse().expect("validated")
    }

    pub fn request_timeout(&self) -> Duration {
        self.etcd.request_timeout()
    }

    pub fn lease_ttl(&self) -> Duration {
        self.etcd.lease_ttl()
    }

    pub fn stale_reads(&self) -> crate::reads::StaleReads {
        crate::reads::StaleReads {
            allow: self.allow_stale_reads,
            max_age: Duration::from_secs(self.max_stale_read_secs),
        }
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
        assert!(!c.allow_stale_reads);
        assert_eq!(c.stale_reads().max_age, Duration::from_secs(30));
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
        let e = parse("max_stale_read_secs = 0").unwrap_err().to_string();
        assert!(e.contains("max_stale_read_secs"), "{e}");
        let e = parse("bogus = 1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("[etcd]\nlease_ttl = 1").unwrap_err().to_string();
        assert!(e.contains("lease_ttl"), "{e}");
    }
}
