//! votingd's configuration file (TOML). Every setting has a named default; the file is
//! validated before anything is bound, and an error names the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use refvote_auth::{AuthSettings, TlsSettings};
use refvote_cluster::settings::{ConfigError, EtcdSettings, check_name, load_toml, parse_toml};
use refvote_gitlab::{GitlabSettings, HooksSettings};
use serde::{Deserialize, Serialize};

/// Where the refvote-node package installs the hook.
pub const PACKAGED_HOOK: &str = "/usr/lib/refvote/reference-transaction";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name: its voter name and the key of its etcd registration.
    pub node_name: String,
    /// TCP `ip:port` of the node's Gitaly-compatible gRPC service (Gitaly's key name).
    /// Empty disables the service (a vote-only node).
    #[serde(default = "defaults::listen_addr")]
    pub listen_addr: String,
    /// `host:port` routers dial to reach `listen_addr`; registered in etcd as
    /// `tcp://<advertise_addr>` (`tls://…` when `[tls]` serves TLS). Empty: `listen_addr` itself, which then must not be
    /// a wildcard address such as 0.0.0.0.
    #[serde(default)]
    pub advertise_addr: String,
    /// A Unix socket serving the same gRPC service to local clients (Gitaly's key
    /// name); empty: none. Needs `listen_addr`. Its permissions and group are those of
    /// the vote socket.
    #[serde(default)]
    pub socket_path: PathBuf,
    /// TCP `ip:port` serving Prometheus metrics on `GET /metrics` (Gitaly's key name);
    /// empty: no metrics endpoint.
    #[serde(default, alias = "metrics_addr")]
    pub prometheus_listen_addr: String,
    /// On SIGTERM: how long the node goes on accepting calls after it reported not
    /// ready (gRPC health NOT_SERVING, `draining` in its etcd record, so routers stop
    /// choosing it), for the transactions routers began just before they saw it.
    /// Default: 1.
    #[serde(default = "defaults::drain_grace_secs")]
    pub drain_grace_secs: u64,
    /// On SIGTERM, after the grace: how long calls in flight (pushes mid-vote, clones)
    /// may take to finish and report done before they are cut off; the etcd lease is
    /// revoked after. Default: 55.
    #[serde(default = "defaults::drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    #[serde(default)]
    pub git: GitConfig,
    /// Deadlines on what clients do (Gitaly's `[timeout]` section).
    #[serde(default)]
    pub timeout: TimeoutConfig,
    #[serde(default)]
    pub etcd: EtcdSettings,
    #[serde(default)]
    pub vote: VoteConfig,
    /// Gitaly's v2 token, checked on every call to the node's gRPC service (TCP and
    /// Unix socket; health excepted) and sent on calls to other nodes.
    #[serde(default)]
    pub auth: AuthSettings,
    /// TLS on `listen_addr` (the Unix socket stays plaintext; it is local), optional
    /// client certificates, and the CA other `tls://` nodes are checked against.
    #[serde(default)]
    pub tls: TlsSettings,
    /// GitLab's internal API (Gitaly's `[gitlab]` and `[gitlab.http-settings]`): called
    /// by this node when it is the voter designated to check a push or an operation by
    /// a GitLab user, and for post-receive. No `url`: no GitLab (custom hooks only).
    #[serde(default)]
    pub gitlab: GitlabSettings,
    /// Custom server hooks (Gitaly's `[hooks]`), run where GitLab's checks run.
    #[serde(default)]
    pub hooks: HooksSettings,
    /// Local storages: name → directory. Repositories live below them.
    #[serde(default, rename = "storage")]
    pub storages: Vec<Storage>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VoteConfig {
    /// The Unix socket the hook talks to.
    #[serde(default = "defaults::socket_path")]
    pub socket_path: PathBuf,
    /// Permissions of the socket, octal.
    #[serde(default = "defaults::socket_mode")]
    pub socket_mode: String,
    /// Group that owns the socket (the git user's group); empty keeps the default.
    #[serde(default)]
    pub socket_group: String,
    /// Longest a vote waits for the other replicas. Only bounds what nobody can detect:
    /// a failed voter, a lost lease or a finished voter settles a key at once.
    #[serde(default = "defaults::vote_timeout_ms")]
    pub vote_timeout_ms: u64,
    /// The directory `core.hooksPath` of every repository points to.
    #[serde(default = "defaults::hooks_dir")]
    pub hooks_dir: PathBuf,
    /// The hook binary to link into `hooks_dir`; empty: `reference-transaction` next to
    /// the votingd binary if there is one, else [`PACKAGED_HOOK`].
    #[serde(default)]
    pub hook_binary: PathBuf,
    /// Refuse ref updates that do not come through a refvote transaction.
    #[serde(default)]
    pub require_transaction: bool,
    /// Run the reaper for abandoned transactions (one process at a time reaps).
    #[serde(default = "defaults::yes")]
    pub reaper: bool,
    #[serde(default = "defaults::reaper_interval_ms")]
    pub reaper_interval_ms: u64,
    /// Longest GitLab's checks of one push may take on the voter that runs them
    /// (`/allowed`, custom hooks, `/pre_receive`); then the push is refused. The other
    /// voters wait 10 s longer for the verdict.
    #[serde(default = "defaults::verdict_timeout_ms")]
    pub verdict_timeout_ms: u64,
}

/// How the node service runs git.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GitConfig {
    /// The git executable (Gitaly's `[git] bin_path`); a bare name is looked up in PATH.
    #[serde(default = "defaults::git_bin")]
    pub bin_path: PathBuf,
    /// Longest one git process may run before it is stopped (a 1 GiB clone over a slow
    /// link must fit). A stopped mutator gets SIGTERM, never SIGKILL.
    #[serde(default = "defaults::git_timeout_secs")]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    /// How long a fetching client (`SSHUploadPackWithSidechannel`,
    /// `PostUploadPackWithSidechannel`) may take to end its negotiation with `done`
    /// before upload-pack is stopped with DEADLINE_EXCEEDED: an access check is only
    /// good for so long. Gitaly's `upload_pack_negotiation` (default 10 minutes).
    #[serde(default = "defaults::upload_pack_negotiation_secs")]
    pub upload_pack_negotiation_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    pub name: String,
    pub path: PathBuf,
}

mod defaults {
    use std::path::PathBuf;

    pub fn listen_addr() -> String {
        "127.0.0.1:8075".into()
    }
    pub fn drain_grace_secs() -> u64 {
        1
    }
    pub fn drain_timeout_secs() -> u64 {
        55
    }
    pub fn git_bin() -> PathBuf {
        "git".into()
    }
    pub fn git_timeout_secs() -> u64 {
        3600
    }
    pub fn upload_pack_negotiation_secs() -> u64 {
        600
    }
    pub fn socket_path() -> PathBuf {
        "/run/refvote/vote.sock".into()
    }
    pub fn socket_mode() -> String {
        "0660".into()
    }
    pub fn vote_timeout_ms() -> u64 {
        60_000
    }
    pub fn hooks_dir() -> PathBuf {
        "/var/lib/refvote/hooks".into()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn reaper_interval_ms() -> u64 {
        1000
    }
    pub fn verdict_timeout_ms() -> u64 {
        180_000
    }
}

impl Default for GitConfig {
    fn default() -> Self {
        GitConfig {
            bin_path: defaults::git_bin(),
            timeout_secs: defaults::git_timeout_secs(),
        }
    }
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            upload_pack_negotiation_secs: defaults::upload_pack_negotiation_secs(),
        }
    }
}

impl Default for VoteConfig {
    fn default() -> Self {
        VoteConfig {
            socket_path: defaults::socket_path(),
            socket_mode: defaults::socket_mode(),
            socket_group: String::new(),
            vote_timeout_ms: defaults::vote_timeout_ms(),
            hooks_dir: defaults::hooks_dir(),
            hook_binary: PathBuf::new(),
            require_transaction: false,
            reaper: true,
            reaper_interval_ms: defaults::reaper_interval_ms(),
            verdict_timeout_ms: defaults::verdict_timeout_ms(),
        }
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
        check_name(&self.node_name).map_err(|reason| invalid("node_name", reason))?;
        if !self.listen_addr.is_empty() {
            let addr = self.listen_addr.parse::<std::net::SocketAddr>().map_err(|_| {
                invalid(
                    "listen_addr",
                    format!(
                        "{:?} is not an ip:port address like \"127.0.0.1:8075\" (empty disables the service)",
                        self.listen_addr
                    ),
                )
            })?;
            if self.advertise_addr.is_empty() && addr.ip().is_unspecified() {
                return Err(invalid(
                    "advertise_addr",
                    format!(
                        "must be set when listen_addr is the wildcard {addr}: routers need an address they can dial"
                    ),
                ));
            }
        }
        if !self.prometheus_listen_addr.is_empty()
            && self
                .prometheus_listen_addr
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(invalid(
                "prometheus_listen_addr",
                format!(
                    "{:?} is not an ip:port address like \"127.0.0.1:9236\" (empty disables metrics)",
                    self.prometheus_listen_addr
                ),
            ));
        }
        if !self.socket_path.as_os_str().is_empty() {
            if !self.socket_path.is_absolute() {
                return Err(invalid("socket_path", "must be an absolute path".into()));
            }
            if self.listen_addr.is_empty() {
                return Err(invalid(
                    "socket_path",
                    "needs listen_addr: the Unix socket serves the same service as the TCP one"
                        .into(),
                ));
            }
            if self.socket_path == self.vote.socket_path {
                return Err(invalid(
                    "socket_path",
                    "must differ from vote.socket_path".into(),
                ));
            }
        }
        if !self.advertise_addr.is_empty()
            && (self.advertise_addr.contains("://") || !self.advertise_addr.contains(':'))
        {
            return Err(invalid(
                "advertise_addr",
                format!(
                    "{:?} must be host:port, without a scheme",
                    self.advertise_addr
                ),
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
        if self.git.bin_path.as_os_str().is_empty() {
            return Err(invalid("git.bin_path", "must not be empty".into()));
        }
        if self.git.timeout_secs == 0 {
            return Err(invalid("git.timeout_secs", "must be at least 1".into()));
        }
        if self.timeout.upload_pack_negotiation_secs == 0 {
            return Err(invalid(
                "timeout.upload_pack_negotiation_secs",
                "must be at least 1".into(),
            ));
        }
        self.etcd
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        self.auth
            .policy()
            .map_err(|(key, reason)| invalid(key, reason))?;
        self.tls
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        if self.vote.vote_timeout_ms < self.etcd.request_timeout_ms {
            return Err(invalid(
                "vote.vote_timeout_ms",
                "must be at least etcd.request_timeout_ms".into(),
            ));
        }
        if self.socket_mode().is_none() {
            return Err(invalid(
                "vote.socket_mode",
                format!(
                    "{:?} is not an octal mode like \"0660\"",
                    self.vote.socket_mode
                ),
            ));
        }
        if !self.vote.socket_path.is_absolute() {
            return Err(invalid(
                "vote.socket_path",
                "must be an absolute path".into(),
            ));
        }
        if !self.vote.hooks_dir.is_absolute() {
            return Err(invalid("vote.hooks_dir", "must be an absolute path".into()));
        }
        self.gitlab
            .resolve()
            .map_err(|e| invalid(e.key, e.reason))?;
        self.hooks
            .validate()
            .map_err(|e| invalid(e.key, e.reason))?;
        if self.vote.verdict_timeout_ms < 1000 {
            return Err(invalid(
                "vote.verdict_timeout_ms",
                "must be at least 1000: GitLab's checks make HTTP calls".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for s in &self.storages {
            refvote_cluster::repo::validate_storage_name(&s.name)
                .map_err(|e| invalid("storage.name", e.to_string()))?;
            if !names.insert(&s.name) {
                return Err(invalid(
                    "storage.name",
                    format!("{:?} is configured twice", s.name),
                ));
            }
            if !s.path.is_absolute() {
                return Err(invalid(
                    "storage.path",
                    format!("{} must be an absolute path", s.path.display()),
                ));
            }
        }
        Ok(())
    }

    pub fn socket_mode(&self) -> Option<u32> {
        u32::from_str_radix(self.vote.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
    }

    pub fn request_timeout(&self) -> Duration {
        self.etcd.request_timeout()
    }

    pub fn vote_timeout(&self) -> Duration {
        Duration::from_millis(self.vote.vote_timeout_ms)
    }

    pub fn verdict_timeout(&self) -> Duration {
        Duration::from_millis(self.vote.verdict_timeout_ms)
    }

    /// SIGTERM's drain: the grace while not ready, then the bound on calls in flight.
    pub fn drain(&self) -> (Duration, Duration) {
        (
            Duration::from_secs(self.drain_grace_secs),
            Duration::from_secs(self.drain_timeout_secs),
        )
    }

    pub fn git_timeout(&self) -> Duration {
        Duration::from_secs(self.git.timeout_secs)
    }

    /// `[timeout] upload_pack_negotiation_secs`.
    pub fn upload_pack_negotiation(&self) -> Duration {
        Duration::from_secs(self.timeout.upload_pack_negotiation_secs)
    }

    /// The node service's address as registered in etcd (`tcp://host:port`), or empty
    /// when the service is disabled.
    pub fn registered_address(&self) -> String {
        let scheme = self.address_scheme();
        match (self.listen_addr.as_str(), self.advertise_addr.as_str()) {
            ("", _) => String::new(),
            (listen, "") => format!("{scheme}://{listen}"),
            (_, advertised) => format!("{scheme}://{advertised}"),
        }
    }

    /// `tls` when the node service serves TLS, else `tcp` (Gitaly's address schemes).
    pub fn address_scheme(&self) -> &'static str {
        if self.tls.serves_tls() { "tls" } else { "tcp" }
    }

    pub fn lease_ttl(&self) -> Duration {
        self.etcd.lease_ttl()
    }

    /// The hook binary to install: configured, or beside this executable (a build
    /// tree), or where the refvote-node package puts it.
    pub fn hook_binary(&self) -> PathBuf {
        if !self.vote.hook_binary.as_os_str().is_empty() {
            return self.vote.hook_binary.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("reference-transaction")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PACKAGED_HOOK.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("votingd.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("node_name = \"n1\"\n").unwrap();
        assert_eq!(c.etcd.prefix, "/refvote/");
        assert_eq!(c.socket_mode(), Some(0o660));
        assert!(!c.vote.require_transaction);
        assert_eq!(c.listen_addr, "127.0.0.1:8075");
        assert_eq!(c.registered_address(), "tcp://127.0.0.1:8075");
    }

    #[test]
    fn listen_addr_is_validated() {
        let e = parse("node_name = \"n1\"\nlisten_addr = \"localhost\"\n").unwrap_err();
        assert!(e.contains("listen_addr"), "{e}");
        let e = parse("node_name = \"n1\"\nlisten_addr = \"0.0.0.0:8075\"\n").unwrap_err();
        assert!(e.contains("advertise_addr"), "{e}");
        let c = parse(
            "node_name = \"n1\"\nlisten_addr = \"0.0.0.0:8075\"\nadvertise_addr = \"node1.example:8075\"\n",
        )
        .unwrap();
        assert_eq!(c.registered_address(), "tcp://node1.example:8075");
        let c = parse("node_name = \"n1\"\nlisten_addr = \"\"\n").unwrap();
        assert_eq!(c.registered_address(), "");
        let e = parse("node_name = \"n1\"\ndrain_timeout_secs = 0\n").unwrap_err();
        assert!(e.contains("drain_timeout_secs"), "{e}");
        let e = parse("node_name = \"n1\"\ndrain_grace_secs = 99999\n").unwrap_err();
        assert!(e.contains("drain_grace_secs"), "{e}");
        let c = parse("node_name = \"n1\"\n").unwrap();
        assert_eq!(c.drain(), (Duration::from_secs(1), Duration::from_secs(55)));
        let e = parse("node_name = \"n1\"\n[git]\ntimeout_secs = 0\n").unwrap_err();
        assert!(e.contains("git.timeout_secs"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("node_name = \"n1\"\n[etcd]\nlease_ttl_secs = 1\n").unwrap_err();
        assert!(e.contains("etcd.lease_ttl_secs"), "{e}");
        let e = parse("node_name = \"n1\"\n[vote]\nsocket_mode = \"rw\"\n").unwrap_err();
        assert!(e.contains("vote.socket_mode"), "{e}");
        let e = parse("node_name = \"n1\"\nbogus = 1\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("node_name = \"a b\"\n").unwrap_err();
        assert!(e.contains("node_name"), "{e}");
        let e = parse("node_name = \"n\"\n[[storage]]\nname = \"default\"\npath = \"rel\"\n")
            .unwrap_err();
        assert!(e.contains("storage.path"), "{e}");
        let e = parse("node_name = \"n\"\n[auth]\ntoken = \"\"\n").unwrap_err();
        assert!(e.contains("auth.token"), "{e}");
    }

    #[test]
    fn gitlab_sections_are_checked_and_name_the_key() {
        let c = parse("node_name = \"n1\"\n").unwrap();
        assert!(!c.gitlab.is_enabled());
        assert_eq!(c.vote.verdict_timeout_ms, 180_000);
        let e =
            parse("node_name = \"n1\"\n[gitlab]\nurl = \"http://127.0.0.1:8080\"\n").unwrap_err();
        assert!(e.contains("gitlab.secret_file"), "{e}");
        let e =
            parse("node_name = \"n1\"\n[gitlab]\nurl = \"ftp://x\"\nsecret = \"s\"\n").unwrap_err();
        assert!(e.contains("gitlab.url"), "{e}");
        let e = parse("node_name = \"n1\"\n[hooks]\ncustom_hooks_dir = \"rel\"\n").unwrap_err();
        assert!(e.contains("hooks.custom_hooks_dir"), "{e}");
        let e = parse("node_name = \"n1\"\n[vote]\nverdict_timeout_ms = 5\n").unwrap_err();
        assert!(e.contains("vote.verdict_timeout_ms"), "{e}");
        let c = parse(
            "node_name = \"n1\"\n[gitlab]\nurl = \"http://127.0.0.1:8080\"\nsecret = \"s\"\n[gitlab.http-settings]\nread_timeout = 5\n",
        )
        .unwrap();
        assert!(c.gitlab.is_enabled());
        assert_eq!(c.gitlab.http_settings.read_timeout, 5);
    }

    #[test]
    fn the_install_example_documents_every_key_with_its_default() {
        let text = include_str!("../../install/votingd.toml");
        let example = Config::parse(text, Path::new("install/votingd.toml")).unwrap();
        let full = toml::Value::try_from(&example).unwrap();
        let defaults = toml::Value::try_from(parse("node_name = \"n1\"\n").unwrap()).unwrap();
        let problems = refvote_cluster::settings::example_problems(
            &toml::Value::Table(toml::from_str(text).unwrap()),
            &full,
            &defaults,
            &["node_name", "storage"],
        );
        assert!(
            problems.is_empty(),
            "install/votingd.toml:\n{}",
            problems.join("\n")
        );
    }
}
