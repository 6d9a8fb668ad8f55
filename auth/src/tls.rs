//! The `[tls]` section of the router's and votingd's configuration files (Gitaly's
//! key names where Gitaly has them): TLS (rustls) on the gRPC listener, and the CA that
//! calls to `tls://` nodes trust.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain of this server. With `key_path`, `listen_addr` serves TLS
    /// only (and a node registers itself as `tls://…`).
    #[serde(default)]
    pub certificate_path: Option<PathBuf>,
    /// PEM private key of `certificate_path`.
    #[serde(default)]
    pub key_path: Option<PathBuf>,
    /// PEM CA certificate(s): when set, callers must present a client certificate it
    /// signed (mutual TLS). Needs `certificate_path`.
    #[serde(default)]
    pub client_ca_path: Option<PathBuf>,
    /// PEM CA certificate(s) that sign the certificates of `tls://` nodes this process
    /// calls (the router's calls to nodes, a node's repair from another node). When
    /// such a node asks for a client certificate, `certificate_path` is presented.
    #[serde(default)]
    pub ca_path: Option<PathBuf>,
}

type Invalid = (&'static str, String);

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, Invalid> {
    let bytes =
        std::fs::read(path).map_err(|e| (key, format!("cannot read {}: {e}", path.display())))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err((key, format!("{} is not a PEM file", path.display())));
    }
    Ok(bytes)
}

impl TlsSettings {
    /// Whether `listen_addr` serves TLS.
    pub fn serves_tls(&self) -> bool {
        self.certificate_path.is_some()
    }

    fn identity(&self) -> Result<Option<Identity>, Invalid> {
        match (&self.certificate_path, &self.key_path) {
            (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(
                read("tls.certificate_path", cert)?,
                read("tls.key_path", key)?,
            ))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(("tls.key_path", "is needed with tls.certificate_path".into())),
            (None, Some(_)) => Err(("tls.certificate_path", "is needed with tls.key_path".into())),
        }
    }

    /// The listener's TLS, or `None` for plaintext. Reads and parses every file, so
    /// calling it validates the section; an error names the key.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, Invalid> {
        let Some(identity) = self.identity()? else {
            if self.client_ca_path.is_some() {
                return Err((
                    "tls.client_ca_path",
                    "needs tls.certificate_path and tls.key_path: client certificates are only asked for over TLS".into(),
                ));
            }
            return Ok(None);
        };
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca_path {
            config = config.client_ca_root(Certificate::from_pem(read("tls.client_ca_path", ca)?));
        }
        // Building the acceptor parses the PEM: a bad key fails here, before any port
        // is bound, rather than on the first connection.
        tonic::transport::Server::builder()
            .tls_config(config.clone())
            .map_err(|e| {
                let e = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
                (
                    "tls.certificate_path",
                    format!("the certificate and key do not make a TLS identity: {e}"),
                )
            })?;
        Ok(Some(config))
    }

    /// What calls to `tls://` nodes trust and present, or `None` when `ca_path` is
    /// unset (then such nodes cannot be called).
    pub fn client(&self) -> Result<Option<ClientTlsConfig>, Invalid> {
        let Some(ca) = &self.ca_path else {
            return Ok(None);
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("tls.ca_path", ca)?));
        if let Some(identity) = self.identity()? {
            config = config.identity(identity);
        }
        Ok(Some(config))
    }

    /// Checks the whole section.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.server()?;
        self.client()?;
        Ok(())
    }
}

/// The `http(s)://host:port` URL of a registered node address (`tcp://` or `tls://`),
/// and whether it needs TLS.
pub fn node_url(address: &str) -> Result<(String, bool), String> {
    let (url, tls) = match address.split_once("://") {
        Some(("tcp" | "http", hostport)) if !hostport.is_empty() => {
            (format!("http://{hostport}"), false)
        }
        Some(("tls" | "https", hostport)) if !hostport.is_empty() => {
            (format!("https://{hostport}"), true)
        }
        _ => {
            return Err(format!(
                "address {address:?} is not tcp://host:port or tls://host:port"
            ));
        }
    };
    Ok((url, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> TlsSettings {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn absent_means_plaintext() {
        let s = parse("");
        assert!(s.server().unwrap().is_none());
        assert!(s.client().unwrap().is_none());
        assert!(!s.serves_tls());
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("certificate_path = \"/x\"").validate().unwrap_err();
        assert_eq!(e.0, "tls.key_path");
        let e = parse("key_path = \"/x\"").validate().unwrap_err();
        assert_eq!(e.0, "tls.certificate_path");
        let e = parse("client_ca_path = \"/x\"").validate().unwrap_err();
        assert_eq!(e.0, "tls.client_ca_path");
        let e = parse("ca_path = \"/nonexistent/ca.pem\"")
            .validate()
            .unwrap_err();
        assert_eq!(e.0, "tls.ca_path");
        assert!(e.1.contains("/nonexistent/ca.pem"), "{}", e.1);
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let e = parse(&format!("certificate_path = {junk:?}\nkey_path = {junk:?}"))
            .validate()
            .unwrap_err();
        assert_eq!(e.0, "tls.certificate_path");
        assert!(e.1.contains("not a PEM file"), "{}", e.1);
        let fake = dir.path().join("fake.pem");
        std::fs::write(
            &fake,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = parse(&format!("certificate_path = {fake:?}\nkey_path = {fake:?}"))
            .validate()
            .unwrap_err();
        assert_eq!(e.0, "tls.certificate_path");
    }

    #[test]
    fn node_addresses() {
        assert_eq!(
            node_url("tcp://127.0.0.1:1").unwrap(),
            ("http://127.0.0.1:1".into(), false)
        );
        assert_eq!(
            node_url("tls://n1:2").unwrap(),
            ("https://n1:2".into(), true)
        );
        assert!(node_url("unix:///x").is_err());
        assert!(node_url("tcp://").is_err());
    }
}
