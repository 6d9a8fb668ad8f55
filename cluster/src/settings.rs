//! What the router's and votingd's configuration files share: the `[etcd]` section
//! (one type, one set of defaults, one validation) and loading a TOML file with errors
//! that name the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::{EtcdTls, StoreConfig};

fn readable(key: &'static str, path: &Path) -> Result<(), (&'static str, String)> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| (key, format!("cannot read {}: {e}", path.display())))
}

/// The `[etcd]` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    /// Client URLs of every member; requests move to the next one when a member
    /// cannot serve.
    #[serde(default = "defaults::endpoints")]
    pub endpoints: Vec<String>,
    /// Every refvote key lives under this prefix.
    #[serde(default = "defaults::prefix")]
    pub prefix: String,
    /// TTL of the process's lease: how long after it dies it still counts as live
    /// (a node) or its open transactions wait before they are reaped (a router).
    #[serde(default = "defaults::lease_ttl_secs")]
    pub lease_ttl_secs: u64,
    /// Bound on every etcd request; what cannot finish in time fails closed.
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// PEM CA certificate that signed the members' certificates; needed (and only
    /// allowed) with `https://` endpoints.
    #[serde(default)]
    pub ca_path: Option<PathBuf>,
    /// PEM client certificate and key, for members run with `--client-cert-auth`.
    #[serde(default)]
    pub certificate_path: Option<PathBuf>,
    #[serde(default)]
    pub key_path: Option<PathBuf>,
}

mod defaults {
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

impl Default for EtcdSettings {
    fn default() -> Self {
        EtcdSettings {
            endpoints: defaults::endpoints(),
            prefix: defaults::prefix(),
            lease_ttl_secs: defaults::lease_ttl_secs(),
            request_timeout_ms: defaults::request_timeout_ms(),
            ca_path: None,
            certificate_path: None,
            key_path: None,
        }
    }
}

impl EtcdSettings {
    /// Checks the section; the error names the key (`etcd.…`) and says why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.endpoints.is_empty() {
            return Err((
                "etcd.endpoints",
                "needs at least one endpoint, like \"http://127.0.0.1:2379\"".into(),
            ));
        }
        if let Some(e) = self
            .endpoints
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return Err((
                "etcd.endpoints",
                format!("{e:?} must start with http:// or https://"),
            ));
        }
        if !self.prefix.starts_with('/') {
            return Err((
                "etcd.prefix",
                format!("{:?} must start with '/'", self.prefix),
            ));
        }
        if self.lease_ttl_secs < 2 {
            return Err((
                "etcd.lease_ttl_secs",
                "must be at least 2 (the lease is renewed every third of it)".into(),
            ));
        }
        if self.request_timeout_ms < 50 {
            return Err(("etcd.request_timeout_ms", "must be at least 50".into()));
        }
        let https = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        match (&self.ca_path, https) {
            (None, 0) => {}
            (None, _) => {
                return Err((
                    "etcd.ca_path",
                    "is needed with https:// endpoints: the CA that signed the members' certificates".into(),
                ));
            }
            (Some(_), n) if n != self.endpoints.len() => {
                return Err((
                    "etcd.endpoints",
                    "with etcd.ca_path set, every endpoint must be https://".into(),
                ));
            }
            (Some(ca), _) => readable("etcd.ca_path", ca)?,
        }
        match (&self.certificate_path, &self.key_path) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                if self.ca_path.is_none() {
                    return Err((
                        "etcd.certificate_path",
                        "is only used over TLS: set etcd.ca_path and https:// endpoints".into(),
                    ));
                }
                readable("etcd.certificate_path", cert)?;
                readable("etcd.key_path", key)?;
            }
            (Some(_), None) => {
                return Err((
                    "etcd.key_path",
                    "is needed with etcd.certificate_path".into(),
                ));
            }
            (None, Some(_)) => {
                return Err((
                    "etcd.certificate_path",
                    "is needed with etcd.key_path".into(),
                ));
            }
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs)
    }

    /// How [`Store::connect`](crate::Store::connect) reaches this cluster.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.clone(),
            request_timeout: self.request_timeout(),
            tls: self.ca_path.as_ref().map(|ca| EtcdTls {
                ca: ca.clone(),
                identity: self.certificate_path.clone().zip(self.key_path.clone()),
            }),
        }
    }
}

/// A name a process registers under in etcd (`node_name`, `router_id`): letters,
/// digits, '-', '_' and '.'; the reason when it is not.
pub fn check_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(())
    } else {
        Err("must be non-empty and use only letters, digits, '-', '_' and '.'".into())
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

impl ConfigError {
    pub fn invalid(path: &Path, key: &'static str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        }
    }
}

/// Reads `path` as TOML into `T`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text, path)
}

/// Parses `text` (from `path`, for messages) as TOML into `T`.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', " "),
    })
}

/// What an example config file fails to document: keys of `full` (a config serialized
/// with every key) missing from `example`, keys of `example` that `full` lacks, and
/// keys whose value in `example` differs from `defaults` (the config serialized from a
/// minimal file), except for `no_default` keys and the keys under them. Each problem is one line naming the
/// key. Arrays of tables are compared by their first element.
pub fn example_problems(
    example: &toml::Value,
    full: &toml::Value,
    defaults: &toml::Value,
    no_default: &[&str],
) -> Vec<String> {
    let mut problems = Vec::new();
    compare(example, full, Some(defaults), "", no_default, &mut problems);
    problems
}

fn compare(
    example: &toml::Value,
    full: &toml::Value,
    defaults: Option<&toml::Value>,
    path: &str,
    no_default: &[&str],
    problems: &mut Vec<String>,
) {
    use toml::Value;
    let first = |v: &Value| match v {
        Value::Array(a) if a.first().is_some_and(Value::is_table) => a.first().cloned(),
        _ => None,
    };
    if let (Some(e), Some(f)) = (first(example), first(full)) {
        return compare(&e, &f, None, path, no_default, problems);
    }
    match (example, full) {
        (Value::Table(e), Value::Table(f)) => {
            for key in f.keys().chain(e.keys().filter(|k| !f.contains_key(*k))) {
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (e.get(key), f.get(key)) {
                    (Some(ev), Some(fv)) => {
                        let dv = defaults.and_then(|d| d.get(key));
                        compare(ev, fv, dv, &sub, no_default, problems);
                    }
                    (None, _) => problems.push(format!("{sub}: not in the example")),
                    (_, None) => problems.push(format!("{sub}: not a setting")),
                }
            }
        }
        _ => {
            if no_default
                .iter()
                .any(|k| path == *k || path.strip_prefix(*k).is_some_and(|r| r.starts_with('.')))
            {
                return;
            }
            match defaults {
                Some(d) if d == example => {}
                Some(d) => problems.push(format!(
                    "{path}: the example says {example}, the default is {d}"
                )),
                None => problems.push(format!("{path}: has no default; list it in no_default")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<(), (&'static str, String)> {
        toml::from_str::<EtcdSettings>(text).unwrap().validate()
    }

    #[test]
    fn tls_keys_are_checked_together() {
        assert!(check("").is_ok());
        let e = check("endpoints = [\"https://127.0.0.1:2379\"]").unwrap_err();
        assert_eq!(e.0, "etcd.ca_path");
        let e = check("ca_path = \"/etc/hostname\"").unwrap_err();
        assert_eq!(e.0, "etcd.endpoints");
        let e =
            check("endpoints = [\"https://e:1\"]\nca_path = \"/nonexistent/ca.pem\"").unwrap_err();
        assert_eq!(e.0, "etcd.ca_path");
        assert!(e.1.contains("/nonexistent/ca.pem"), "{}", e.1);
        let e = check("endpoints = [\"https://e:1\"]\nca_path = \"/etc/hostname\"\ncertificate_path = \"/etc/hostname\"")
            .unwrap_err();
        assert_eq!(e.0, "etcd.key_path");
        let e = check("certificate_path = \"/etc/hostname\"\nkey_path = \"/etc/hostname\"")
            .unwrap_err();
        assert_eq!(e.0, "etcd.certificate_path");
        let ok = toml::from_str::<EtcdSettings>(
            "endpoints = [\"https://e:1\"]\nca_path = \"/etc/hostname\"\ncertificate_path = \"/etc/hostname\"\nkey_path = \"/etc/hostname\"",
        )
        .unwrap();
        assert!(ok.validate().is_ok());
        let tls = ok.store_config().tls.unwrap();
        assert!(tls.identity.is_some());
    }

    #[test]
    fn example_problems_name_the_key() {
        let v = |s: &str| toml::Value::Table(toml::from_str(s).unwrap());
        let full = v("a = 1\n[t]\nb = \"x\"\nc = 2\n[[s]]\nname = \"n\"\n");
        let defaults = v("a = 1\n[t]\nb = \"x\"\nc = 2\n");
        let ok = v("a = 1\n[t]\nb = \"x\"\nc = 2\n[[s]]\nname = \"m\"\n");
        assert!(example_problems(&ok, &full, &defaults, &["s"]).is_empty());
        let bad = v("a = 2\n[t]\nb = \"x\"\nz = 1\n[[s]]\nname = \"m\"\n");
        let p = example_problems(&bad, &full, &defaults, &["s"]).join("\n");
        assert!(p.contains("a: the example says 2, the default is 1"), "{p}");
        assert!(p.contains("t.c: not in the example"), "{p}");
        assert!(p.contains("t.z: not a setting"), "{p}");
    }
}
