//! rustls for the multiplexed listener and the backchannel dialer, from the same
//! `[tls]` section ([`refvote_auth::TlsSettings`]) tonic's TLS is configured from.
//!
//! Why not tonic's TLS: tonic does the TLS handshake itself, after the connection
//! leaves the listener, but the backchannel magic comes *inside* TLS, so the
//! listener must terminate TLS before it can sniff. The servers therefore give tonic
//! no TLS config and hand it connections that are already decrypted. Both ends offer
//! ALPN `h2`, as gRPC clients require (also for a backchannel connection, which
//! grpc-go's TLS credentials negotiate before the magic).

use std::path::Path;
use std::sync::Arc;

use refvote_auth::TlsSettings;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A bad `[tls]` setting: the key it is about and why (as `TlsSettings` reports).
pub type Invalid = (&'static str, String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, Invalid> {
    std::fs::read(path).map_err(|e| (key, format!("cannot read {}: {e}", path.display())))
}

fn certs(key: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Invalid> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (key, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err((key, "holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn roots(key: &'static str, pem: &[u8]) -> Result<RootCertStore, Invalid> {
    let mut store = RootCertStore::empty();
    for cert in certs(key, pem)? {
        store
            .add(cert)
            .map_err(|e| (key, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

/// The server's TLS from PEM bytes: its chain and key, and when given, the CA that
/// must have signed every client's certificate.
pub fn acceptor_from_pem(
    cert: &[u8],
    key: &[u8],
    client_ca: Option<&[u8]>,
) -> Result<TlsAcceptor, Invalid> {
    let chain = certs("tls.certificate_path", cert)?;
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| ("tls.key_path", format!("not a PEM private key: {e}")))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls.certificate_path", e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("tls.client_ca_path", ca)?),
                provider(),
            )
            .build()
            .map_err(|e| ("tls.client_ca_path", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        (
            "tls.certificate_path",
            format!("the certificate and key do not make a TLS identity: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The listener's TLS from `[tls]`, or `None` for plaintext.
pub fn acceptor(settings: &TlsSettings) -> Result<Option<TlsAcceptor>, Invalid> {
    // Key pairing and the rest are TlsSettings' own checks; run them first so the
    // errors are the same as elsewhere.
    settings.server()?;
    let (Some(cert), Some(key)) = (&settings.certificate_path, &settings.key_path) else {
        return Ok(None);
    };
    let ca = match &settings.client_ca_path {
        Some(p) => Some(read("tls.client_ca_path", p)?),
        None => None,
    };
    acceptor_from_pem(
        &read("tls.certificate_path", cert)?,
        &read("tls.key_path", key)?,
        ca.as_deref(),
    )
    .map(Some)
}

/// A client's TLS from PEM bytes: the CA servers are trusted by and, when given, the
/// certificate and key to present.
pub fn connector_from_pem(
    ca: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<TlsConnector, Invalid> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls.ca_path", e.to_string()))?
        .with_root_certificates(roots("tls.ca_path", ca)?);
    let mut config = match identity {
        Some((cert, key)) => {
            let chain = certs("tls.certificate_path", cert)?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| ("tls.key_path", format!("not a PEM private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ("tls.certificate_path", e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// What calls to `tls://` nodes use, from `[tls]` (`ca_path`, and this process's
/// own certificate when it has one), or `None` when `ca_path` is unset.
pub fn connector(settings: &TlsSettings) -> Result<Option<TlsConnector>, Invalid> {
    settings.client()?;
    let Some(ca) = &settings.ca_path else {
        return Ok(None);
    };
    let ca = read("tls.ca_path", ca)?;
    let identity = match (&settings.certificate_path, &settings.key_path) {
        (Some(c), Some(k)) => Some((read("tls.certificate_path", c)?, read("tls.key_path", k)?)),
        _ => None,
    };
    connector_from_pem(
        &ca,
        identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
    )
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_with_the_key_named() {
        let junk = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = acceptor_from_pem(junk, junk, None).map(|_| ()).unwrap_err();
        assert!(e.0.starts_with("tls."), "{e:?}");
        let e = connector_from_pem(b"nothing", None)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.0, "tls.ca_path");
    }

    #[test]
    fn no_tls_settings_mean_plaintext() {
        let s = TlsSettings::default();
        assert!(acceptor(&s).unwrap().is_none());
        assert!(connector(&s).unwrap().is_none());
    }
}
