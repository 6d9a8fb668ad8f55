//! refvote-router's configuration file (TOML). Every setting has a named default; the
//! file is validated before anything is bound, and an error names the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use refvote_auth::{AuthPolicy, AuthSettings, ReadOnlySettings, TlsSettings};
use refvote_cluster::settings::{ConfigError, EtcdSettings, check_name, load_toml, parse_toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This router's id: the creator of its transactions and the key of its etcd
    /// registration. Default: the host name, so two routers on one host must set it.
    #[serde(default = "defaults::router_id")]
    pub router_id: String,
    /// TCP `ip:port` of the Gitaly-compatible gRPC front (Gitaly's key name).
    #[serde(default = "defaults::listen_addr")]
    pub listen_addr: String,
    /// TCP `ip:port` serving plain git over HTTP (smart HTTP: clone, fetch, push) for
    /// the virtual storage `default`. Empty (the default): not served.
    #[serde(default)]
    pub http_listen_addr: String,
    /// TCP `ip:port` serving the ops web: the cluster's pages, the same data as JSON
    /// under `/api/`, and the admin jobs as buttons, for the accounts in `[ops_web]`.
    /// Empty (the default): not served.
    #[serde(default)]
    pub admin_listen_addr: String,
    /// Create a repository on the first push to it over HTTP, placed and created as
    /// CreateRepository does. Default: false (an unknown repository is 404).
    #[serde(default)]
    pub create_on_push: bool,
    /// TCP `ip:port` serving Prometheus metrics on `GET /metrics` (Gitaly's key name);
    /// empty: no metrics endpoint.
    #[serde(default, alias = "metrics_addr")]
    pub prometheus_listen_addr: String,
    /// Replicas a new repository gets (CreateRepository through the router), each on
    /// its own node.
    #[serde(default = "defaults::replication_factor")]
    pub replication_factor: usize,
    /// The storage names GitLab is configured with for this cluster (its
    /// `git_data_dirs` / `repositories.storages` keys pointing at the routers), as
    /// Praefect's `[[virtual_storage]] name`. The router reports them in ServerInfo and
    /// DiskStatistics; it routes repositories of any valid storage name either way.
    #[serde(default = "defaults::virtual_storages")]
    pub virtual_storages: Vec<String>,
    /// How long a write to a repository under an administrative lock (a repair's
    /// final catch-up, a replica being added) waits for the lock before it fails with
    /// UNAVAILABLE.
    #[serde(default = "defaults::lock_wait_ms")]
    pub lock_wait_ms: u64,
    /// How often the repair worker looks for repair jobs.
    #[serde(default = "defaults::repair_interval_ms")]
    pub repair_interval_ms: u64,
    /// Repairs this router runs at once.
    #[serde(default = "defaults::repair_concurrency")]
    pub repair_concurrency: usize,
    /// How often the reaper looks for transactions whose router died.
    #[serde(default = "defaults::reaper_interval_ms")]
    pub reaper_interval_ms: u64,
    /// How long a pending GitLab post-receive (of a write whose router may have died
    /// before asking for it) waits before this router's sweeper asks for it.
    /// Default: 5000.
    #[serde(default = "defaults::post_receive_grace_ms")]
    pub post_receive_grace_ms: u64,
    /// Serve reads from the router's watched view of etcd when etcd cannot be reached,
    /// instead of failing them UNAVAILABLE. Such a read may miss writes acknowledged
    /// (through any router) after this router lost etcd. Default: false.
    #[serde(default)]
    pub allow_stale_reads: bool,
    /// With `allow_stale_reads`: how long after losing etcd the watched view may still
    /// serve reads; after that they fail UNAVAILABLE. Default: 30.
    #[serde(default = "defaults::max_stale_read_secs")]
    pub max_stale_read_secs: u64,
    /// On SIGTERM: how long the router goes on serving while it reports not ready, so
    /// load balancers stop sending to it, before it closes its listeners. Default: 5.
    #[serde(default = "defaults::drain_grace_secs")]
    pub drain_grace_secs: u64,
    /// On SIGTERM, after the grace: how long calls in flight (pushes, clones) may take
    /// to finish before they are cut off; the etcd lease is revoked after. Default: 55.
    #[serde(default = "defaults::drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    #[serde(default)]
    pub etcd: EtcdSettings,
    /// Concurrency limits on clones and pushes, and the HTTP front's bounds on body
    /// size and slow clients.
    #[serde(default)]
    pub limits: crate::limit::LimitSettings,
    /// The ops web's accounts (admins, viewers) and how long a login lasts.
    #[serde(default)]
    pub ops_web: crate::ops_web::Settings,
    /// The background verifier: how often a pass over this router's share of the
    /// repositories starts, and how many checksums a second it may ask of the nodes.
    #[serde(default)]
    pub verifier: crate::verifier::VerifierSettings,
    /// Gitaly's v2 token: checked on every call from clients (health excepted) and
    /// sent on every call to a node. Nodes must share the secret.
    #[serde(default)]
    pub auth: AuthSettings,
    /// A second secret for callers that may only read: accessors over gRPC, clone and
    /// fetch over HTTP; anything else is refused PERMISSION_DENIED / 403. Needs `[auth]`.
    #[serde(default)]
    pub auth_read_only: ReadOnlySettings,
    /// TLS on `listen_addr` (certificate_path, key_path, optional client_ca_path) and
    /// the CA that `tls://` nodes' certificates are checked against (ca_path).
    #[serde(default)]
    pub tls: TlsSettings,
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
    pub fn virtual_storages() -> Vec<String> {
        vec!["default".into()]
    }
    pub fn lock_wait_ms() -> u64 {
        10_000
    }
    /// How often the repair worker looks for due jobs (it also looks at once when
    /// etcd answers again after an outage, or the router holds a new lease).
    pub fn repair_interval_ms() -> u64 {
        250
    }
    pub fn repair_concurrency() -> usize {
        4
    }
    pub fn reaper_interval_ms() -> u64 {
        1_000
    }
    pub fn post_receive_grace_ms() -> u64 {
        5_000
    }
    pub fn max_stale_read_secs() -> u64 {
        30
    }
    pub fn drain_grace_secs() -> u64 {
        5
    }
    pub fn drain_timeout_secs() -> u64 {
        55
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
        check_name(&self.router_id).map_err(|reason| invalid("router_id", reason))?;
        self.listen_addr.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen_addr",
                format!(
                    "{:?} is not an ip:port address like \"127.0.0.1:2305\"",
                    self.listen_addr
                ),
            )
        })?;
        if !self.http_listen_addr.is_empty() {
            self.http_listen_addr.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "http_listen_addr",
                    format!(
                        "{:?} is not an ip:port address like \"127.0.0.1:8080\" (empty turns git over HTTP off)",
                        self.http_listen_addr
                    ),
                )
            })?;
        }
        if !self.admin_listen_addr.is_empty() {
            self.admin_listen_addr.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "admin_listen_addr",
                    format!(
                        "{:?} is not an ip:port address like \"127.0.0.1:9238\" (empty turns the ops web off)",
                        self.admin_listen_addr
                    ),
                )
            })?;
        }
        self.ops_web
            .validate(!self.admin_listen_addr.is_empty())
            .map_err(|(key, reason)| invalid(key, reason))?;
        self.verifier
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        if !self.prometheus_listen_addr.is_empty()
            && self.prometheus_listen_addr.parse::<SocketAddr>().is_err()
        {
            return Err(invalid(
                "prometheus_listen_addr",
                format!(
                    "{:?} is not an ip:port address like \"127.0.0.1:9237\" (empty disables metrics)",
                    self.prometheus_listen_addr
                ),
            ));
        }
        if self.max_stale_read_secs == 0 {
            return Err(invalid(
                "max_stale_read_secs",
                "must be at least 1 (set allow_stale_reads = false to refuse stale reads)".into(),
            ));
        }
        if self.drain_grace_secs > 3600 {
            return Err(invalid("drain_grace_secs", "must be at most 3600".into()));
        }
        if !(1..=86_400).contains(&self.drain_timeout_secs) {
            return Err(invalid(
                "drain_timeout_secs",
                "must be between 1 and 86400".into(),
            ));
        }
        if self.replication_factor == 0 {
            return Err(invalid("replication_factor", "must be at least 1".into()));
        }
        if self.virtual_storages.is_empty() {
            return Err(invalid(
                "virtual_storages",
                "must name at least one storage (default: [\"default\"])".into(),
            ));
        }
        for name in &self.virtual_storages {
            refvote_cluster::repo::validate_storage_name(name)
                .map_err(|e| invalid("virtual_storages", format!("{name:?}: {e}")))?;
        }
        for (key, value) in [
            ("repair_interval_ms", self.repair_interval_ms),
            ("reaper_interval_ms", self.reaper_interval_ms),
            ("post_receive_grace_ms", self.post_receive_grace_ms),
        ] {
            if !(10..=3_600_000).contains(&value) {
                return Err(invalid(key, "must be between 10 and 3600000".into()));
            }
        }
        if self.lock_wait_ms > 600_000 {
            return Err(invalid("lock_wait_ms", "must be at most 600000".into()));
        }
        if self.repair_concurrency == 0 {
            return Err(invalid("repair_concurrency", "must be at least 1".into()));
        }
        self.etcd
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        self.limits
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        self.auth_policy()
            .map_err(|(key, reason)| invalid(key, reason))?;
        self.tls
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        Ok(())
    }

    /// `[auth]` with `[auth_read_only]`'s secret; an error names the key.
    pub fn auth_policy(&self) -> Result<Option<AuthPolicy>, (&'static str, String)> {
        let policy = self.auth.policy()?;
        let read_only = self.auth_read_only.secret()?;
        match (policy, read_only) {
            (policy, None) => Ok(policy),
            (None, Some(_)) => Err((
                "auth_read_only.token",
                "needs [auth] token or token_file: a read-only secret only means something \
                 when calls are authenticated"
                    .into(),
            )),
            (Some(p), Some(ro)) if *p.secret == *ro => Err((
                "auth_read_only.token",
                "is the same secret as [auth]'s; a read-only secret must differ".into(),
            )),
            (Some(mut p), Some(ro)) => {
                p.read_only = Some(ro);
                Ok(Some(p))
            }
        }
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen_addr.parse().expect("validated")
    }

    /// Where git smart HTTP listens, if it is on.
    pub fn http_listen(&self) -> Option<SocketAddr> {
        (!self.http_listen_addr.is_empty())
            .then(|| self.http_listen_addr.parse().expect("validated"))
    }

    /// Where the ops web listens, if it is on.
    pub fn admin_listen(&self) -> Option<SocketAddr> {
        (!self.admin_listen_addr.is_empty())
            .then(|| self.admin_listen_addr.parse().expect("validated"))
    }

    /// The metrics endpoint's address, if one is configured.
    pub fn metrics(&self) -> Option<SocketAddr> {
        self.prometheus_listen_addr.parse().ok()
    }

    pub fn request_timeout(&self) -> Duration {
        self.etcd.request_timeout()
    }

    pub fn lease_ttl(&self) -> Duration {
        self.etcd.lease_ttl()
    }

    /// SIGTERM's drain: the grace while not ready, then the bound on calls in flight.
    pub fn drain(&self) -> (Duration, Duration) {
        (
            Duration::from_secs(self.drain_grace_secs),
            Duration::from_secs(self.drain_timeout_secs),
        )
    }

    pub fn lock_wait(&self) -> Duration {
        Duration::from_millis(self.lock_wait_ms)
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
        assert_eq!(c.http_listen(), None);
        assert!(!c.create_on_push);
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
        let e = parse("http_listen_addr = \"localhost\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("http_listen_addr"), "{e}");
        let e = parse("router_id = \"a b\"").unwrap_err().to_string();
        assert!(e.contains("router_id"), "{e}");
        let e = parse("max_stale_read_secs = 0").unwrap_err().to_string();
        assert!(e.contains("max_stale_read_secs"), "{e}");
        let e = parse("bogus = 1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("admin_listen_addr = \"9238\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin_listen_addr"), "{e}");
        let e = parse("admin_listen_addr = \"127.0.0.1:9238\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ops_web.admins"), "{e}");
        let e = parse("drain_timeout_secs = 0").unwrap_err().to_string();
        assert!(e.contains("drain_timeout_secs"), "{e}");
        let e = parse("drain_grace_secs = 99999").unwrap_err().to_string();
        assert!(e.contains("drain_grace_secs"), "{e}");
        let e = parse("repair_concurrency = 0").unwrap_err().to_string();
        assert!(e.contains("repair_concurrency"), "{e}");
        let e = parse("[limits]\nmax_queue_wait_ms = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.max_queue_wait_ms"), "{e}");
        let e = parse("[etcd]\nlease_ttl = 1").unwrap_err().to_string();
        assert!(e.contains("lease_ttl"), "{e}");
        let e = parse("[auth]\ntoken = \"\"").unwrap_err().to_string();
        assert!(e.contains("auth.token"), "{e}");
        let e = parse("[auth]\ntransitioning = true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.transitioning"), "{e}");
        let e = parse("[auth_read_only]\ntoken = \"r\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth_read_only.token"), "{e}");
        let e = parse("[auth]\ntoken = \"r\"\n[auth_read_only]\ntoken = \"r\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must differ"), "{e}");
        let p = parse("[auth]\ntoken = \"w\"\n[auth_read_only]\ntoken = \"r\"")
            .unwrap()
            .auth_policy()
            .unwrap()
            .unwrap();
        assert!(p.read_only.is_some());
        let e = parse("[tls]\ncertificate_path = \"/x.pem\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.key_path"), "{e}");
    }

    #[test]
    fn the_install_example_documents_every_key_with_its_default() {
        let text = include_str!("../../install/refvote-router.toml");
        let example = parse(text).unwrap();
        let full = toml::Value::try_from(&example).unwrap();
        let defaults = toml::Value::try_from(parse("").unwrap()).unwrap();
        let problems = refvote_cluster::settings::example_problems(
            &toml::Value::Table(toml::from_str(text).unwrap()),
            &full,
            &defaults,
            // The default is the host name.
            &["router_id"],
        );
        assert!(
            problems.is_empty(),
            "install/refvote-router.toml:\n{}",
            problems.join("\n")
        );
        let e = parse("prometheus_listen_addr = \"9237\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prometheus_listen_addr"), "{e}");
    }
}
