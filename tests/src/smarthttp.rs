//! A test transport for real git clients straight to storage nodes: a tiny HTTP/1.1
//! server that turns git's smart HTTP requests into the node service's
//! SmartHTTPService calls. A push goes to every target with the same bytes (each with
//! the refvote transaction in metadata, if one is set); a fetch or clone goes to the
//! first.
//!
//! Tests that have a router push through the router's own HTTP port
//! (`Router::http_url`). This bridge is for what that cannot do: pushing to nodes with
//! no router in between, inside a transaction the test runs itself (`tests/node.rs`,
//! `tests/node_ssh.rs`), and a git client whose calls reach a router as gRPC
//! (`tests/metrics.rs` counts the router's gRPC calls, which its HTTP port, calling
//! its handler in-process, does not add to).
//!
//! It buffers each request and response (test repositories are small), answers one
//! request per connection, and refuses gzip-encoded request bodies with a clear error
//! (git only gzips fetch requests over 1 KiB).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use refvote_auth::{Secret, Signed};
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::{
    InfoRefsRequest, PostReceivePackRequest, PostUploadPackRequest, Repository,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// gRPC message size the proxy cuts request bodies into.
const MESSAGE: usize = 32 * 1024;

/// Where the proxy sends calls.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port` of a node's gRPC service.
    pub url: String,
    pub storage: String,
    /// Sent as `refvote-transaction` metadata on pushes.
    pub transaction: Option<String>,
}

pub struct GitHttpProxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GitHttpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GitHttpProxy {
    pub async fn start(targets: Vec<Target>) -> anyhow::Result<GitHttpProxy> {
        GitHttpProxy::start_signed(targets, None).await
    }

    /// [`GitHttpProxy::start`], signing every call with `secret` (Gitaly's v2 token).
    pub async fn start_signed(
        targets: Vec<Target>,
        secret: Option<Arc<Secret>>,
    ) -> anyhow::Result<GitHttpProxy> {
        anyhow::ensure!(!targets.is_empty(), "the proxy needs at least one target");
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let targets = targets.clone();
                let secret = secret.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, &targets, &secret).await {
                        eprintln!("test git proxy: {e:#}");
                    }
                });
            }
        });
        Ok(GitHttpProxy { addr, task })
    }

    /// The URL git clones from and pushes to for `relative_path`.
    pub fn url(&self, relative_path: &str) -> String {
        format!("http://{}/{relative_path}", self.addr)
    }
}

struct HttpRequest {
    method: String,
    path: String,
    query: String,
    git_protocol: String,
    body: Vec<u8>,
}

type Secretly = Option<Arc<Secret>>;

/// A SmartHTTP client for `url`, signing its calls when `secret` is set.
async fn client(
    url: &str,
    secret: &Secretly,
) -> anyhow::Result<SmartHttpServiceClient<Signed<Channel>>> {
    let channel = Channel::from_shared(url.to_owned())?.connect().await?;
    Ok(SmartHttpServiceClient::new(Signed::new(
        channel,
        secret.clone(),
    )))
}

async fn serve(conn: TcpStream, targets: &[Target], secret: &Secretly) -> anyhow::Result<()> {
    let mut conn = BufReader::new(conn);
    let req = read_request(&mut conn).await?;
    let (status, content_type, body) = match handle(&req, targets, secret).await {
        Ok((ct, body)) => ("200 OK", ct, body),
        Err(e) => (
            "500 Internal Server Error",
            "text/plain".into(),
            format!("{e:#}\n").into_bytes(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let conn = conn.get_mut();
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&body).await?;
    conn.shutdown().await?;
    Ok(())
}

async fn read_request(conn: &mut BufReader<TcpStream>) -> anyhow::Result<HttpRequest> {
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let method = parts.next().context("empty request")?.to_owned();
    let target = parts.next().context("no request target")?.to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let (mut length, mut chunked, mut git_protocol) = (0usize, false, String::new());
    loop {
        let mut header = String::new();
        conn.read_line(&mut header).await?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').context("malformed header")?;
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse()?,
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "git-protocol" => git_protocol = value.to_owned(),
            "content-encoding" if value != "identity" => {
                bail!("request body is {value}-encoded; the test proxy only takes plain bodies")
            }
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            conn.read_line(&mut size).await?;
            let size = usize::from_str_radix(size.trim(), 16)?;
            let mut chunk = vec![0; size + 2];
            conn.read_exact(&mut chunk).await?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length, 0);
        conn.read_exact(&mut body).await?;
    }
    Ok(HttpRequest {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        git_protocol,
        body,
    })
}

async fn handle(
    req: &HttpRequest,
    targets: &[Target],
    secret: &Secretly,
) -> anyhow::Result<(String, Vec<u8>)> {
    let first = &targets[0];
    if req.method == "GET" && req.path.ends_with("/info/refs") {
        let relative = req
            .path
            .trim_start_matches('/')
            .trim_end_matches("/info/refs");
        let service = req
            .query
            .split('&')
            .find_map(|kv| kv.strip_prefix("service="))
            .context("info/refs without ?service= (dumb HTTP is not supported)")?;
        let request = InfoRefsRequest {
            repository: Some(repository(first, relative)),
            git_config_options: Vec::new(),
            git_protocol: req.git_protocol.clone(),
        };
        let mut client = client(&first.url, secret).await?;
        let mut stream = match service {
            "git-upload-pack" => client.info_refs_upload_pack(request).await?.into_inner(),
            "git-receive-pack" => client.info_refs_receive_pack(request).await?.into_inner(),
            other => bail!("unknown service {other}"),
        };
        let mut body = Vec::new();
        while let Some(m) = stream.message().await? {
            body.extend_from_slice(&m.data);
        }
        return Ok((format!("application/x-{service}-advertisement"), body));
    }
    if req.method == "POST" && req.path.ends_with("/git-upload-pack") {
        let relative = req
            .path
            .trim_start_matches('/')
            .trim_end_matches("/git-upload-pack");
        let mut messages: Vec<PostUploadPackRequest> = chunks(&req.body)
            .map(|data| PostUploadPackRequest {
                data,
                ..Default::default()
            })
            .collect();
        messages[0].repository = Some(repository(first, relative));
        messages[0].git_protocol = req.git_protocol.clone();
        let mut client = client(&first.url, secret).await?;
        let mut stream = client
            .post_upload_pack(tokio_stream::iter(messages))
            .await?
            .into_inner();
        let mut body = Vec::new();
        while let Some(m) = stream.message().await? {
            body.extend_from_slice(&m.data);
        }
        return Ok(("application/x-git-upload-pack-result".into(), body));
    }
    if req.method == "POST" && req.path.ends_with("/git-receive-pack") {
        let relative = req
            .path
            .trim_start_matches('/')
            .trim_end_matches("/git-receive-pack");
        // Every target gets the same bytes, concurrently, as the router tees them.
        let calls = targets
            .iter()
            .map(|t| receive_pack(t, relative, req, secret));
        let results = futures::future::join_all(calls).await;
        let mut bodies = Vec::new();
        for r in results {
            bodies.push(r?);
        }
        return Ok((
            "application/x-git-receive-pack-result".into(),
            bodies.swap_remove(0),
        ));
    }
    bail!("unsupported request {} {}", req.method, req.path)
}

async fn receive_pack(
    t: &Target,
    relative: &str,
    req: &HttpRequest,
    secret: &Secretly,
) -> anyhow::Result<Vec<u8>> {
    let mut messages: Vec<PostReceivePackRequest> = chunks(&req.body)
        .map(|data| PostReceivePackRequest {
            data,
            ..Default::default()
        })
        .collect();
    messages[0].repository = Some(repository(t, relative));
    messages[0].git_protocol = req.git_protocol.clone();
    let mut request = tonic::Request::new(tokio_stream::iter(messages));
    if let Some(tx) = &t.transaction {
        request.metadata_mut().insert(
            refvote_proto::contract::TX_METADATA,
            MetadataValue::try_from(tx.as_str())?,
        );
    }
    let mut client = client(&t.url, secret).await?;
    let mut stream = client.post_receive_pack(request).await?.into_inner();
    let mut body = Vec::new();
    while let Some(m) = stream.message().await? {
        body.extend_from_slice(&m.data);
    }
    Ok(body)
}

fn repository(t: &Target, relative: &str) -> Repository {
    Repository {
        storage_name: t.storage.clone(),
        relative_path: relative.to_owned(),
        ..Default::default()
    }
}

/// The body cut into gRPC-sized messages; at least one (possibly empty).
fn chunks(body: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    let n = body.len().div_ceil(MESSAGE).max(1);
    (0..n).map(move |i| {
        body[(i * MESSAGE).min(body.len())..((i + 1) * MESSAGE).min(body.len())].to_vec()
    })
}
