//! GitLab's internal API as Gitaly calls it: `POST /api/v4/internal/allowed`,
//! `/pre_receive`, `/post_receive` and `GET /check`, over reqwest with rustls (ring;
//! the system's roots plus `ca_file`/`ca_path`) or a Unix socket. Every request
//! carries the `Gitlab-Shell-Api-Request` JWT, `Content-Type: application/json`,
//! `User-Agent`, the call's correlation id as `X-Request-ID`, and HTTP basic
//! credentials when configured.
//!
//! Answers are read as Gitaly reads them (see [`crate::wire`]); an error keeps what
//! an operator needs (status, GitLab's message, the transport's reason) and can say
//! the text Gitaly would show the pusher ([`ApiError::gitaly_text`]). Nothing here
//! retries: whether a call may be repeated is the caller's decision (`/allowed` may,
//! `/post_receive` must be fenced first).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use serde::Serialize;

pub use crate::call::{ApiError, Call};
use crate::changes::Changes;
use crate::context::{GlId, HookContext, ObjectDirectories};
use crate::jwt::{self, ApiSecret};
use crate::settings::{ApiConfig, Endpoint};
use crate::wire::{self, AllowedAnswer, CheckInfo, PostReceiveAnswer};

/// Everything under this path.
pub const INTERNAL_API: &str = "/api/v4/internal";
/// Largest answer read; GitLab's are a few hundred bytes.
pub const MAX_BODY: usize = 1024 * 1024;

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot load the TLS trust roots for GitLab: {0}")]
    Tls(#[source] rustls::Error),
    #[error("cannot build the HTTP client for GitLab: {0}")]
    Http(#[source] reqwest::Error),
    #[error("the user agent {0:?} is not a header value")]
    UserAgent(String),
}

/// `/allowed`'s body, fields in Gitaly's order, empty ones left out.
#[derive(Serialize)]
struct AllowedBody<'a> {
    action: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    gl_repository: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    project: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    changes: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    protocol: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    relative_path: &'a str,
    env: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    push_options: &'a [String],
}

/// `/post_receive`'s body: Gitaly sends a map, so its keys come sorted, and no push
/// options as `null`.
#[derive(Serialize)]
struct PostReceiveBody<'a> {
    changes: &'a str,
    gl_repository: &'a str,
    identifier: &'a str,
    push_options: Option<&'a [String]>,
}

/// The internal API of one GitLab.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Endpoint base plus [`INTERNAL_API`].
    base: String,
    secret: ApiSecret,
    basic_auth: Option<(String, String)>,
    user_agent: HeaderValue,
    read_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

impl Client {
    /// A client for `config`, announcing itself as `user_agent` (e.g.
    /// `refvote/0.1.0`; Gitaly sends `gitaly/<version>`).
    pub fn new(config: &ApiConfig, user_agent: &str) -> Result<Client, ClientError> {
        let user_agent = HeaderValue::from_str(user_agent)
            .map_err(|_| ClientError::UserAgent(user_agent.to_owned()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
            config.extra_roots.iter().cloned(),
            provider.clone(),
        )
        .map_err(ClientError::Tls)?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ClientError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        // No proxy: Gitaly's transport does not read the proxy environment either.
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .timeout(config.read_timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Endpoint::Unix { socket, .. } = &config.endpoint {
            builder = builder.unix_socket(socket.as_path());
        }
        Ok(Client {
            http: builder.build().map_err(ClientError::Http)?,
            base: format!("{}{INTERNAL_API}", config.endpoint.base()),
            secret: config.secret.clone(),
            basic_auth: config.basic_auth.clone(),
            user_agent,
            read_timeout: config.read_timeout,
        })
    }

    /// The URL a call goes to (over the socket, for `http+unix://`).
    pub fn url(&self, call: Call) -> String {
        format!("{}{}", self.base, call.path())
    }

    /// Sends one request and reads the answer: status, content type, `Retry-After`,
    /// body (at most [`MAX_BODY`]). 4xx and 5xx become [`ApiError::Status`], as
    /// Gitaly's client turns them into errors before the endpoint's own handling; it
    /// is sent once, whatever the answer (see [`crate::wire`] for why).
    async fn send(
        &self,
        call: Call,
        request_id: &str,
        body: Option<Vec<u8>>,
    ) -> Result<wire::Answer, ApiError> {
        let url = self.url(call);
        let mut request = match &body {
            Some(_) => self.http.post(&url),
            None => self.http.get(&url),
        }
        .header(jwt::HEADER, self.secret.token(SystemTime::now()))
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, self.user_agent.clone());
        if !request_id.is_empty() {
            let value = HeaderValue::from_str(request_id).map_err(|_| ApiError::Request {
                call,
                detail: format!("correlation id {request_id:?} is not a header value"),
            })?;
            request = request.header("X-Request-ID", value);
        }
        if let Some((user, password)) = &self.basic_auth {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                ApiError::Timeout {
                    call,
                    after: self.read_timeout,
                }
            } else {
                ApiError::Unreachable {
                    call,
                    detail: error_chain(&e),
                    connect: e.is_connect(),
                }
            }
        };
        let started = std::time::Instant::now();
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| wire::retry_after(v, SystemTime::now()));
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(ApiError::Decode {
                    call,
                    detail: format!("the answer is larger than {MAX_BODY} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        tracing::debug!(
            call = call.path(),
            status,
            duration_ms = started.elapsed().as_millis() as u64,
            correlation_id = request_id,
            "GitLab internal API call"
        );
        let answer = wire::Answer {
            status,
            content_type,
            retry_after,
            body: bytes,
        };
        answer.check_status(call)?;
        Ok(answer)
    }

    /// `/allowed` for the push `changes` of `context` into the repository at
    /// `repo_path` (sent as `project`, as Gitaly does). `Ok` carries GitLab's
    /// verdict; a 4xx is an [`ApiError::Status`] whose [`ApiError::is_refusal`] holds.
    pub async fn allowed(
        &self,
        context: &HookContext,
        repo_path: &Path,
        changes: &Changes,
    ) -> Result<AllowedAnswer, ApiError> {
        let (mut username, mut key_id, mut user_id) = (None, None, None);
        match &context.identity {
            GlId::User(id) => user_id = Some(id.as_str()),
            GlId::Key(id) => key_id = Some(id.as_str()),
            GlId::Username(name) => username = Some(name.as_str()),
        }
        let body = AllowedBody {
            action: "git-receive-pack",
            gl_repository: &context.gl_repository,
            project: repo_path.to_string_lossy().replace('\'', ""),
            changes: changes.as_str(),
            protocol: context.protocol.as_str(),
            relative_path: &context.relative_path,
            env: ObjectDirectories::allowed_env(context.object_directories.as_ref()),
            username,
            key_id,
            user_id,
            push_options: &context.push_options,
        };
        let body = serde_json::to_vec(&body).expect("plain strings serialize");
        self.send(Call::Allowed, &context.request_id, Some(body))
            .await?
            .allowed()
    }

    /// `/pre_receive`: GitLab counts the push in (its reference counter). `Ok(false)`:
    /// the counter was not increased, which Gitaly treats as a refusal.
    pub async fn pre_receive(
        &self,
        request_id: &str,
        gl_repository: &str,
    ) -> Result<bool, ApiError> {
        let body = serde_json::to_vec(&serde_json::json!({ "gl_repository": gl_repository }))
            .expect("plain strings serialize");
        self.send(Call::PreReceive, request_id, Some(body))
            .await?
            .pre_receive()
    }

    /// `/post_receive` for committed `changes`: GitLab runs what follows a push
    /// (pipelines, merge-request refresh, events) and answers the messages to show.
    pub async fn post_receive(
        &self,
        request_id: &str,
        gl_repository: &str,
        identifier: &str,
        changes: &Changes,
        push_options: &[String],
    ) -> Result<PostReceiveAnswer, ApiError> {
        let body = PostReceiveBody {
            changes: changes.as_str(),
            gl_repository,
            identifier,
            push_options: (!push_options.is_empty()).then_some(push_options),
        };
        let body = serde_json::to_vec(&body).expect("plain strings serialize");
        self.send(Call::PostReceive, request_id, Some(body))
            .await?
            .post_receive()
    }

    /// `GET /check`: GitLab is reachable and accepts our secret (for health checks).
    pub async fn check(&self, request_id: &str) -> Result<CheckInfo, ApiError> {
        self.send(Call::Check, request_id, None).await?.check()
    }
}

/// An error and its causes, `: `-separated (reqwest's own text hides the cause).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitaly_texts() {
        let status = |status, message: Option<&str>| ApiError::Status {
            call: Call::Allowed,
            status,
            message: message.map(str::to_owned),
            retry_after: None,
        };
        let e = status(
            401,
            Some("You are not allowed to push code to this project."),
        );
        assert!(e.is_refusal());
        assert_eq!(
            e.gitaly_text(),
            "You are not allowed to push code to this project."
        );
        assert_eq!(
            e.to_string(),
            "GitLab's /allowed answered HTTP 401: You are not allowed to push code to this project."
        );
        assert_eq!(status(502, None).gitaly_text(), "Internal API error (502)");
        assert!(!status(502, None).is_refusal());
        assert_eq!(
            status(403, Some("")).gitaly_text(),
            "Internal API error (403)"
        );
        let t = ApiError::Timeout {
            call: Call::PreReceive,
            after: Duration::from_secs(1),
        };
        assert_eq!(t.gitaly_text(), "Internal API unreachable");
        assert_eq!(
            ApiError::UnexpectedStatus {
                call: Call::Allowed,
                status: 204
            }
            .gitaly_text(),
            "gitlab api is not accessible: 204"
        );
        assert_eq!(
            ApiError::UnexpectedStatus {
                call: Call::PreReceive,
                status: 201
            }
            .gitaly_text(),
            "pre-receive call failed with status: 201"
        );
        assert_eq!(
            ApiError::ContentType {
                call: Call::PostReceive,
                content_type: "text/html".into()
            }
            .gitaly_text(),
            "/post_receive endpoint respond with unsupported content type: text/html"
        );
    }

    #[test]
    fn allowed_body_leaves_out_what_is_empty() {
        let body = AllowedBody {
            action: "git-receive-pack",
            gl_repository: "project-1",
            project: "/srv/a.git".into(),
            changes: "c",
            protocol: "web",
            relative_path: "",
            env: "{}".into(),
            username: None,
            key_id: None,
            user_id: Some("5"),
            push_options: &[],
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"action":"git-receive-pack","gl_repository":"project-1","project":"/srv/a.git","changes":"c","protocol":"web","env":"{}","user_id":"5"}"#
        );
        let none = PostReceiveBody {
            changes: "c",
            gl_repository: "project-1",
            identifier: "user-5",
            push_options: None,
        };
        assert_eq!(
            serde_json::to_string(&none).unwrap(),
            r#"{"changes":"c","gl_repository":"project-1","identifier":"user-5","push_options":null}"#
        );
    }
}
