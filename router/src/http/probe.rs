//! `GET /-/readiness` and `GET /-/liveness` (GitLab's names; `HEAD` too): 200 `ok`
//! while the router serves, 503 with the reason and `Retry-After` otherwise
//! ([`crate::health`] decides). Neither needs credentials, as a balancer has none.

use tonic::codegen::http::{self, HeaderValue, Method, StatusCode, header};

use super::respond::{Refusal, Response, full, text};
use crate::health::{Health, Verdict};

pub(super) const READINESS: &str = "/-/readiness";
pub(super) const LIVENESS: &str = "/-/liveness";

/// The answer when `path` is a probe; `None` for every other path.
pub(super) fn answer(health: &Health, method: &Method, path: &str) -> Option<Response> {
    if path != READINESS && path != LIVENESS {
        return None;
    }
    if method != Method::GET && method != Method::HEAD {
        return Some(text(Refusal {
            allow: Some("GET, HEAD"),
            ..Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} takes GET or HEAD, not {method}"),
            )
        }));
    }
    Some(match health.verdict() {
        Verdict::Serving => {
            let mut resp = http::Response::new(full("ok\n"));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
        Verdict::NotServing(why) => {
            let mut resp = text(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}"),
            ));
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
    })
}
