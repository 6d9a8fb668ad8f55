//! Logging in and out. The login form is paired with its browser by a random value
//! in a cookie and a hidden field (so no other site can log someone in under an
//! account of its choosing); a good name and token start a session and set its
//! cookie; logging out ends it. A failed login says only that it failed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

use super::OpsWeb;
use super::auth::{LOGIN_COOKIE, SESSION_COOKIE, cookie, random_token};
use super::html::{self, attr};
use super::respond::{error, html_page, local_path, redirect};

/// A form's fields; repeated names keep the first value.
pub fn fields(body: &[u8]) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        out.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    out
}

fn login_form(next: &str, message: Option<(&str, &str)>) -> (String, String) {
    let pairing = random_token();
    let mut body = String::new();
    if let Some((kind, text)) = message {
        body.push_str(&html::notice(kind, text));
    }
    body.push_str(&format!(
        "<form class=\"login\" method=\"post\" action=\"/login\">{}\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <label>Account <input type=\"text\" name=\"user\" autocomplete=\"username\" required></label>\
         <label>Token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required></label>\
         <button type=\"submit\">Log in</button></form>",
        html::csrf_field(&pairing),
        attr(next)
    ));
    (html::page("Log in", None, &body), pairing)
}

fn with_cookie(mut resp: Response, value: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

pub async fn page(State(web): State<Arc<OpsWeb>>, RawQuery(query): RawQuery) -> Response {
    let query = fields(query.unwrap_or_default().as_bytes());
    let next = query
        .get("next")
        .filter(|n| local_path(n))
        .cloned()
        .unwrap_or_else(|| "/".into());
    let message = query
        .contains_key("expired")
        .then_some(("error", "Your session expired; log in again."));
    let (body, pairing) = login_form(&next, message);
    let resp = html_page(StatusCode::OK, body);
    with_cookie(
        resp,
        &web.auth.cookie_header(LOGIN_COOKIE, &pairing, "/login"),
    )
}

pub async fn submit(State(web): State<Arc<OpsWeb>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = fields(&body);
    let paired = match (cookie(&headers, LOGIN_COOKIE), form.get("csrf")) {
        (Some(c), Some(f)) => !c.is_empty() && c == f,
        _ => false,
    };
    if !paired {
        return error(
            false,
            None,
            StatusCode::FORBIDDEN,
            "Log in",
            "the login form is stale or came from another site; open /login again",
        );
    }
    let next = form
        .get("next")
        .filter(|n| local_path(n))
        .cloned()
        .unwrap_or_else(|| "/".into());
    let user = form.get("user").map(String::as_str).unwrap_or("");
    let token = form.get("token").map(String::as_str).unwrap_or("");
    let Some(role) = web.auth.check(user, token) else {
        tracing::info!(target: "refvote_router::ops_web::audit", user = %user, "failed ops web login");
        let (page, pairing) = login_form(&next, Some(("error", "Unknown account or wrong token.")));
        let resp = html_page(StatusCode::UNAUTHORIZED, page);
        return with_cookie(
            resp,
            &web.auth.cookie_header(LOGIN_COOKIE, &pairing, "/login"),
        );
    };
    let Some(id) = web.auth.login(user, role) else {
        return error(
            false,
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            "Log in",
            "too many open sessions on this router; try again later",
        );
    };
    tracing::info!(target: "refvote_router::ops_web::audit", user = %user, role = role.name(), "ops web login");
    let resp = redirect(&next);
    let resp = with_cookie(resp, &web.auth.cookie_header(SESSION_COOKIE, &id, "/"));
    with_cookie(resp, &web.auth.cookie_header(LOGIN_COOKIE, "", "/login"))
}

pub async fn logout(State(web): State<Arc<OpsWeb>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = fields(&body);
    match web.auth.who(&headers) {
        Ok(who) if super::auth::csrf_ok(&who, form.get("csrf").map(String::as_str)) => {
            web.auth.logout(&headers);
            let resp = redirect("/login");
            with_cookie(resp, &web.auth.cookie_header(SESSION_COOKIE, "", "/"))
        }
        Ok(who) => error(
            false,
            Some(&who),
            StatusCode::FORBIDDEN,
            "Log out",
            "the form's CSRF token does not belong to your session; nothing was done",
        ),
        Err(_) => redirect("/login"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_form_escapes_next_and_pairs_itself() {
        let (page, pairing) = login_form("/x\"><b>", None);
        assert!(page.contains(&pairing));
        assert!(!page.contains("<b>"), "{page}");
        assert!(!page.contains("<script"));
        let f = fields(b"user=a%20b&user=c&token=x%2By");
        assert_eq!(f["user"], "a b");
        assert_eq!(f["token"], "x+y");
    }
}
