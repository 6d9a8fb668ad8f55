//! The ops web's answers: pages, JSON, errors as pages (or JSON under `/api/`), and
//! the gate every handler passes first ([`gate`]): who is asking, or the answer for
//! someone who is not logged in (a redirect to the login page for a page, 401 for the
//! API, 403 for a form posted without a valid session).

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::OpsWeb;
use super::auth::{Missing, Role, Who};
use super::html;

pub fn html_page(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

pub fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => error(
            true,
            None,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Cannot encode",
            &e.to_string(),
        ),
    }
}

/// An error as a page (with the navigation when someone is logged in) or as JSON.
pub fn error(
    api: bool,
    who: Option<&Who>,
    status: StatusCode,
    title: &str,
    message: &str,
) -> Response {
    if api {
        let body = serde_json::json!({ "error": message, "status": status.as_u16() });
        return (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    let viewer = who.map(|w| html::Viewer {
        user: &w.user,
        role: w.role.name(),
        csrf: &w.csrf,
    });
    let body = format!(
        "{}<p><a href=\"/\">Back to the overview</a></p>",
        html::notice("error", message)
    );
    html_page(status, html::page(title, viewer.as_ref(), &body))
}

/// A `303 See Other` to `to` (a local path).
pub fn redirect(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Whether `next` is a path on this site (no scheme, no other host).
pub fn local_path(next: &str) -> bool {
    next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_control())
}

/// Who is asking, or the answer for a request without a valid session. `path` is
/// where a page request goes back to after logging in.
// The refusal is the request's whole answer, made once per request.
#[allow(clippy::result_large_err)]
pub fn gate(
    web: &OpsWeb,
    method: &Method,
    headers: &HeaderMap,
    path: &str,
    api: bool,
) -> Result<Who, Response> {
    let missing = match web.auth.who(headers) {
        Ok(who) => return Ok(who),
        Err(m) => m,
    };
    let why = match missing {
        Missing::None => "log in first",
        Missing::Unknown => {
            "your session is not known to this router (it restarted, or you logged out); log in again"
        }
        Missing::Expired => "your session expired; log in again",
        Missing::BadCredentials => "the credentials match no account",
    };
    if api || missing == Missing::BadCredentials {
        let mut resp = error(true, None, StatusCode::UNAUTHORIZED, "Unauthorized", why);
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"refvote ops\""),
        );
        return Err(resp);
    }
    if method != Method::GET && method != Method::HEAD {
        // A form posted without a valid session does nothing.
        return Err(error(
            false,
            None,
            StatusCode::FORBIDDEN,
            "Not logged in",
            &format!("{why}; nothing was done"),
        ));
    }
    let next = if local_path(path) { path } else { "/" };
    let mut to = format!("/login?next={}", html::url_part(next));
    if missing == Missing::Expired {
        to.push_str("&expired=1");
    }
    Err(redirect(&to))
}

/// The gate for the admin jobs: a session (not a script's header), the admin role and
/// the form's CSRF token.
// The refusal is the request's whole answer, made once per request.
#[allow(clippy::result_large_err)]
pub fn admin_gate(web: &OpsWeb, headers: &HeaderMap, csrf: Option<&str>) -> Result<Who, Response> {
    let who = gate(web, &Method::POST, headers, "/", false)?;
    if who.role != Role::Admin {
        return Err(error(
            false,
            Some(&who),
            StatusCode::FORBIDDEN,
            "Not allowed",
            &format!(
                "{} is a viewer: viewers may look but run no admin jobs; nothing was done",
                who.user
            ),
        ));
    }
    if !super::auth::csrf_ok(&who, csrf) {
        return Err(error(
            false,
            Some(&who),
            StatusCode::FORBIDDEN,
            "Form refused",
            "the form's CSRF token is missing or does not belong to your session \
             (reload the page and try again); nothing was done",
        ));
    }
    Ok(who)
}

/// A gRPC status from the admin service as an HTTP status.
pub fn status_code(code: tonic::Code) -> StatusCode {
    use tonic::Code as C;
    match code {
        C::NotFound => StatusCode::NOT_FOUND,
        C::InvalidArgument => StatusCode::BAD_REQUEST,
        C::FailedPrecondition | C::AlreadyExists => StatusCode::CONFLICT,
        C::Unavailable | C::Aborted | C::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed() {
        assert!(local_path("/repos/default/a.git"));
        assert!(!local_path("//evil.example/"));
        assert!(!local_path("https://evil.example/"));
        assert!(!local_path("/\\evil"));
        assert!(!local_path(""));
    }
}
