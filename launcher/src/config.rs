//! The config files of a cluster on one machine, built as the real config types
//! (`votingd::Config`, `refvote_router::Config`) and written by serializing them, so a
//! key is spelt and defaulted in one place. A node's home directory holds its config,
//! storage, hooks and sockets; [`NodeSpec`] names them for the local cluster and the
//! test harness alike, and [`RouterSpec`] does the same for a router. Callers change
//! the returned config (timeouts, `[auth]`, `[tls]`, metrics) before writing it; the
//! written file is checked as the daemon will check it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::de::DeserializeOwned;

use crate::member::{Kind, Member};
use crate::ready::Ready;

/// The storage every node serves (the virtual storage clients address).
pub const STORAGE: &str = "default";

/// A value of a config type as a file with only `required` (TOML) gets it: every other
/// setting at its serde default, the one place defaults are defined.
fn defaults<T: DeserializeOwned>(required: &str) -> T {
    toml::from_str(required).expect("the required keys make a config")
}

/// `config` as TOML after a `# header` line, read back as the daemon reads it (so a bad
/// value fails here, naming the key, before anything starts), written to `path`.
fn write_checked<T: serde::Serialize>(
    path: &Path,
    header: &str,
    config: &T,
    check: impl Fn(&str, &Path) -> Result<(), String>,
) -> anyhow::Result<()> {
    let body = toml::to_string(config)
        .with_context(|| format!("serializing the config for {}", path.display()))?;
    let text = format!("# {header}\n{body}");
    check(&text, path).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// One votingd node: its name, home directory and the addresses it is given.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    /// Holds `votingd.toml`, `storage/`, `hooks/`, `vote.sock` and `gitaly.sock`.
    pub home: PathBuf,
    /// The gRPC service's TCP address.
    pub listen: SocketAddr,
    /// etcd's client URLs.
    pub etcd: Vec<String>,
    pub lease_ttl_secs: u64,
    /// The `reference-transaction` hook binary.
    pub hook: PathBuf,
}

impl NodeSpec {
    /// The storage directory (`[[storage]]` `default`).
    pub fn storage(&self) -> PathBuf {
        self.home.join("storage")
    }

    /// `core.hooksPath` of every repository (`vote.hooks_dir`).
    pub fn hooks(&self) -> PathBuf {
        self.home.join("hooks")
    }

    /// The socket the hook asks (`vote.socket_path`).
    pub fn vote_socket(&self) -> PathBuf {
        self.home.join("vote.sock")
    }

    /// The gRPC service's Unix socket (`socket_path`).
    pub fn grpc_socket(&self) -> PathBuf {
        self.home.join("gitaly.sock")
    }

    pub fn config_file(&self) -> PathBuf {
        self.home.join("votingd.toml")
    }

    /// The node's config: these paths and addresses, and every other setting at its
    /// default.
    pub fn config(&self) -> votingd::Config {
        let mut c: votingd::Config = defaults(&format!("node_name = {:?}", self.name));
        c.listen_addr = self.listen.to_string();
        c.socket_path = self.grpc_socket();
        c.etcd.endpoints = self.etcd.clone();
        c.etcd.lease_ttl_secs = self.lease_ttl_secs;
        c.vote.socket_path = self.vote_socket();
        c.vote.hooks_dir = self.hooks();
        c.vote.hook_binary = self.hook.clone();
        c.storages = vec![votingd::config::Storage {
            name: STORAGE.into(),
            path: self.storage(),
        }];
        c
    }

    /// Creates the storage and hooks directories and writes `config` to
    /// [`NodeSpec::config_file`].
    pub fn write(&self, config: &votingd::Config, header: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.storage())
            .with_context(|| format!("creating {}", self.storage().display()))?;
        std::fs::create_dir_all(self.hooks())
            .with_context(|| format!("creating {}", self.hooks().display()))?;
        write_checked(&self.config_file(), header, config, |text, path| {
            votingd::Config::parse(text, path)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    /// The node as a process to start (`program` is votingd), healthy once it answers
    /// on its vote socket holding its etcd lease.
    pub fn member(&self, program: &Path) -> Member {
        Member {
            name: self.name.clone(),
            kind: Kind::Node,
            program: program.to_owned(),
            args: vec!["--config".into(), self.config_file().display().to_string()],
            env: vec![("RUST_LOG".into(), "info".into())],
            ready: Ready::NodeLease {
                socket: self.vote_socket(),
            },
        }
    }
}

/// One refvote-router: its id, home directory and addresses.
#[derive(Debug, Clone)]
pub struct RouterSpec {
    /// Its `router_id`.
    pub name: String,
    /// Holds `router.toml`.
    pub home: PathBuf,
    /// The gRPC front.
    pub listen: SocketAddr,
    /// git smart HTTP, if served.
    pub http: Option<SocketAddr>,
    pub etcd: Vec<String>,
    pub lease_ttl_secs: u64,
}

impl RouterSpec {
    pub fn config_file(&self) -> PathBuf {
        self.home.join("router.toml")
    }

    /// The router's config: its id, addresses and etcd, every other setting at its
    /// default.
    pub fn config(&self) -> refvote_router::Config {
        let mut c: refvote_router::Config = defaults(&format!("router_id = {:?}", self.name));
        c.listen_addr = self.listen.to_string();
        c.http_listen_addr = self.http.map(|a| a.to_string()).unwrap_or_default();
        c.etcd.endpoints = self.etcd.clone();
        c.etcd.lease_ttl_secs = self.lease_ttl_secs;
        // No load balancer to notice a drain on one machine: stop without the grace.
        c.drain_grace_secs = 0;
        c.drain_timeout_secs = 10;
        c
    }

    /// Writes `config` to [`RouterSpec::config_file`].
    pub fn write(&self, config: &refvote_router::Config, header: &str) -> anyhow::Result<()> {
        write_checked(&self.config_file(), header, config, |text, path| {
            refvote_router::Config::parse(text, path)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    /// The router as a process to start (`program` is refvote-router), healthy once
    /// its ports accept connections (it binds them only once its registry and etcd
    /// client are set up).
    pub fn member(&self, program: &Path) -> Member {
        let mut addrs = vec![self.listen.to_string()];
        addrs.extend(self.http.map(|a| a.to_string()));
        Member {
            name: self.name.clone(),
            kind: Kind::Router,
            program: program.to_owned(),
            args: vec!["--config".into(), self.config_file().display().to_string()],
            env: vec![("RUST_LOG".into(), "info".into())],
            ready: Ready::Listening { addrs },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(home: &Path) -> NodeSpec {
        NodeSpec {
            name: "node1".into(),
            home: home.to_owned(),
            listen: "127.0.0.1:4001".parse().unwrap(),
            etcd: vec!["http://127.0.0.1:4000".into()],
            lease_ttl_secs: 5,
            hook: "/usr/lib/refvote/reference-transaction".into(),
        }
    }

    #[test]
    fn a_node_config_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let spec = node(dir.path());
        let mut config = spec.config();
        config.vote.vote_timeout_ms = 15_000;
        spec.write(&config, "a test node").unwrap();
        let text = std::fs::read_to_string(spec.config_file()).unwrap();
        assert!(text.starts_with("# a test node\n"), "{text}");
        let back = votingd::Config::load(&spec.config_file()).unwrap();
        assert_eq!(back.node_name, "node1");
        assert_eq!(back.listen_addr, "127.0.0.1:4001");
        assert_eq!(back.vote.vote_timeout_ms, 15_000);
        assert_eq!(back.vote.socket_path, spec.vote_socket());
        assert_eq!(back.storages[0].path, spec.storage());
        assert_eq!(back.etcd.lease_ttl_secs, 5);
        // What the node did not set is the daemon's default.
        assert_eq!(back.etcd.prefix, "/refvote/");
        assert_eq!(back.vote.socket_mode, "0660");
        assert!(spec.storage().is_dir() && spec.hooks().is_dir());
    }

    #[test]
    fn a_bad_value_is_refused_before_anything_is_written_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let spec = node(dir.path());
        let mut config = spec.config();
        config.etcd.lease_ttl_secs = 1;
        let e = spec.write(&config, "bad").unwrap_err().to_string();
        assert!(e.contains("etcd.lease_ttl_secs"), "{e}");
        assert!(!spec.config_file().exists());

        let router = RouterSpec {
            name: "router".into(),
            home: dir.path().join("router"),
            listen: "127.0.0.1:4002".parse().unwrap(),
            http: Some("127.0.0.1:4003".parse().unwrap()),
            etcd: vec!["http://127.0.0.1:4000".into()],
            lease_ttl_secs: 5,
        };
        let mut config = router.config();
        config.create_on_push = true;
        router.write(&config, "a router").unwrap();
        let text = std::fs::read_to_string(router.config_file()).unwrap();
        assert!(text.contains("create_on_push = true"), "{text}");
        let back = refvote_router::Config::load(&router.config_file()).unwrap();
        assert_eq!(back.http_listen_addr, "127.0.0.1:4003");
        assert_eq!(back.replication_factor, 3);
        config.replication_factor = 0;
        let e = router.write(&config, "bad").unwrap_err().to_string();
        assert!(e.contains("replication_factor"), "{e}");
    }
}
