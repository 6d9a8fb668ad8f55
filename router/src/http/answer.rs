//! The gRPC answer streamed back as the HTTP response body, with backpressure.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;
use tonic::Status;
use tonic::codec::Streaming;

use super::respond::{BoxError, ResponseBody};

/// The HTTP response body from a gRPC answer: waits for the first message (or the
/// status) before anything is sent, so an error before any data is still an HTTP
/// error; later errors cut the body short, which git reports.
pub(super) async fn streamed<M, F>(
    mut answer: Streaming<M>,
    data: F,
    broken: Option<watch::Receiver<bool>>,
) -> Result<ResponseBody, Status>
where
    M: Send + 'static,
    F: Fn(M) -> Vec<u8> + Send + Sync + 'static,
{
    let cut_off = || Status::invalid_argument("the HTTP request body broke off");
    let first = match broken.clone() {
        None => answer.message().await?,
        Some(b) => tokio::select! {
            m = answer.message() => m?,
            _ = body_broke(b) => return Err(cut_off()),
        },
    };
    let head = stream::iter(first.map(|m| Ok::<_, BoxError>(Frame::data(Bytes::from(data(m))))));
    let data = Arc::new(data);
    let rest = stream::unfold(Some(answer), move |answer| {
        let data = data.clone();
        let broken = broken.clone();
        async move {
            let mut answer = answer?;
            let next = match broken {
                None => answer.message().await,
                Some(b) => tokio::select! {
                    m = answer.message() => m,
                    _ = body_broke(b) => Err(cut_off()),
                },
            };
            match next {
                Ok(Some(m)) => Some((Ok(Frame::data(Bytes::from(data(m)))), Some(answer))),
                Ok(None) => None,
                Err(status) => {
                    tracing::info!(code = ?status.code(), message = status.message(), "a git HTTP answer failed midway");
                    // The error cuts the connection. Pending once first, so hyper writes
                    // out what it holds (the head, git's own `ERR …` line): else a
                    // failure right after the first message leaves the client with no
                    // answer at all, and nginx with a 502.
                    tokio::task::yield_now().await;
                    Some((Err(BoxError::from(status)), None))
                }
            }
        }
    });
    Ok(StreamBody::new(head.chain(rest)).boxed_unsync())
}

/// Resolves once the request body broke; never if it does not.
pub(super) async fn body_broke(mut broken: watch::Receiver<bool>) {
    if broken.wait_for(|b| *b).await.is_err() {
        // The reader is gone without breaking: nothing will break any more.
        std::future::pending::<()>().await;
    }
}
