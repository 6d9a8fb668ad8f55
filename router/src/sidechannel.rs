//! Calls that move their data over a sidechannel (`SSHUploadPackWithSidechannel`,
//! `PostUploadPackWithSidechannel`), through the router Praefect's way
//! (`internal/grpc/sidechannel/proxy.go`): toward the node the router is a
//! sidechannel *client*, toward its caller a sidechannel *server*, and bytes are
//! copied between the two with backpressure (refvote-sidechannel's `proxy`).
//!
//! The router keeps one backchannel connection per node ([`Backchannels`]), dialled on
//! first use and again once its session has ended, every call on it signed with the
//! router's own token. Per call: a waiter is registered on the node's connection and
//! its id replaces the caller's in the forwarded metadata; the node opens its
//! sidechannel to the router, the router then opens the caller's, and proxies until
//! the node has sent everything. The node's status answers first; a failed proxy
//! counts only when the node succeeded (INTERNAL, as in Praefect). A node that refuses
//! before it opened its sidechannel (an outdated replica, an unreachable node) may be
//! retried on another replica: nothing reached the caller yet.
//!
//! What it does not do: choose the replica (the accessor path does, as for any read)
//! or look into the bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use refvote_auth::{Secret, Signed};
use refvote_sidechannel::client::TlsClient;
use refvote_sidechannel::mux::Session;
use refvote_sidechannel::server::{OPEN_TIMEOUT, OpenError, open_on, sidechannel_id};
use refvote_sidechannel::tls::TlsConnector;
use refvote_sidechannel::{
    BackchannelClient, ConnInfo, DialOptions, FetchRpc, METADATA_KEY, proxy, status,
};
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::transport::Endpoint;
use tonic::{Extensions, Request, Response, Status};

use crate::codec::BytesCodec;
use crate::forward::Frames;

/// How long dialling a node may take before the read fails over to another replica.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The RPC whose failure codes a sidechannel call gets (Gitaly's differ per RPC).
pub(crate) fn rpc_of(path: &str) -> FetchRpc {
    match path {
        "/gitaly.SSHService/SSHUploadPackWithSidechannel" => FetchRpc::SshUploadPack,
        _ => FetchRpc::PostUploadPack,
    }
}

/// The caller's side of a sidechannel call: its session and the id it waits for.
#[derive(Clone)]
pub(crate) struct Caller {
    session: Session,
    id: i64,
    rpc: FetchRpc,
}

/// The caller's sidechannel, if the call carries `gitaly-sidechannel-id`: `None` for
/// an ordinary call, an error (Gitaly's code for the RPC) when the call cannot have
/// one: no backchannel connection, or an id that is not a number.
pub(crate) fn caller(
    path: &str,
    metadata: &MetadataMap,
    extensions: &Extensions,
) -> Result<Option<Caller>, Status> {
    let mut ids = metadata.get_all(METADATA_KEY).iter().peekable();
    if ids.peek().is_none() {
        return Ok(None);
    }
    let rpc = rpc_of(path);
    let id = sidechannel_id(ids.map(|v| v.as_bytes())).map_err(|e| status::open_failed(rpc, &e))?;
    let session = extensions
        .get::<ConnInfo>()
        .and_then(ConnInfo::backchannel)
        .cloned()
        .ok_or_else(|| status::open_failed(rpc, &OpenError::NotMultiplexed))?;
    Ok(Some(Caller { session, id, rpc }))
}

/// One connection per node address, re-dialled when its session ended.
pub struct Backchannels {
    /// Per address, its own lock: dialling one node never waits for another.
    clients: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<BackchannelClient>>>>>,
    secret: Option<Arc<Secret>>,
    tls: Option<TlsConnector>,
}

impl Backchannels {
    /// `secret` signs every call (`[auth]`); `tls` reaches `tls://` nodes
    /// (`[tls] ca_path`).
    pub fn new(secret: Option<Arc<Secret>>, tls: Option<TlsConnector>) -> Backchannels {
        Backchannels {
            clients: Mutex::default(),
            secret,
            tls,
        }
    }

    /// The live connection to the node registered at `address` (`tcp://` or `tls://`).
    async fn client(&self, address: &str) -> Result<BackchannelClient, String> {
        let slot = self
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(address.to_owned())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.session().is_alive()) {
            return Ok(c.clone());
        }
        let (url, tls) = refvote_auth::tls::node_url(address)?;
        let hostport = url.split_once("://").map(|(_, h)| h).unwrap_or(&url);
        let endpoint = Endpoint::from_shared(format!("http://{hostport}"))
            .map_err(|e| format!("address {address:?}: {e}"))?;
        let tls = match tls {
            false => None,
            true => {
                let connector = self.tls.clone().ok_or_else(|| {
                    format!(
                        "the node at {address} serves TLS; set [tls] ca_path to the CA that signed its certificate"
                    )
                })?;
                let host = hostport
                    .rsplit_once(':')
                    .map(|(h, _)| h)
                    .unwrap_or(hostport)
                    .trim_matches(['[', ']']);
                let server_name = host
                    .to_owned()
                    .try_into()
                    .map_err(|e| format!("address {address:?}: not a TLS server name: {e}"))?;
                Some(TlsClient {
                    connector,
                    server_name,
                })
            }
        };
        let options = DialOptions {
            tls,
            connect_timeout: CONNECT_TIMEOUT,
            ..DialOptions::default()
        };
        let client = refvote_sidechannel::dial(endpoint, options)
            .await
            .map_err(|e| format!("cannot reach node at {address}: {}", status::chain(&e)))?;
        *slot = Some(client.clone());
        Ok(client)
    }
}

/// How a sidechannel call on one replica ended.
pub(crate) enum Outcome {
    /// The node answered and its data reached the caller.
    Answer(Response<Frames>),
    /// The node refused before it opened its sidechannel: nothing reached the caller,
    /// another replica may serve it.
    Refused(Status),
    /// The call failed after the caller's sidechannel was in use: final.
    Failed(Status),
}

/// Forwards one sidechannel call (`first`, already rewritten for the node) to the node
/// at `address` and proxies its sidechannel to `caller`.
pub(crate) async fn forward(
    backchannels: &Backchannels,
    address: &str,
    path: http::uri::PathAndQuery,
    metadata: &MetadataMap,
    caller: &Caller,
    first: Bytes,
) -> Outcome {
    let client = match backchannels.client(address).await {
        Ok(c) => c,
        Err(why) => return Outcome::Refused(Status::unavailable(why)),
    };
    let _in_flight = crate::metrics::SIDECHANNELS_IN_FLIGHT.track();
    let waiter = client.register();
    let mut metadata = metadata.clone();
    // The node must name the router's sidechannel, not the caller's.
    waiter.attach(&mut metadata);
    let request = Request::from_parts(
        metadata,
        Extensions::new(),
        stream::once(async move { first }),
    );
    let channel = Signed::new(client.channel(), backchannels.secret.clone());
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(usize::MAX);
    if let Err(e) = grpc.ready().await {
        return Outcome::Refused(Status::unavailable(format!(
            "cannot reach node at {address}: {e}"
        )));
    }
    let call = async {
        let response = grpc.streaming(request, path, BytesCodec).await?;
        let (metadata, mut frames, extensions) = response.into_parts();
        // A unary answer: one frame and the status.
        let mut answer = Vec::new();
        while let Some(frame) = frames.message().await? {
            answer.push(frame);
        }
        Ok::<_, Status>((metadata, answer, extensions))
    };
    let (answer, side) = waiter
        .serve(call, |up| async move {
            let down = open_on(&caller.session, caller.id, OPEN_TIMEOUT)
                .await
                .map_err(|e| status::open_failed(caller.rpc, &e))?;
            proxy(up, down).await.map_err(|e| status::proxy_failed(&e))
        })
        .await;
    match (answer, side) {
        (Err(status), None) => Outcome::Refused(status),
        (Err(status), Some(_)) => Outcome::Failed(status),
        (Ok(_), Some(Err(status))) => Outcome::Failed(status),
        (Ok((metadata, frames, extensions)), _) => {
            let frames: Frames = Box::pin(stream::iter(frames.into_iter().map(Ok)));
            Outcome::Answer(Response::from_parts(metadata, frames, extensions))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_sidechannel_call_needs_a_backchannel_connection() {
        let path = "/gitaly.SmartHTTPService/PostUploadPackWithSidechannel";
        let plain = MetadataMap::new();
        assert!(caller(path, &plain, &Extensions::new()).unwrap().is_none());
        let mut md = MetadataMap::new();
        md.insert(METADATA_KEY, "7".parse().unwrap());
        let e = caller(path, &md, &Extensions::new()).err().unwrap();
        assert_eq!(e.code(), Code::Internal);
        assert!(e.message().contains("backchannel"), "{e:?}");
        md.insert(METADATA_KEY, "seven".parse().unwrap());
        let e = caller(path, &md, &Extensions::new()).err().unwrap();
        assert!(e.message().contains("seven"), "{e:?}");
        assert_eq!(
            rpc_of("/gitaly.SSHService/SSHUploadPackWithSidechannel"),
            FetchRpc::SshUploadPack
        );
    }
}
