//! How the read RPCs' answers go out, in Gitaly's sizes: a task that feeds a response
//! stream (its error ends the stream; a client that goes away makes sends fail and the
//! work stop), lists of items batched into messages of under 1 MiB (Gitaly's
//! `chunk.Chunker`), and bytes in pieces of 128 KiB (Gitaly's `streamio`).

use std::future::Future;

use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codegen::BoxStream;

use crate::engine::Reader;

/// A list message stays under this many bytes of items (Gitaly's chunker).
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// Bytes per data message (Gitaly's `streamio.WriteBufferSize`).
pub const DATA_CHUNK: usize = 128 * 1024;

/// Where a streaming RPC's task sends its messages.
pub type Tx<T> = mpsc::Sender<Result<T, Status>>;

/// Runs `work` in a task that feeds the returned response stream.
pub fn stream_from<T, F>(work: impl FnOnce(Tx<T>) -> F) -> BoxStream<T>
where
    T: Send + 'static,
    F: Future<Output = Result<(), Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let fut = work(tx.clone());
    tokio::spawn(async move {
        if let Err(status) = fut.await {
            let _ = tx.send(Err(status)).await;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// One message of `messages`, as a stream.
pub fn once<T: Send + 'static>(message: T) -> BoxStream<T> {
    Box::pin(tokio_stream::once(Ok(message)))
}

/// The client went away: stop quietly.
#[derive(Debug)]
pub struct Gone;

/// Items batched into messages: [`Chunker::push`] hands back a full batch to send
/// when the next item would take it to [`MAX_MESSAGE`].
pub struct Chunker<T> {
    items: Vec<T>,
    size: usize,
}

impl<T: Message> Default for Chunker<T> {
    fn default() -> Self {
        Chunker {
            items: Vec::new(),
            size: 0,
        }
    }
}

impl<T: Message> Chunker<T> {
    /// Adds `item`; returns the batch before it if that one is full.
    pub fn push(&mut self, item: T) -> Option<Vec<T>> {
        let len = item.encoded_len();
        let full = if !self.items.is_empty() && self.size + len >= MAX_MESSAGE {
            self.size = 0;
            Some(std::mem::take(&mut self.items))
        } else {
            None
        };
        self.size += len;
        self.items.push(item);
        full
    }

    /// What is left (the last, partial batch), if anything.
    pub fn finish(&mut self) -> Option<Vec<T>> {
        self.size = 0;
        (!self.items.is_empty()).then(|| std::mem::take(&mut self.items))
    }
}

/// Sends items through `tx`, each batch wrapped by `wrap`, under the chunker's sizes.
pub struct Batches<T, M> {
    tx: Tx<M>,
    chunker: Chunker<T>,
    wrap: fn(Vec<T>) -> M,
}

impl<T: Message, M> Batches<T, M> {
    pub fn new(tx: Tx<M>, wrap: fn(Vec<T>) -> M) -> Batches<T, M> {
        Batches {
            tx,
            chunker: Chunker::default(),
            wrap,
        }
    }

    pub async fn push(&mut self, item: T) -> Result<(), Gone> {
        if let Some(batch) = self.chunker.push(item) {
            self.tx
                .send(Ok((self.wrap)(batch)))
                .await
                .map_err(|_| Gone)?;
        }
        Ok(())
    }

    pub async fn finish(mut self) -> Result<(), Gone> {
        if let Some(batch) = self.chunker.finish() {
            self.tx
                .send(Ok((self.wrap)(batch)))
                .await
                .map_err(|_| Gone)?;
        }
        Ok(())
    }
}

/// Sends `data` in [`DATA_CHUNK`] pieces, each wrapped by `wrap`; the first piece goes
/// into `first`, which is sent even if `data` is empty.
pub async fn send_bytes<T>(
    tx: &Tx<T>,
    mut first: Option<T>,
    data: &[u8],
    wrap: impl Fn(Option<T>, Vec<u8>) -> T,
) -> Result<(), Gone> {
    let mut pieces = data.chunks(DATA_CHUNK).peekable();
    if pieces.peek().is_none() {
        if let Some(f) = first.take() {
            tx.send(Ok(wrap(Some(f), Vec::new())))
                .await
                .map_err(|_| Gone)?;
        }
        return Ok(());
    }
    for piece in pieces {
        tx.send(Ok(wrap(first.take(), piece.to_vec())))
            .await
            .map_err(|_| Gone)?;
    }
    Ok(())
}

/// Streams up to `limit` bytes of the object `reader` just opened, in [`DATA_CHUNK`]
/// pieces wrapped by `wrap`; the first piece goes into `first`, which is sent even
/// when there is nothing to read. Returns whether the client is still there.
pub async fn send_object<T>(
    reader: &mut Reader,
    limit: u64,
    tx: &Tx<T>,
    mut first: Option<T>,
    wrap: impl Fn(Option<T>, Vec<u8>) -> T,
) -> Result<bool, Status> {
    let mut left = limit;
    loop {
        let data = if left > 0 {
            reader.read(DATA_CHUNK.min(left as usize)).await?
        } else {
            Vec::new()
        };
        left = left.saturating_sub(data.len() as u64);
        if data.is_empty() && first.is_none() {
            return Ok(true);
        }
        if tx.send(Ok(wrap(first.take(), data))).await.is_err() {
            return Ok(false);
        }
        if left == 0 {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use refvote_proto::gitaly::GitCommit;

    #[test]
    fn batches_stay_under_a_mebibyte() {
        let mut c = Chunker::default();
        let big = GitCommit {
            body: vec![b'x'; 300 * 1024],
            ..Default::default()
        };
        let mut sent = Vec::new();
        for _ in 0..10 {
            if let Some(b) = c.push(big.clone()) {
                sent.push(b.len());
            }
        }
        if let Some(b) = c.finish() {
            sent.push(b.len());
        }
        assert_eq!(sent.iter().sum::<usize>(), 10);
        assert!(sent.iter().all(|n| *n <= 3), "{sent:?}");
        // One item larger than the limit still goes, alone.
        let huge = GitCommit {
            body: vec![b'x'; 2 * MAX_MESSAGE],
            ..Default::default()
        };
        assert!(c.push(huge.clone()).is_none());
        assert_eq!(c.push(huge).map(|b| b.len()), Some(1));
        assert!(Chunker::<GitCommit>::default().finish().is_none());
    }
}
