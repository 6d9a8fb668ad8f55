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
}

impl Refusal {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            allow: None,
            challenge: false,
        }
    }
}

/// The HTTP status for a gRPC code from the router or a node.
pub(super) fn http_status(code: Code) -> StatusCode {
    match code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted => {
            StatusCode::SERVICE_UNAVAILABLE
        }
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
    Refusal::new(http_status(status.code()), message)
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
    }
}
