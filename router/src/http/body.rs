//! The request body, read chunk by chunk (gunzipped if need be), and the gRPC request
//! stream made of it: the first message carries the repository, the others data.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt, stream};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use refvote_proto::gitaly::{PostReceivePackRequest, PostUploadPackRequest};
use tokio::sync::{Mutex, watch};
use tonic::Status;
use tonic::codegen::http::StatusCode;

/// Largest gRPC message built from a request body.
pub(super) const MESSAGE: usize = 32 * 1024;

/// One gRPC message frame: no compression, 4-byte big-endian length, the message.
pub(super) fn grpc_frame<M: prost::Message>(m: &M) -> Bytes {
    let len = m.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    m.encode(&mut buf).expect("BytesMut grows");
    buf.freeze()
}

/// The gRPC request stream: `first` (repository, options) carrying the first piece of
/// `head`, then the rest of `head` and of the HTTP body as data messages of at most
/// [`MESSAGE`] bytes. A body that breaks ends the stream with an error, never cleanly,
/// so no node takes a truncated push for a whole one.
pub(super) fn request_stream<M, F>(
    mut first: M,
    head: Bytes,
    body: Arc<Mutex<BodyReader>>,
    data: F,
) -> impl Stream<Item = Result<Bytes, Status>> + Send + 'static
where
    M: prost::Message + Send + 'static,
    F: Fn(Bytes) -> M + Send + Sync + 'static,
    M: WithData,
{
    let mut head_pieces = split(head);
    if !head_pieces.is_empty() {
        first.set_data(head_pieces.remove(0));
    }
    let data = Arc::new(data);
    let first_frame = grpc_frame(&first);
    let d = data.clone();
    let head_frames = stream::iter(head_pieces.into_iter().map(move |p| Ok(grpc_frame(&d(p)))));
    let rest = stream::unfold(body, |body| async move {
        let next = body.lock().await.next().await;
        match next {
            Ok(Some(chunk)) => Some((Ok(chunk), body)),
            Ok(None) => None,
            Err(e) => Some((
                Err(Status::invalid_argument(format!(
                    "reading the HTTP request failed: {e}"
                ))),
                body,
            )),
        }
    })
    .flat_map(move |r: Result<Bytes, Status>| {
        let data = data.clone();
        let frames: Vec<Result<Bytes, Status>> = match r {
            Ok(chunk) => split(chunk)
                .into_iter()
                .map(|p| Ok(grpc_frame(&data(p))))
                .collect(),
            Err(s) => vec![Err(s)],
        };
        stream::iter(frames)
    });
    stream::once(async move { Ok(first_frame) })
        .chain(head_frames)
        .chain(rest)
        // After an error nothing more is read: the call is broken.
        .scan(false, |broken, item| {
            let out = if *broken {
                None
            } else {
                *broken = item.is_err();
                Some(item)
            };
            std::future::ready(out)
        })
}

/// The reason of a 413.
pub(super) fn too_large(max: u64) -> String {
    format!(
        "the request body is larger than {max} bytes (limits.max_request_body_bytes); \
         push in smaller steps or raise the limit"
    )
}

/// Request messages whose first carries data too.
pub(super) trait WithData {
    fn set_data(&mut self, data: Bytes);
}

impl WithData for PostUploadPackRequest {
    fn set_data(&mut self, data: Bytes) {
        self.data = data.to_vec();
    }
}

impl WithData for PostReceivePackRequest {
    fn set_data(&mut self, data: Bytes) {
        self.data = data.to_vec();
    }
}

pub(super) fn split(mut b: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while b.len() > MESSAGE {
        out.push(b.split_to(MESSAGE));
    }
    if !b.is_empty() {
        out.push(b);
    }
    out
}

/// How much of a request body may come and how slowly (`[limits]`).
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyBounds {
    /// Bytes on the wire (before gunzip); more fails the body with 413.
    pub(super) max: Option<u64>,
    /// Longest wait for the next piece; longer fails the body with 408.
    pub(super) idle: Duration,
}

/// The request body, decompressed if it was gzipped, read chunk by chunk.
pub(super) struct BodyReader {
    body: Option<Incoming>,
    gunzip: Option<flate2::write::GzDecoder<Vec<u8>>>,
    bounds: BodyBounds,
    /// Bytes read so far, as sent.
    read: u64,
    /// Why reading failed, for the answer.
    pub(super) error: Option<String>,
    /// The HTTP status of that failure: 400, 408 (idle) or 413 (too large).
    pub(super) status: StatusCode,
    /// Set once reading failed: a call still waiting on the rest of the body is cut off
    /// (a node would otherwise wait for input that never comes).
    pub(super) broken: watch::Sender<bool>,
}

impl BodyReader {
    pub(super) fn new(body: Incoming, gzip: bool, bounds: BodyBounds) -> BodyReader {
        BodyReader {
            body: Some(body),
            gunzip: gzip.then(|| flate2::write::GzDecoder::new(Vec::new())),
            bounds,
            read: 0,
            error: None,
            status: StatusCode::BAD_REQUEST,
            broken: watch::channel(false).0,
        }
    }

    /// The next non-empty chunk, `None` at the end.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>, String> {
        use std::io::Write;
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        loop {
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            let frame = match tokio::time::timeout(self.bounds.idle, body.frame()).await {
                Err(_) => {
                    let e = format!(
                        "the client sent nothing for {} s in the middle of the request body \
                         (limits.idle_timeout_secs)",
                        self.bounds.idle.as_secs()
                    );
                    return Err(self.fail_with(StatusCode::REQUEST_TIMEOUT, e));
                }
                Ok(frame) => frame,
            };
            let frame = match frame {
                None => {
                    self.body = None;
                    let Some(gz) = self.gunzip.take() else {
                        return Ok(None);
                    };
                    let rest = gz
                        .finish()
                        .map_err(|e| self.fail(format!("the gzip request body is invalid: {e}")))?;
                    return Ok((!rest.is_empty()).then(|| Bytes::from(rest)));
                }
                Some(Err(e)) => {
                    return Err(self.fail(format!("the request body broke off: {e}")));
                }
                Some(Ok(frame)) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            self.read += data.len() as u64;
            if let Some(max) = self.bounds.max.filter(|&max| self.read > max) {
                let e = too_large(max);
                return Err(self.fail_with(StatusCode::PAYLOAD_TOO_LARGE, e));
            }
            match self.gunzip.as_mut() {
                None if data.is_empty() => continue,
                None => return Ok(Some(data)),
                Some(gz) => {
                    if let Err(e) = gz.write_all(&data) {
                        return Err(self.fail(format!("the gzip request body is invalid: {e}")));
                    }
                    let out = std::mem::take(gz.get_mut());
                    if !out.is_empty() {
                        return Ok(Some(Bytes::from(out)));
                    }
                }
            }
        }
    }

    fn fail(&mut self, e: String) -> String {
        self.fail_with(StatusCode::BAD_REQUEST, e)
    }

    fn fail_with(&mut self, status: StatusCode, e: String) -> String {
        self.status = status;
        self.body = None;
        self.gunzip = None;
        self.error = Some(e.clone());
        self.broken.send_replace(true);
        e
    }
}
