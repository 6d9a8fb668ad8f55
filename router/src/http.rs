//! Plain git over HTTP (git's smart HTTP protocol) on its own port, so `git clone`,
//! `git fetch` and `git push` work against the cluster without GitLab in front.
//!
//! Each request becomes the Gitaly call Workhorse would make —
//! `GET /<path>.git/info/refs?service=git-upload-pack|git-receive-pack` is
//! InfoRefsUploadPack / InfoRefsReceivePack, `POST /<path>.git/git-upload-pack`
//! PostUploadPack, `POST /<path>.git/git-receive-pack` PostReceivePack — on the
//! repository `{storage "default", relative_path "<path>.git"}`, and goes through the
//! router's own gRPC handler ([`Forwarder::handle`]) in-process. Reads, voted writes and
//! repository creation therefore follow exactly the gRPC paths; nothing is routed here.
//!
//! What this module adds is HTTP: statuses (404 unknown repository, 503 no quorum or
//! no replica, 400 bad request, 405 wrong method), `text/plain` error bodies git shows
//! as `remote: …`, gzip request bodies, streaming both ways with backpressure, and for
//! a refused push a report-status git understands (`! [remote rejected] main -> main
//! (reason)`), because git shows nothing of an HTTP error body on a POST. With
//! `create_on_push`, the ref advertisement before a push creates an unknown repository
//! through CreateRepository (placement, registration, voted creation).
//!
//! With `[auth]` set, every request must carry either Gitaly's v2 token
//! (`Authorization: Bearer v2.…`, what GitLab's own components send) or, for plain git
//! clients, HTTP Basic credentials whose password is the shared secret (any user name;
//! git asks for it, or takes it from a credential helper). Anything else gets 401 with
//! `WWW-Authenticate: Basic`, before any gRPC call is made.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt, stream};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use refvote_proto::gitaly::{
    CreateRepositoryRequest, InfoRefsRequest, InfoRefsResponse, PostReceivePackRequest,
    PostReceivePackResponse, PostUploadPackRequest, PostUploadPackResponse, Repository,
};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::codec::{Codec, Streaming};
use tonic::codegen::http::{self, HeaderValue, Method, StatusCode, header};
use tonic::{Code, Status};

use crate::forward::Forwarder;

/// The virtual storage plain git clients address (DESIGN.md §7).
pub const VIRTUAL_STORAGE: &str = "default";
/// Largest gRPC message built from a request body.
const MESSAGE: usize = 32 * 1024;
/// Largest command section of a push read ahead (to name its refs in a refusal).
/// Beyond it the refs are not named; the push itself is unaffected.
const MAX_COMMANDS: usize = 4 * 1024 * 1024;
/// Largest answer to a push kept in memory (the router holds a push's answer until
/// finalize anyway; report-status and progress are small).
const MAX_PUSH_ANSWER: usize = 8 * 1024 * 1024;
/// How long a refused request's remaining body is read before answering, so the client
/// sees the answer rather than a reset while it is still sending.
const DRAIN: Duration = Duration::from_secs(30);
/// How long the advertisement before a push retries while a repository that another
/// client is creating at the same moment comes into being.
const CREATION_SETTLE: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;
type Response = http::Response<ResponseBody>;

/// The running HTTP front.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Binds `addr` and serves git smart HTTP through `forwarder`.
    pub async fn start(
        addr: SocketAddr,
        forwarder: Arc<Forwarder>,
        create_on_push: bool,
        auth: Option<refvote_auth::AuthPolicy>,
    ) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let front = Arc::new(GitHttp {
            forwarder,
            create_on_push,
            auth,
            creating: Default::default(),
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                let (conn, peer) = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "cannot accept an HTTP connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = conn.set_nodelay(true);
                let front = front.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let front = front.clone();
                        async move { Ok::<_, Infallible>(front.serve(req).await) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                        .await
                    {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                });
            }
        });
        tracing::info!(%addr, create_on_push, "serving git smart HTTP");
        Ok(HttpServer {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections; requests in flight finish on their own.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// One request's target, parsed from its method, path and query.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    InfoRefs { relative: String, service: Service },
    UploadPack { relative: String },
    ReceivePack { relative: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    UploadPack,
    ReceivePack,
}

/// A refusal before or instead of a gRPC answer.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
    allow: Option<&'static str>,
    /// Ask for credentials (a 401).
    challenge: bool,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            allow: None,
            challenge: false,
        }
    }
}

/// Parses `/<path>/info/refs?service=…`, `/<path>/git-upload-pack` and
/// `/<path>/git-receive-pack`. A path without `.git` gets it appended, as GitLab does.
fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Route, Refusal> {
    let path = percent_decode(path).ok_or_else(|| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "the URL path is not valid percent-encoded UTF-8",
        )
    })?;
    let not_git = || {
        Refusal::new(
            StatusCode::NOT_FOUND,
            format!(
                "{path} is not a git smart HTTP URL (expected /<repository>.git/info/refs, \
                 /<repository>.git/git-upload-pack or /<repository>.git/git-receive-pack)"
            ),
        )
    };
    let (repo, tail) = ["/info/refs", "/git-upload-pack", "/git-receive-pack"]
        .iter()
        .find_map(|tail| path.strip_suffix(tail).map(|repo| (repo, *tail)))
        .ok_or_else(not_git)?;
    let repo = repo.strip_prefix('/').ok_or_else(not_git)?;
    if repo.is_empty() {
        return Err(not_git());
    }
    let relative = if repo.ends_with(".git") {
        repo.to_owned()
    } else {
        format!("{repo}.git")
    };
    let want = |m: &Method, allow: &'static str| {
        if method == m {
            Ok(())
        } else {
            Err(Refusal {
                status: StatusCode::METHOD_NOT_ALLOWED,
                message: format!("{tail} takes {allow}, not {method}"),
                allow: Some(allow),
                challenge: false,
            })
        }
    };
    match tail {
        "/info/refs" => {
            want(&Method::GET, "GET")?;
            let service = query
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("service="));
            let service = match service {
                Some("git-upload-pack") => Service::UploadPack,
                Some("git-receive-pack") => Service::ReceivePack,
                Some(other) => {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "unknown service {other:?}: use git-upload-pack or git-receive-pack"
                        ),
                    ));
                }
                None => {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "info/refs without ?service=: the dumb HTTP protocol is not served; \
                         use a git client that speaks smart HTTP",
                    ));
                }
            };
            Ok(Route::InfoRefs { relative, service })
        }
        "/git-upload-pack" => {
            want(&Method::POST, "POST")?;
            Ok(Route::UploadPack { relative })
        }
        _ => {
            want(&Method::POST, "POST")?;
            Ok(Route::ReceivePack { relative })
        }
    }
}

/// `%XX` sequences decoded; `None` if one is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The HTTP status for a gRPC code from the router or a node.
fn http_status(code: Code) -> StatusCode {
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

fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A `text/plain` answer: git prints such a body as `remote: <line>` when it reads the
/// advertisement.
fn text(refusal: Refusal) -> Response {
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

fn refusal_from(status: &Status) -> Refusal {
    // Status messages may span lines; git shows one `remote:` line per line anyway,
    // but one line reads best.
    let message = status.message().replace('\n', " ");
    Refusal::new(http_status(status.code()), message)
}

fn git_response(content_type: &'static str, body: ResponseBody) -> Response {
    let mut resp = http::Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// What one request carries into the gRPC call.
struct Request {
    route: Route,
    /// The client's `Git-Protocol` header (`version=2`), passed to git on the node.
    git_protocol: String,
    body: Arc<Mutex<BodyReader>>,
    /// Becomes true when reading the body failed.
    broken: watch::Receiver<bool>,
}

struct GitHttp {
    forwarder: Arc<Forwarder>,
    create_on_push: bool,
    /// The shared secret requests must prove, when `[auth]` is set.
    auth: Option<refvote_auth::AuthPolicy>,
    /// Creations on push in flight, by relative path: concurrent first pushes through
    /// this router wait for the one creating the repository, so none of them reaches a
    /// replica whose creation has not finished yet.
    creating: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl GitHttp {
    async fn serve(self: Arc<Self>, req: http::Request<Incoming>) -> Response {
        let route = match route(req.method(), req.uri().path(), req.uri().query()) {
            Ok(r) => r,
            Err(refusal) => return text(refusal),
        };
        if let Err(refusal) = self.authorize(&req) {
            return text(refusal);
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
        tracing::debug!(?route, %git_protocol, gzip, "git smart HTTP request");
        let reader = BodyReader::new(req.into_body(), gzip);
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
                    reader.error.take()
                })
                .await;
                match drained {
                    Ok(Some(e)) => text(Refusal::new(StatusCode::BAD_REQUEST, e)),
                    _ => text(refusal),
                }
            }
        }
    }

    /// The router's token check, when `[auth]` is set: a Gitaly v2 bearer token, or
    /// Basic credentials whose password is the shared secret; otherwise 401 (in
    /// `transitioning` mode the request passes and the refusal is logged).
    fn authorize(&self, req: &http::Request<Incoming>) -> Result<(), Refusal> {
        let Some(policy) = &self.auth else {
            return Ok(());
        };
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match policy.admit_http(header, std::time::SystemTime::now()) {
            Ok(()) => Ok(()),
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
    async fn call_stream<M>(
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

    async fn info_refs(
        &self,
        relative: &str,
        service: Service,
        git_protocol: &str,
    ) -> Result<Response, Refusal> {
        let request = InfoRefsRequest {
            repository: Some(repository(relative)),
            git_config_options: Vec::new(),
            git_protocol: git_protocol.to_owned(),
        };
        let path = match service {
            Service::UploadPack => "/gitaly.SmartHTTPService/InfoRefsUploadPack",
            Service::ReceivePack => "/gitaly.SmartHTTPService/InfoRefsReceivePack",
        };
        let one = || stream::iter([Ok(grpc_frame(&request))]);
        let mut answer = self
            .call_stream::<InfoRefsResponse>(path, one(), None)
            .await;
        if service == Service::ReceivePack
            && self.create_on_push
            && matches!(&answer, Err(s) if s.code() == Code::NotFound)
        {
            self.create(relative).await?;
            // Another client may be creating it at this moment: its replicas exist only
            // once that creation's write finished.
            let deadline = tokio::time::Instant::now() + CREATION_SETTLE;
            loop {
                answer = self
                    .call_stream::<InfoRefsResponse>(path, one(), None)
                    .await;
                match &answer {
                    Err(s)
                        if s.code() == Code::NotFound && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ => break,
                }
            }
        }
        let answer = answer.map_err(|s| self.explain(&s, service))?;
        let content_type = match service {
            Service::UploadPack => "application/x-git-upload-pack-advertisement",
            Service::ReceivePack => "application/x-git-receive-pack-advertisement",
        };
        let body = streamed(answer, |m: InfoRefsResponse| m.data, None)
            .await
            .map_err(|s| refusal_from(&s))?;
        Ok(git_response(content_type, body))
    }

    /// A refusal that tells a person at a git prompt what to do.
    fn explain(&self, status: &Status, service: Service) -> Refusal {
        let mut refusal = refusal_from(status);
        if status.code() == Code::NotFound && service == Service::ReceivePack {
            if self.create_on_push {
                refusal
                    .message
                    .push_str(" (creating it on this push failed)");
            } else {
                refusal.message.push_str(
                    " (this router does not create repositories on push: create_on_push = false)",
                );
            }
        }
        refusal
    }

    /// CreateRepository through the router: placement, registration and a voted
    /// creation, as for a gRPC client. Someone else's creation winning is fine.
    async fn create(&self, relative: &str) -> Result<(), Refusal> {
        let turn = self
            .creating
            .lock()
            .expect("creations lock")
            .entry(relative.to_owned())
            .or_default()
            .clone();
        let result = {
            let _turn = turn.lock().await;
            self.create_once(relative).await
        };
        let mut creating = self.creating.lock().expect("creations lock");
        // The map holds one reference and `turn` another: nobody else is waiting.
        if Arc::strong_count(&turn) == 2 {
            creating.remove(relative);
        }
        result
    }

    async fn create_once(&self, relative: &str) -> Result<(), Refusal> {
        let request = CreateRepositoryRequest {
            repository: Some(repository(relative)),
            default_branch: Vec::new(),
            object_format: 0,
        };
        let result = async {
            let mut answer = self
                .call_stream::<()>(
                    "/gitaly.RepositoryService/CreateRepository",
                    stream::iter([Ok(grpc_frame(&request))]),
                    None,
                )
                .await?;
            while answer.message().await?.is_some() {}
            Ok::<_, Status>(())
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(relative, "repository created on first push");
                Ok(())
            }
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => {
                let mut refusal = refusal_from(&s);
                refusal.message = format!(
                    "cannot create {VIRTUAL_STORAGE}/{relative} for this push: {}",
                    refusal.message
                );
                Err(refusal)
            }
        }
    }

    async fn upload_pack(&self, relative: &str, request: Request) -> Result<Response, Refusal> {
        let first = PostUploadPackRequest {
            repository: Some(repository(relative)),
            git_protocol: request.git_protocol.clone(),
            ..Default::default()
        };
        let data = |data: Bytes| PostUploadPackRequest {
            data: data.to_vec(),
            ..Default::default()
        };
        let body = request_stream(first, Bytes::new(), request.body.clone(), data);
        let answer = self
            .call_stream::<PostUploadPackResponse>(
                "/gitaly.SmartHTTPService/PostUploadPack",
                body,
                Some(request.broken.clone()),
            )
            .await
            .map_err(|s| refusal_from(&s))?;
        let body = streamed(
            answer,
            |m: PostUploadPackResponse| m.data,
            Some(request.broken.clone()),
        )
        .await
        .map_err(|s| refusal_from(&s))?;
        Ok(git_response("application/x-git-upload-pack-result", body))
    }

    async fn receive_pack(&self, relative: &str, request: Request) -> Result<Response, Refusal> {
        // The command section comes first; reading it ahead names the refs a refusal
        // must answer for, and whether git wants a side-band.
        let head = {
            let mut reader = request.body.lock().await;
            let mut head = BytesMut::new();
            while head.len() < MAX_COMMANDS && commands_end(&head).is_none() {
                match reader.next().await {
                    Ok(Some(chunk)) => head.extend_from_slice(&chunk),
                    Ok(None) => break,
                    Err(e) => return Err(Refusal::new(StatusCode::BAD_REQUEST, e)),
                }
            }
            head.freeze()
        };
        let push = Commands::parse(&head);
        let first = PostReceivePackRequest {
            repository: Some(repository(relative)),
            git_protocol: request.git_protocol.clone(),
            ..Default::default()
        };
        let data = |data: Bytes| PostReceivePackRequest {
            data: data.to_vec(),
            ..Default::default()
        };
        let body = request_stream(first, head, request.body.clone(), data);
        let answer = self
            .call_stream::<PostReceivePackResponse>(
                "/gitaly.SmartHTTPService/PostReceivePack",
                body,
                Some(request.broken.clone()),
            )
            .await;
        // The router answers a push only after finalize, so the whole answer is here
        // at once; collecting it lets a late failure still become a refusal.
        let collected = match answer {
            Ok(mut answer) => {
                let mut out = BytesMut::new();
                loop {
                    match answer.message().await {
                        Ok(Some(m)) if out.len() + m.data.len() <= MAX_PUSH_ANSWER => {
                            out.extend_from_slice(&m.data)
                        }
                        Ok(Some(_)) => {
                            break Err(Status::internal(format!(
                                "the push's answer is over {MAX_PUSH_ANSWER} bytes"
                            )));
                        }
                        Ok(None) => break Ok(out.freeze()),
                        // Some output followed by an error: git's own output says more
                        // than the status, so it goes out as it is.
                        Err(_) if !out.is_empty() => break Ok(out.freeze()),
                        Err(s) => break Err(s),
                    }
                }
            }
            Err(s) => Err(s),
        };
        match collected {
            Ok(out) => Ok(git_response(
                "application/x-git-receive-pack-result",
                full(out),
            )),
            Err(status) => {
                tracing::info!(relative, code = ?status.code(), message = status.message(), "push refused");
                match push.rejection(&status) {
                    // Drain first: the answer goes out once the client has sent it all.
                    Some(report) => {
                        let drained = tokio::time::timeout(DRAIN, async {
                            let mut reader = request.body.lock().await;
                            while let Ok(Some(_)) = reader.next().await {}
                        })
                        .await;
                        if drained.is_err() {
                            tracing::debug!(relative, "the refused push's body kept coming");
                        }
                        Ok(git_response(
                            "application/x-git-receive-pack-result",
                            full(report),
                        ))
                    }
                    None => Err(refusal_from(&status)),
                }
            }
        }
    }
}

fn repository(relative: &str) -> Repository {
    Repository {
        storage_name: VIRTUAL_STORAGE.into(),
        relative_path: relative.into(),
        ..Default::default()
    }
}

/// One gRPC message frame: no compression, 4-byte big-endian length, the message.
fn grpc_frame<M: prost::Message>(m: &M) -> Bytes {
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
fn request_stream<M, F>(
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

/// Request messages whose first carries data too.
trait WithData {
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

fn split(mut b: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while b.len() > MESSAGE {
        out.push(b.split_to(MESSAGE));
    }
    if !b.is_empty() {
        out.push(b);
    }
    out
}

/// The HTTP response body from a gRPC answer: waits for the first message (or the
/// status) before anything is sent, so an error before any data is still an HTTP
/// error; later errors cut the body short, which git reports.
async fn streamed<M, F>(
    mut answer: Streaming<M>,
    data: F,
    broken: Option<watch::Receiver<bool>>,
) -> Result<ResponseBody, Status>
where
    M: Send + 'static,
    F: Fn(M) -> Vec<u8> + Send + Sync + 'static,
{
    let cut_off = || Status::invalid_argument("the HTTP request body broke off");
    let first = match broken.clone() {
        None => answer.message().await?,
        Some(b) => tokio::select! {
            m = answer.message() => m?,
            _ = body_broke(b) => return Err(cut_off()),
        },
    };
    let head = stream::iter(first.map(|m| Ok::<_, BoxError>(Frame::data(Bytes::from(data(m))))));
    let data = Arc::new(data);
    let rest = stream::unfold(Some(answer), move |answer| {
        let data = data.clone();
        let broken = broken.clone();
        async move {
            let mut answer = answer?;
            let next = match broken {
                None => answer.message().await,
                Some(b) => tokio::select! {
                    m = answer.message() => m,
                    _ = body_broke(b) => Err(cut_off()),
                },
            };
            match next {
                Ok(Some(m)) => Some((Ok(Frame::data(Bytes::from(data(m)))), Some(answer))),
                Ok(None) => None,
                Err(status) => {
                    tracing::info!(code = ?status.code(), message = status.message(), "a git HTTP answer failed midway");
                    Some((Err(BoxError::from(status)), None))
                }
            }
        }
    });
    Ok(StreamBody::new(head.chain(rest)).boxed_unsync())
}

/// Resolves once the request body broke; never if it does not.
async fn body_broke(mut broken: watch::Receiver<bool>) {
    if broken.wait_for(|b| *b).await.is_err() {
        // The reader is gone without breaking: nothing will break any more.
        std::future::pending::<()>().await;
    }
}

/// The request body, decompressed if it was gzipped, read chunk by chunk.
struct BodyReader {
    body: Option<Incoming>,
    gunzip: Option<flate2::write::GzDecoder<Vec<u8>>>,
    /// Why reading failed, for the answer.
    error: Option<String>,
    /// Set once reading failed: a call still waiting on the rest of the body is cut off
    /// (a node would otherwise wait for input that never comes).
    broken: watch::Sender<bool>,
}

impl BodyReader {
    fn new(body: Incoming, gzip: bool) -> BodyReader {
        BodyReader {
            body: Some(body),
            gunzip: gzip.then(|| flate2::write::GzDecoder::new(Vec::new())),
            error: None,
            broken: watch::channel(false).0,
        }
    }

    /// The next non-empty chunk, `None` at the end.
    async fn next(&mut self) -> Result<Option<Bytes>, String> {
        use std::io::Write;
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        loop {
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            let frame = match body.frame().await {
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
        self.body = None;
        self.gunzip = None;
        self.error = Some(e.clone());
        self.broken.send_replace(true);
        e
    }
}

/// Where the command section of a push ends (just past its flush packet), if it does
/// within `buf`.
fn commands_end(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let len = pkt_len(buf.get(at..at + 4)?)?;
        if len == 0 {
            return Some(at + 4);
        }
        if len < 4 {
            // A delimiter or response-end packet: not in a push; stop looking.
            return Some(at + 4);
        }
        at += len;
        if at > buf.len() {
            return None;
        }
    }
}

fn pkt_len(hex: &[u8]) -> Option<usize> {
    usize::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// What a push asked for: its refs and the capabilities a refusal must follow.
#[derive(Debug, Default)]
struct Commands {
    refs: Vec<String>,
    report_status: bool,
    side_band: Option<usize>,
}

impl Commands {
    /// Parses the command section at the start of `buf` (as far as it goes).
    fn parse(buf: &[u8]) -> Commands {
        let mut out = Commands::default();
        let mut at = 0;
        let mut first = true;
        while let Some(len) = buf.get(at..at + 4).and_then(pkt_len) {
            if len < 4 || at + len > buf.len() {
                break;
            }
            let line = &buf[at + 4..at + len];
            at += len;
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            let (command, caps) = match line.iter().position(|&b| b == 0) {
                Some(nul) => (&line[..nul], Some(&line[nul + 1..])),
                None => (line, None),
            };
            if first && let Some(caps) = caps {
                for cap in caps.split(|&b| b == b' ') {
                    match cap {
                        b"report-status" | b"report-status-v2" => out.report_status = true,
                        b"side-band-64k" => out.side_band = Some(65520),
                        b"side-band" if out.side_band.is_none() => out.side_band = Some(1000),
                        _ => {}
                    }
                }
            }
            first = false;
            let mut parts = command.splitn(3, |&b| b == b' ');
            if let (Some(old), Some(new), Some(name)) = (parts.next(), parts.next(), parts.next())
                && old.len() == new.len()
                && old.len() >= 40
                && let Ok(name) = std::str::from_utf8(name)
            {
                out.refs.push(name.to_owned());
            }
        }
        out
    }

    /// The answer git shows for a push refused as a whole: the reason on the side-band
    /// (`remote: refvote: …`), then every ref rejected with a short reason
    /// (`! [remote rejected] main -> main (…)`). `None` when the client did not ask for
    /// a report (then it gets a plain HTTP error).
    fn rejection(&self, status: &Status) -> Option<Vec<u8>> {
        if !self.report_status || self.refs.is_empty() {
            return None;
        }
        let message = status.message().replace('\n', " ");
        let short = short_reason(status);
        let mut report = Vec::new();
        pkt(&mut report, b"unpack ok\n");
        for r in &self.refs {
            pkt(&mut report, format!("ng {r} {short}\n").as_bytes());
        }
        report.extend_from_slice(b"0000");
        let Some(max) = self.side_band else {
            return Some(report);
        };
        let mut out = Vec::new();
        let mut progress = vec![2u8];
        progress.extend_from_slice(format!("refvote: {message}\n").as_bytes());
        for piece in progress[1..].chunks(max - 5) {
            let mut p = vec![2u8];
            p.extend_from_slice(piece);
            pkt(&mut out, &p);
        }
        for piece in report.chunks(max - 5) {
            let mut p = vec![1u8];
            p.extend_from_slice(piece);
            pkt(&mut out, &p);
        }
        out.extend_from_slice(b"0000");
        Some(out)
    }
}

/// The reason in a rejected ref's line: short, no newlines.
fn short_reason(status: &Status) -> String {
    let m = status.message();
    if let Some(i) = m.find("not enough replicas are up to date: ") {
        let rest = &m[i + "not enough replicas are up to date: ".len()..];
        return format!("no quorum: {}", rest.lines().next().unwrap_or(rest));
    }
    match status.code() {
        Code::NotFound => "repository not found".into(),
        Code::Unavailable => "cluster unavailable, retry".into(),
        Code::InvalidArgument => "invalid request".into(),
        Code::PermissionDenied | Code::Unauthenticated => "permission denied".into(),
        code => format!("refused ({code:?})"),
    }
}

fn pkt(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(format!("{:04x}", payload.len() + 4).as_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, query: Option<&str>) -> Result<Route, Refusal> {
        route(&Method::GET, path, query)
    }

    #[test]
    fn routes_the_three_smart_http_urls() {
        assert_eq!(
            get("/group/p.git/info/refs", Some("service=git-upload-pack")).unwrap(),
            Route::InfoRefs {
                relative: "group/p.git".into(),
                service: Service::UploadPack
            }
        );
        assert_eq!(
            get("/p/info/refs", Some("x=1&service=git-receive-pack")).unwrap(),
            Route::InfoRefs {
                relative: "p.git".into(),
                service: Service::ReceivePack
            }
        );
        assert_eq!(
            route(&Method::POST, "/a/b%20c.git/git-receive-pack", None).unwrap(),
            Route::ReceivePack {
                relative: "a/b c.git".into()
            }
        );
        assert_eq!(
            route(&Method::POST, "/a.git/git-upload-pack", None).unwrap(),
            Route::UploadPack {
                relative: "a.git".into()
            }
        );
    }

    #[test]
    fn refuses_what_is_not_smart_http() {
        assert_eq!(get("/", None).unwrap_err().status, StatusCode::NOT_FOUND);
        assert_eq!(
            get("/info/refs", Some("service=git-upload-pack"))
                .unwrap_err()
                .status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get("/p.git/info/refs", None).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            get("/p.git/info/refs", Some("service=git-frob"))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let e = get("/p.git/git-receive-pack", None).unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(e.allow, Some("POST"));
        assert_eq!(
            get("/p%zz.git/info/refs", None).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    fn command_section(caps: &str, refs: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            let mut line = format!("{} {} {r}", "0".repeat(40), "1".repeat(40)).into_bytes();
            if i == 0 {
                line.push(0);
                line.extend_from_slice(caps.as_bytes());
            }
            line.push(b'\n');
            pkt(&mut out, &line);
        }
        out.extend_from_slice(b"0000PACK");
        out
    }

    #[test]
    fn reads_a_pushs_refs_and_capabilities() {
        let buf = command_section(
            "report-status-v2 side-band-64k quiet",
            &["refs/heads/main", "refs/tags/v1"],
        );
        let end = commands_end(&buf).unwrap();
        assert_eq!(&buf[end..], b"PACK");
        assert_eq!(commands_end(&buf[..end - 2]), None);
        let c = Commands::parse(&buf);
        assert_eq!(c.refs, ["refs/heads/main", "refs/tags/v1"]);
        assert!(c.report_status);
        assert_eq!(c.side_band, Some(65520));
    }

    #[test]
    fn a_refusal_is_a_report_git_understands() {
        let c = Commands::parse(&command_section("report-status", &["refs/heads/main"]));
        let status = Status::unavailable(
            "cannot write to default/p.git: not enough replicas are up to date: 1 of 3 up, 2 needed",
        );
        let report = c.rejection(&status).unwrap();
        assert_eq!(
            String::from_utf8(report).unwrap(),
            "000eunpack ok\n\
             0036ng refs/heads/main no quorum: 1 of 3 up, 2 needed\n0000"
        );
        let c = Commands::parse(&command_section(
            "report-status side-band-64k",
            &["refs/heads/x"],
        ));
        let report = c.rejection(&status).unwrap();
        assert!(
            report.starts_with(b"0065\x02refvote: cannot write"),
            "{report:?}"
        );
        assert!(report.ends_with(b"0000"));
        let c = Commands::parse(&command_section("side-band-64k", &["refs/heads/x"]));
        assert!(c.rejection(&status).is_none());
    }

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
