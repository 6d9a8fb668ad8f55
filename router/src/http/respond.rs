//! HTTP answers: the response type every handler returns, refusals as `text/plain`
//! (git prints them as `remote: …`) with the status a gRPC code maps to, and git's
//! content types.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tonic::codegen::http::{self, HeaderValue, StatusCode, header};
use tonic::{Code, Status};

/// What every HTTP answer here is: a boxed body, so git's streamed answers and the
/// refusals share one type.
pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(super) type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;
pub(super) type Response = http::Response<ResponseBody>;

/// A refusal before or instead of a gRPC answer.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) allow: Option<&'static str>,
    /// Ask for credentials (a 401).
    pub(super) challenge: bool,
    /// Seconds for `Retry-After` (429 and 503).
    pub(super) retry_after: Option<u64>,
}

impl Refusal {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            allow: None,
            challenge: false,
            retry_after: None,
        }
    }
}

/// `Retry-After` on a 503 the router gives for a passing condition (no quorum, no
/// readable replica, etcd unreachable, draining).
pub(super) const UNAVAILABLE_RETRY_AFTER: u64 = 1;

/// The HTTP status for a gRPC code from the router or a node.
pub(super) fn http_status(code: Code) -> StatusCode {
    match code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable | Code::Aborted => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub(super) fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A `text/plain` answer: git prints such a body as `remote: <line>` when it reads the
/// advertisement.
pub(super) fn text(refusal: Refusal) -> Response {
    let mut resp = http::Response::new(full(format!("refvote: {}\n", refusal.message)));
    *resp.status_mut() = refusal.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(allow) = refusal.allow {
        h.insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    if let Some(secs) = refusal.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if refusal.challenge {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"refvote\""),
        );
    }
    resp
}

pub(super) fn refusal_from(status: &Status) -> Refusal {
    // Status messages may span lines; git shows one `remote:` line per line anyway,
    // but one line reads best.
    let message = status.message().replace('\n', " ");
    let http = http_status(status.code());
    let retry_after = match http {
        StatusCode::TOO_MANY_REQUESTS => Some(
            crate::limit::limit_error_of(status)
                .and_then(|d| d.retry_after)
                .map_or(1, |d| d.seconds.max(0) as u64),
        ),
        StatusCode::SERVICE_UNAVAILABLE => Some(UNAVAILABLE_RETRY_AFTER),
        _ => None,
    };
    Refusal {
        retry_after,
        ..Refusal::new(http, message)
    }
}

pub(super) fn git_response(content_type: &'static str, body: ResponseBody) -> Response {
    let mut resp = http::Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_http() {
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[test]
    fn sheds_and_outages_say_when_to_retry() {
        let shed = crate::limit::Limited {
            why: crate::limit::Shed::QueueFull,
            scope: "x".into(),
            retry_after_secs: 7,
        };
        let r = refusal_from(&shed.status());
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.retry_after, Some(7));
        let resp = text(r);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        let r = refusal_from(&Status::unavailable("no quorum"));
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.retry_after, Some(UNAVAILABLE_RETRY_AFTER));
        assert_eq!(refusal_from(&Status::not_found("x")).retry_after, None);
    }
}
