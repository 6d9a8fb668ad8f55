//! The streams between gRPC and git: a client stream's first message, the rest of it
//! as git's stdin, and git's stdout as a response stream.

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::codegen::BoxStream;

use crate::error::NodeError;
use crate::git::{self, Exit, Run};

/// Reads the first message of a client stream; an empty stream is the client's error.
pub(crate) async fn first_message<M>(stream: &mut tonic::Streaming<M>) -> Result<M, Status> {
    stream.message().await?.ok_or_else(|| {
        NodeError::invalid("empty request stream: the first message must name the repository")
            .into()
    })
}

/// git's stdin from a client stream: the first message's data, then every later one's.
pub(crate) fn stream_input<M, F>(first: Vec<u8>, rest: tonic::Streaming<M>, data: F) -> git::Input
where
    M: Send + 'static,
    F: Fn(M) -> Vec<u8> + Send + 'static,
{
    Box::pin(tokio_stream::once(Ok(first)).chain(rest.map(move |m| m.map(&data))))
}

/// git's stdout as a response stream: `prefix` first (if any), then each chunk through
/// `wrap`, then an error status if git failed. Client disconnects stop git.
pub fn stdout_stream<T, F>(run: Run, prefix: Option<Vec<u8>>, wrap: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: Fn(Vec<u8>) -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(1);
    tokio::spawn(async move {
        let mut run = run;
        if let Some(p) = prefix
            && tx.send(Ok(wrap(p))).await.is_err()
        {
            return;
        }
        loop {
            let chunk = tokio::select! {
                // The client went away: dropping `run` stops git.
                _ = tx.closed() => return,
                c = run.chunk() => c,
            };
            match chunk {
                Some(Ok(data)) => {
                    if tx.send(Ok(wrap(data))).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(NodeError::from(e).into())).await;
                    return;
                }
                None => break,
            }
        }
        let result = run.wait().await.and_then(Exit::check);
        if let Err(e) = result {
            let _ = tx.send(Err(NodeError::from(e).into())).await;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
