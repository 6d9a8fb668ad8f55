//! When a started member counts as healthy: one check per kind of member, each a
//! single probe whose error says what is not ready yet. Callers poll it (the local
//! cluster with a blocking loop, the test harness from its async tests).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How to tell a member is healthy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ready {
    /// etcd's `/health` answers `"health":"true"` (it has a leader and a quorum).
    EtcdHealth { addr: String },
    /// votingd answers on its vote socket and holds its etcd lease.
    NodeLease { socket: PathBuf },
    /// Every address accepts TCP connections (the router binds them only once its
    /// registry and etcd client are set up).
    Listening { addrs: Vec<String> },
}

/// One health check; the error says what is not ready.
pub fn check(ready: &Ready) -> Result<(), String> {
    match ready {
        Ready::EtcdHealth { addr } => {
            let body = http_get(addr, "/health").map_err(|e| format!("GET /health: {e}"))?;
            if body.contains("\"health\":\"true\"") {
                Ok(())
            } else {
                Err(format!("GET /health answered {}", body.trim()))
            }
        }
        Ready::NodeLease { socket } => match votingd::client::status(socket) {
            Ok(s) if s.lease.held => Ok(()),
            Ok(_) => Err("votingd answers but holds no etcd lease yet".into()),
            Err(e) => Err(format!("votingd's socket {}: {e:#}", socket.display())),
        },
        Ready::Listening { addrs } => {
            for a in addrs {
                let addr: SocketAddr = a.parse().map_err(|e| format!("{a}: {e}"))?;
                TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    .map_err(|e| format!("{a} does not accept connections: {e}"))?;
            }
            Ok(())
        }
    }
}

/// A minimal HTTP/1.0 GET; returns the body.
fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.take(64 * 1024).read_to_string(&mut resp)?;
    Ok(resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(resp))
}
