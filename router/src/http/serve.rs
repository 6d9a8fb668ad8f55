//! One request from start to end: route it, check its credentials, read its body
//! (gzip too), call the matching service, and when that refuses, drain what the client
//! still sends before answering. The services call the router's own gRPC handler
//! in-process ([`GitHttp::call`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use tokio::sync::{Mutex, watch};
use tonic::codec::{Codec, Streaming};
use tonic::codegen::http::{self, HeaderValue, Method, StatusCode, header};
use tonic::{Code, Status};

use super::answer::body_broke;
use super::body::{BodyBounds, BodyReader, too_large};
use super::respond::{Refusal, text};
use super::route::{Route, route};
use super::{GitHttp, Request, Response};
use refvote_auth::git_http::Access;

/// How long a refused request's remaining body is read before answering, so the client
/// sees the answer rather than a reset while it is still sending.
pub(super) const DRAIN: Duration = Duration::from_secs(30);

impl GitHttp {
    pub(super) async fn serve(self: Arc<Self>, req: http::Request<Incoming>) -> Response {
        use tracing::Instrument;
        let id = request_id(req.headers().get("x-request-id"));
        let span = tracing::info_span!("http", request_id = %id);
        let mut resp = self.clone().serve_one(req).instrument(span).await;
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        if self.health.draining() {
            // The balancer's next request opens a connection elsewhere.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    async fn serve_one(self: Arc<Self>, req: http::Request<Incoming>) -> Response {
        if let Some(resp) = super::probe::answer(&self.health, req.method(), req.uri().path()) {
            return resp;
        }
        let route = match route(req.method(), req.uri().path(), req.uri().query()) {
            Ok(r) => r,
            Err(refusal) => return text(refusal),
        };
        match self.authorize(&req) {
            Err(refusal) => return text(refusal),
            Ok(Access::ReadOnly) if route.writes() => {
                tracing::info!(?route, "push with a read-only credential refused");
                return text(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "this credential is read-only ([auth_read_only]): it may clone and fetch, \
                     not push; use the read-write token",
                ));
            }
            Ok(_) => {}
        }
        let git_protocol = req
            .headers()
            .get("git-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let gzip = match req
            .headers()
            .get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
        {
            None => false,
            Some(e) if e.is_empty() || e == "identity" => false,
            Some(e) if e == "gzip" || e == "x-gzip" => true,
            Some(e) => {
                return text(Refusal::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("request bodies encoded as {e:?} are not accepted (only gzip)"),
                ));
            }
        };
        if let Some(want) = route.content_type()
            && req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or("").trim())
                != Some(want)
        {
            return text(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("this POST takes Content-Type: {want}"),
            ));
        }
        // A declared length over the limit is refused before anything is read.
        let max = self.limits.max_body();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let (Some(max), Some(len)) = (max, declared)
            && len > max
        {
            return text(Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, too_large(max)));
        }
        tracing::debug!(?route, %git_protocol, gzip, "git smart HTTP request");
        let bounds = BodyBounds {
            max,
            idle: self.limits.idle_timeout(),
        };
        let reader = BodyReader::new(req.into_body(), gzip, bounds);
        let request = Request {
            route,
            git_protocol,
            broken: reader.broken.subscribe(),
            body: Arc::new(Mutex::new(reader)),
        };
        let body = request.body.clone();
        let result = match request.route.clone() {
            Route::InfoRefs { relative, service } => {
                self.info_refs(&relative, service, &request.git_protocol)
                    .await
            }
            Route::UploadPack { relative } => self.upload_pack(&relative, request).await,
            Route::ReceivePack { relative } => self.receive_pack(&relative, request).await,
        };
        match result {
            Ok(resp) => resp,
            Err(refusal) => {
                // Read what the client is still sending, so it hears this answer instead
                // of a reset; a body that cannot be read is reported as such.
                let drained = tokio::time::timeout(DRAIN, async {
                    let mut reader = body.lock().await;
                    while let Ok(Some(_)) = reader.next().await {}
                    reader.error.take().map(|e| (reader.status, e))
                })
                .await;
                match drained {
                    Ok(Some((status, e))) => text(Refusal::new(status, e)),
                    _ => text(refusal),
                }
            }
        }
    }

    /// The router's token check, when `[auth]` is set: a Gitaly v2 bearer token, or
    /// Basic credentials whose password is the shared secret; otherwise 401 (in
    /// `transitioning` mode the request passes and the refusal is logged).
    fn authorize(&self, req: &http::Request<Incoming>) -> Result<Access, Refusal> {
        let Some(policy) = &self.auth else {
            return Ok(Access::ReadWrite);
        };
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match policy.admit_http(header, std::time::SystemTime::now()) {
            Ok(access) => Ok(access),
            Err(why) => Err(Refusal {
                challenge: true,
                ..Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "authentication required: {why}; use the cluster's token as the password"
                    ),
                )
            }),
        }
    }

    /// Calls `path` on the router's own gRPC handler with `body` as the request stream;
    /// cut off if the HTTP body breaks meanwhile (`broken`).
    async fn call(
        &self,
        path: &'static str,
        body: impl Stream<Item = Result<Bytes, Status>> + Send + 'static,
        broken: Option<watch::Receiver<bool>>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        let frames = body.map(|r| r.map(Frame::data));
        let mut req = http::Request::new(tonic::body::Body::new(StreamBody::new(frames)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = http::Uri::from_static(path);
        *req.version_mut() = http::Version::HTTP_2;
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        let handled = self.forwarder.clone().handle(req);
        let resp = match broken {
            None => handled.await,
            Some(broken) => tokio::select! {
                resp = handled => resp,
                _ = body_broke(broken) => return Err(Status::invalid_argument("the HTTP request body broke off")),
            },
        };
        // A call that failed before any message answers with its status in the headers.
        if let Some(status) = Status::from_header_map(resp.headers())
            && status.code() != Code::Ok
        {
            return Err(status);
        }
        Ok(resp)
    }

    /// `path`'s answer as a stream of messages of type `M`.
    pub(super) async fn call_stream<M>(
        &self,
        path: &'static str,
        body: impl Stream<Item = Result<Bytes, Status>> + Send + 'static,
        broken: Option<watch::Receiver<bool>>,
    ) -> Result<Streaming<M>, Status>
    where
        M: prost::Message + Default + Send + 'static,
    {
        let resp = self.call(path, body, broken).await?;
        let status = resp.status();
        let decoder = tonic_prost::ProstCodec::<(), M>::default().decoder();
        Ok(Streaming::new_response(
            decoder,
            resp.into_body(),
            status,
            None,
            // The nodes bound their own messages; the router passes them on.
            Some(usize::MAX),
        ))
    }
}

/// The request's id: the balancer's `X-Request-Id` when it is a sane token (up to 128
/// visible ASCII characters), else a new one. Echoed in the answer and in every log
/// line of the request.
fn request_id(given: Option<&HeaderValue>) -> String {
    given
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_request_id_is_kept_and_anything_else_replaced() {
        let keep = HeaderValue::from_static("f00d-1234");
        assert_eq!(request_id(Some(&keep)), "f00d-1234");
        let spaced = HeaderValue::from_static("a b");
        assert_ne!(request_id(Some(&spaced)), "a b");
        assert_eq!(request_id(None).len(), 32);
        let long = HeaderValue::from_str(&"x".repeat(200)).unwrap();
        assert_eq!(request_id(Some(&long)).len(), 32);
    }
}
