//! A real HTTP server on loopback standing in for GitLab's internal API
//! (`/api/v4/internal/allowed`, `/pre_receive`, `/post_receive`): it records every
//! request whole and answers what the test's responder says. The responder is async,
//! so it can look at the world while a request is pending — hold `/allowed` while the
//! test kills a node, or call back into the cluster the way Rails does while it checks
//! a push. Tests assert on the recorded requests (path, JWT, body) afterwards.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The shared secret the stand-in and the nodes use.
pub const SECRET: &str = "the-gitlab-shell-secret";

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body of {} is not JSON ({e}): {:?}",
                self.path,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Checks `Gitlab-Shell-Api-Request` as Rails does: an HS256 JWT under the shared
    /// secret, issuer `gitlab-shell`, `iat` about now, `exp` a minute later. Written
    /// here without the code under test.
    pub fn assert_jwt(&self) {
        use hmac::{Hmac, Mac};
        let token = self
            .header("Gitlab-Shell-Api-Request")
            .unwrap_or_else(|| panic!("{} carries no Gitlab-Shell-Api-Request", self.path));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "{token}");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
            .expect("the JWT verifies under the shared secret");
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "HS256");
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["iss"], "gitlab-shell");
        let iat = claims["iat"].as_u64().expect("iat");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(iat <= now && now - iat < 60, "iat {iat}, now {now}");
        assert_eq!(claims["exp"].as_u64(), Some(iat + 60));
    }
}

/// What the server answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    /// `application/json` unless set.
    pub content_type: &'static str,
    /// A `Retry-After` header, if any.
    pub retry_after: Option<String>,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply::text(status, "application/json", body.to_string())
    }

    /// Any body under any content type (an HTML error page, Rack::Attack's text).
    pub fn text(status: u16, content_type: &'static str, body: impl Into<String>) -> Reply {
        Reply {
            status,
            body: body.into(),
            content_type,
            retry_after: None,
        }
    }

    /// The same with `Retry-After: <value>`.
    pub fn retry_after(mut self, value: &str) -> Reply {
        self.retry_after = Some(value.to_owned());
        self
    }
}

pub type Answer = Pin<Box<dyn Future<Output = Reply> + Send>>;
pub type Responder = Arc<dyn Fn(Recorded) -> Answer + Send + Sync>;

/// The post-receive message the default responder answers with.
pub const MESSAGE: &str = "To create a merge request for main, visit:\n  http://gitlab.example/group/project/-/merge_requests/new";

/// GitLab accepting everything: `/allowed` allows, `/pre_receive` counts,
/// `/post_receive` counts down and sends [`MESSAGE`].
pub fn allowing(r: &Recorded) -> Reply {
    match r.path.as_str() {
        "/api/v4/internal/allowed" => Reply::json(200, json!({"status": true})),
        "/api/v4/internal/pre_receive" => {
            Reply::json(200, json!({"reference_counter_increased": true}))
        }
        "/api/v4/internal/post_receive" => Reply::json(
            200,
            json!({
                "reference_counter_decreased": true,
                "messages": [{"message": MESSAGE, "type": "basic"}],
            }),
        ),
        other => Reply::json(404, json!({"message": format!("no route {other}")})),
    }
}

/// A responder from a plain function of the request.
pub fn respond(f: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Responder {
    let f = Arc::new(f);
    Arc::new(move |r| {
        let f = f.clone();
        Box::pin(async move { f(&r) })
    })
}

/// The stand-in; stops when dropped.
pub struct GitlabApi {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    pub secret_file: PathBuf,
    requests: Arc<Mutex<Vec<Recorded>>>,
    responder: Arc<Mutex<Responder>>,
    task: JoinHandle<()>,
}

impl Drop for GitlabApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GitlabApi {
    /// Listens on 127.0.0.1, a free port; writes the shared secret into `dir`.
    pub async fn start(dir: &Path, responder: Responder) -> anyhow::Result<GitlabApi> {
        std::fs::create_dir_all(dir)?;
        let secret_file = dir.join(".gitlab_shell_secret");
        std::fs::write(&secret_file, format!("{SECRET}\n"))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let responder = Arc::new(Mutex::new(responder));
        let (recorded, answers) = (requests.clone(), responder.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (recorded, answers) = (recorded.clone(), answers.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, recorded.clone(), answers.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(GitlabApi {
            url,
            secret_file,
            requests,
            responder,
            task,
        })
    }

    /// Answers with `responder` from now on.
    pub fn set_responder(&self, responder: Responder) {
        *self.responder.lock().unwrap() = responder;
    }

    /// Points a node's `[gitlab]` section at this stand-in (for
    /// [`crate::node::NodeOptions::config`]).
    pub fn configure(&self) -> impl Fn(&mut votingd::Config) + Send + Sync + 'static {
        let (url, secret_file) = (self.url.clone(), self.secret_file.clone());
        move |c| {
            c.gitlab.url = url.clone();
            c.gitlab.secret_file = Some(secret_file.clone());
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// The requests to `/api/v4/internal/<endpoint>`.
    pub fn calls(&self, endpoint: &str) -> Vec<Recorded> {
        let path = format!("/api/v4/internal/{endpoint}");
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Forgets what was recorded so far.
    pub fn clear(&self) {
        self.requests.lock().unwrap().clear();
    }
}

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    responder: Arc<Mutex<Responder>>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body,
    };
    requests.lock().unwrap().push(recorded.clone());
    let answer = {
        let responder = responder.lock().unwrap().clone();
        responder(recorded)
    };
    let reply = answer.await;
    let mut response = hyper::Response::builder()
        .status(reply.status)
        .header("content-type", reply.content_type);
    if let Some(after) = &reply.retry_after {
        response = response.header("retry-after", after.as_str());
    }
    Ok(response.body(Full::new(Bytes::from(reply.body))).unwrap())
}
