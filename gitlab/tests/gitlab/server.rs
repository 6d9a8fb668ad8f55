//! A real HTTP server on loopback (TCP, TLS or a Unix socket) standing in for GitLab's
//! internal API: it records every request whole and answers what the test's responder
//! says. Tests assert on the recorded requests after the calls; the responder can also
//! look at the world when a request arrives (e.g. whether a custom hook ran before).

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

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

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body of {} is not JSON ({e}): {:?}",
                self.path,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Checks the `Gitlab-Shell-Api-Request` header as Rails does — HS256 signature
    /// under `secret`, issuer — plus the claims gitlab-shell sends: `iat` within a few
    /// seconds of now, `exp` one minute later. Written without the crate's JWT code.
    pub fn assert_jwt(&self, secret: &[u8]) {
        let token = self
            .header("Gitlab-Shell-Api-Request")
            .unwrap_or_else(|| panic!("{} carries no Gitlab-Shell-Api-Request", self.path));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "{token}");
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
            .expect("the JWT verifies under the shared secret");
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "HS256");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["iss"], "gitlab-shell");
        let iat = claims["iat"].as_u64().expect("iat");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(iat <= now && now - iat < 10, "iat {iat}, now {now}");
        assert_eq!(claims["exp"].as_u64(), Some(iat + 60));
    }

    /// The HTTP basic credentials, decoded.
    pub fn basic_auth(&self) -> Option<(String, String)> {
        let value = self.header("authorization")?.strip_prefix("Basic ")?;
        let text = String::from_utf8(STANDARD.decode(value).ok()?).ok()?;
        let (u, p) = text.split_once(':')?;
        Some((u.to_owned(), p.to_owned()))
    }
}

/// What the server answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Wait this long before answering (timeouts).
    pub delay: Duration,
    /// A `Retry-After` header to send.
    pub retry_after: Option<String>,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: body.to_string(),
            delay: Duration::ZERO,
            retry_after: None,
        }
    }

    /// Rack::Attack's answer to a throttled request: 429, plain text, `Retry-After`.
    pub fn throttled(retry_after: &str) -> Reply {
        Reply {
            status: 429,
            content_type: "text/plain",
            body: "Retry later\n".into(),
            delay: Duration::ZERO,
            retry_after: Some(retry_after.into()),
        }
    }

    pub fn delayed(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

pub type Responder = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// The server; stops (its accept loop and connections abort) when dropped.
pub struct FakeGitlab {
    /// `http://127.0.0.1:port`, `https://localhost:port` or the socket path.
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeGitlab {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    responder: Responder,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(String::new, |p| p.to_string()),
        headers: parts.headers,
        body,
    };
    let reply = responder(&recorded);
    requests.lock().unwrap().push(recorded);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = Response::builder()
        .status(reply.status)
        .header("content-type", reply.content_type);
    if let Some(after) = &reply.retry_after {
        response = response.header("retry-after", after);
    }
    Ok(response.body(Full::new(Bytes::from(reply.body))).unwrap())
}

fn serve<S>(stream: S, requests: Arc<Mutex<Vec<Recorded>>>, responder: Responder)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc =
            hyper::service::service_fn(move |req| handle(req, requests.clone(), responder.clone()));
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await;
    });
}

impl FakeGitlab {
    fn new(url: String, requests: Arc<Mutex<Vec<Recorded>>>, task: JoinHandle<()>) -> FakeGitlab {
        FakeGitlab {
            url,
            requests,
            task,
        }
    }

    /// Plain HTTP on 127.0.0.1, a free port.
    pub async fn http(responder: Responder) -> FakeGitlab {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serve(stream, recorded.clone(), responder.clone());
            }
        });
        FakeGitlab::new(url, requests, task)
    }

    /// HTTPS on 127.0.0.1 with `cert`/`key` (PEM files); the URL names `localhost`.
    pub async fn https(cert: &Path, key: &Path, responder: Responder) -> FakeGitlab {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://localhost:{}",
            listener.local_addr().unwrap().port()
        );
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, recorded, responder) =
                    (acceptor.clone(), recorded.clone(), responder.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        serve(tls, recorded, responder);
                    }
                });
            }
        });
        FakeGitlab::new(url, requests, task)
    }

    /// HTTP over a Unix socket at `path`; `url` is the socket path.
    pub async fn unix(path: &Path, responder: Responder) -> FakeGitlab {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serve(stream, recorded.clone(), responder.clone());
            }
        });
        FakeGitlab::new(path.display().to_string(), requests, task)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// The only request received; fails the test if there were more or none.
    pub fn single(&self) -> Recorded {
        let mut all = self.requests();
        assert_eq!(
            all.len(),
            1,
            "expected exactly one request, got {:?}",
            all.iter().map(|r| &r.path).collect::<Vec<_>>()
        );
        all.remove(0)
    }
}

/// A responder that answers the same for every request.
pub fn always(reply: Reply) -> Responder {
    Arc::new(move |_| reply.clone())
}
