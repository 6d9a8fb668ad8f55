//! What every `git receive-pack` the node runs for a client shares: the push's
//! commands reach git in one canonical order ([`refvote_pktline`]), whatever order the
//! client sent them in, and the run joins the push's transaction the same way
//! ([`join`]).
//!
//! Why: in a non-atomic push git runs one ref transaction per command, in arrival
//! order, and blocks at each `prepared` until the replicas agree on that key. Every
//! replica must see the same order, or two replicas could each wait on a key the other
//! has not reached yet.

use std::io;
use std::path::Path;

use refvote_pktline::{self as pktline, Limits, PktError};
use tokio_stream::StreamExt;
use tokio_util::io::StreamReader;
use tonic::Status;
use tonic::codegen::Bytes;
use tonic::metadata::MetadataMap;

use super::error::NodeError;
use super::git::{Command, Input};
use super::tx::{WriteContext, WriteIn};
use crate::state::NodeState;

/// Reads the command section of a receive-pack request from `input` and returns the
/// whole request with that section in canonical order; the rest (push options,
/// packfile) streams on untouched, chunk by chunk. A malformed section is
/// INVALID_ARGUMENT and nothing of it is passed on.
pub(super) async fn canonical_input(input: Input) -> Result<Input, Status> {
    let bytes = input.map(|item| item.map(Bytes::from).map_err(io::Error::other));
    let mut reader = StreamReader::new(bytes);
    let (section, summary) = pktline::read_canonical_section(&mut reader, Limits::default())
        .await
        .map_err(|e| match e {
            // The client's own stream failed (disconnect, bad frame): keep its code.
            PktError::Read(e) => client_status(e),
            e => Status::from(NodeError::invalid(format!(
                "malformed receive-pack request: {e}; send what `git send-pack` sends"
            ))),
        })?;
    tracing::debug!(
        commands = summary.commands,
        reordered = summary.reordered,
        signed = summary.signed,
        "push commands in canonical order"
    );
    let (rest, buffered) = reader.into_inner_with_chunk();
    let head = [Some(section), buffered.map(Vec::from)]
        .into_iter()
        .flatten()
        .filter(|b| !b.is_empty())
        .map(Ok);
    let rest = rest.map(|item| item.map(Vec::from).map_err(client_status));
    Ok(Box::pin(tokio_stream::iter(head).chain(rest)))
}

/// [`canonical_input`] for sessions where git must start first (SSH: receive-pack
/// advertises its refs before the client sends any command): the section is read when
/// git asks for its stdin. A malformed one ends the input with the error, so git reads
/// no command at all and the call fails with INVALID_ARGUMENT.
pub(super) fn canonical_input_lazy(input: Input) -> Input {
    use futures_util::StreamExt as _;
    Box::pin(
        futures_util::stream::once(async move {
            match canonical_input(input).await {
                Ok(stream) => stream,
                Err(status) => Box::pin(tokio_stream::once(Err(status))) as Input,
            }
        })
        .flatten(),
    )
}

/// Makes `cmd`, a `git receive-pack` of the repository at `repo`, this node's part of
/// the push's transaction (from `metadata`): the checksum after it is of `repo`, it
/// holds the repository's shared lock while git runs (maintenance and repair wait),
/// and its exit records the voter done, since this one git run is the node's whole
/// part. Call it once everything that can be refused has been checked: a refusal then
/// costs the other voters nothing.
pub(super) async fn join(
    node: &NodeState,
    metadata: &MetadataMap,
    cmd: Command,
    repo: &Path,
) -> Result<Command, Status> {
    let ctx = WriteContext::from_metadata(&node.tx, metadata).await?;
    ctx.checksum_repository(&node.git, repo);
    let lock = node.locks.shared(repo).await;
    Ok(cmd
        .write_in(&ctx)
        .hold(lock)
        .finish_transaction_on_exit(&ctx))
}

/// Gets back the client's status from an I/O error [`canonical_input`] wrapped it in.
fn client_status(e: io::Error) -> Status {
    match e.into_inner().map(|inner| inner.downcast::<Status>()) {
        Some(Ok(status)) => *status,
        Some(Err(other)) => Status::internal(format!("reading the push request: {other}")),
        None => Status::internal("reading the push request failed"),
    }
}
