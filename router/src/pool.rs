//! One lazily connected tonic channel per node address, shared by every call: HTTP/2
//! multiplexes the calls, so the router opens one connection per node, not one per
//! request. Every call on a pool channel is signed with the router's token when auth
//! is configured (replacing the token the client sent the router).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use refvote_auth::{Secret, Signed};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// A channel to one node, signing every call.
pub type NodeChannel = Signed<Channel>;

/// How long connecting to a node may take before the call fails over to another
/// replica; a node that is blackholed must not hold a read for a TCP timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Pool {
    channels: Mutex<HashMap<String, NodeChannel>>,
    /// The shared secret nodes check (`[auth]`); `None`: calls go unsigned.
    secret: Option<Arc<Secret>>,
    /// How `tls://` nodes are reached (`[tls] ca_path`); `None`: they cannot be.
    tls: Option<ClientTlsConfig>,
}

impl Pool {
    pub fn new(secret: Option<Arc<Secret>>, tls: Option<ClientTlsConfig>) -> Pool {
        Pool {
            channels: Mutex::default(),
            secret,
            tls,
        }
    }

    /// The channel for a node registered at `address` (`tcp://host:port` or
    /// `tls://host:port`).
    pub fn channel(&self, address: &str) -> Result<NodeChannel, String> {
        let mut channels = self.channels.lock().expect("pool lock");
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let (url, tls) = refvote_auth::tls::node_url(address)?;
        let mut endpoint =
            Endpoint::from_shared(url).map_err(|e| format!("address {address:?}: {e}"))?;
        if tls {
            let config = self.tls.clone().ok_or_else(|| {
                format!(
                    "the node at {address} serves TLS; set [tls] ca_path to the CA that signed its certificate"
                )
            })?;
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| format!("address {address:?}: TLS: {e}"))?;
        }
        let channel = endpoint
            // Without it every small frame waits for Nagle: ~2 ms instead of ~0.3 ms.
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_lazy();
        let channel = Signed::new(channel, self.secret.clone());
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }
}
