//! Proxying one sidechannel into another, as Praefect does
//! (`internal/grpc/sidechannel/proxy.go`): the router is a sidechannel *client*
//! toward the node that serves the call and a sidechannel *server* toward its own
//! caller. The node opens its sidechannel to the router first; the router then opens
//! one to the caller and copies between them.
//!
//! Caller→node: the caller's chunks are decoded and re-chunked (the same bytes, as
//! many chunks as it takes), and its `0000` becomes ours. Node→caller: raw bytes,
//! and the node's end of stream becomes ours. Each direction has a fixed buffer and
//! waits for the other end to take what it has (backpressure end to end). The proxy
//! is done when the node's data has been passed on and ended; a failure on either
//! side resets both sidechannels at once.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::client::ClientSidechannel;
use crate::frame::FramingError;
use crate::server::{ServerSidechannel, framing_error};

/// The copy buffer of each direction (one pkt-line's worth).
const BUFFER: usize = 64 * 1024;

/// Bytes passed each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Caller → node (payload bytes).
    pub to_node: u64,
    /// Node → caller.
    pub to_caller: u64,
}

/// Which side of a proxied sidechannel failed, and how.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("sidechannel proxy: reading from the caller")]
    ReadCaller(#[source] io::Error),
    #[error("sidechannel proxy: writing to the node")]
    WriteNode(#[source] io::Error),
    #[error("sidechannel proxy: reading from the node")]
    ReadNode(#[source] io::Error),
    #[error("sidechannel proxy: writing to the caller")]
    WriteCaller(#[source] io::Error),
}

impl ProxyError {
    /// The caller's bad framing, when that is what failed.
    pub fn caller_framing(&self) -> Option<&FramingError> {
        match self {
            ProxyError::ReadCaller(e) => framing_error(e),
            _ => None,
        }
    }
}

/// Copies until the node has ended its data or a side fails.
pub async fn proxy(
    node: ClientSidechannel,
    caller: ServerSidechannel,
) -> Result<ProxyStats, ProxyError> {
    let (mut node_r, mut node_w) = tokio::io::split(node);
    let (mut caller_r, mut caller_w) = tokio::io::split(caller);
    let outcome = {
        let to_node = async {
            let n = pump(
                &mut caller_r,
                &mut node_w,
                ProxyError::ReadCaller,
                ProxyError::WriteNode,
            )
            .await?;
            node_w.shutdown().await.map_err(ProxyError::WriteNode)?;
            Ok::<_, ProxyError>(n)
        };
        let to_caller = async {
            let n = pump(
                &mut node_r,
                &mut caller_w,
                ProxyError::ReadNode,
                ProxyError::WriteCaller,
            )
            .await?;
            caller_w.shutdown().await.map_err(ProxyError::WriteCaller)?;
            Ok::<_, ProxyError>(n)
        };
        tokio::pin!(to_node, to_caller);
        let mut stats = ProxyStats::default();
        let mut caller_done = false;
        loop {
            tokio::select! {
                r = &mut to_node, if !caller_done => match r {
                    Ok(n) => {
                        stats.to_node = n;
                        caller_done = true;
                    }
                    Err(e) => break Err(e),
                },
                r = &mut to_caller => break r.map(|n| {
                    stats.to_caller = n;
                    stats
                }),
            }
        }
    };
    let node = node_r.unsplit(node_w);
    let caller = caller_r.unsplit(caller_w);
    if outcome.is_err() {
        node.reset();
        caller.reset();
    }
    outcome
}

async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    read_err: fn(io::Error) -> ProxyError,
    write_err: fn(io::Error) -> ProxyError,
) -> Result<u64, ProxyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await.map_err(read_err)?;
        if n == 0 {
            to.flush().await.map_err(write_err)?;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await.map_err(write_err)?;
        total += n as u64;
    }
}
