//! A throw-away certificate authority for TLS tests, made with the `openssl` CLI:
//! a CA and, per server, a certificate for its loopback IP (and `localhost`), usable
//! for both server and client authentication.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[derive(Debug, Clone)]
pub struct TestCa {
    dir: PathBuf,
    /// The CA certificate (PEM): what clients and servers trust.
    pub cert: PathBuf,
}

fn openssl(args: &[&str], cwd: &Path) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .context("running openssl (is it installed?)")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl TestCa {
    /// A new CA in `dir` (created).
    pub fn new(dir: &Path) -> anyhow::Result<TestCa> {
        std::fs::create_dir_all(dir)?;
        let ca = TestCa {
            dir: dir.to_owned(),
            cert: dir.join("ca.pem"),
        };
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=refvote test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            dir,
        )?;
        Ok(ca)
    }

    /// A certificate and key for `name` at `ip`, signed by this CA: (cert, key).
    pub fn issue(&self, name: &str, ip: IpAddr) -> anyhow::Result<(PathBuf, PathBuf)> {
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=IP:{ip},DNS:localhost\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )?;
        let (key, csr, cert) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
            &self.dir,
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                ext.to_str().context("path")?,
            ],
            &self.dir,
        )?;
        Ok((self.dir.join(cert), self.dir.join(key)))
    }

    /// A client config trusting this CA (no client certificate).
    pub fn client(&self) -> anyhow::Result<ClientTlsConfig> {
        Ok(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(&self.cert)?)),
        )
    }

    /// A client config trusting this CA and presenting a certificate it issued.
    pub fn client_with_identity(&self, name: &str) -> anyhow::Result<ClientTlsConfig> {
        let (cert, key) = self.issue(name, IpAddr::from([127, 0, 0, 1]))?;
        Ok(self.client()?.identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        )))
    }
}
