//! A stand-in for workhorse's git HTTP front, so a real `git clone`/`git fetch` over
//! HTTP runs the calls workhorse makes: `GET …/info/refs?service=git-upload-pack` is
//! `InfoRefsUploadPack`, `POST …/git-upload-pack` is `PostUploadPackWithSidechannel`
//! over a backchannel connection ([`crate::gitlab_client`]), the request body up the
//! sidechannel (gzip-decoded, as workhorse decodes it) and the answer streamed back as
//! it arrives. One request per connection; fetches only.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use refvote_proto::gitaly::PackfileNegotiationStatistics;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::gitlab_client::GitlabClient;

/// What the fetches through the front answered, in order.
#[derive(Debug, Clone)]
pub enum Served {
    Fetch(PackfileNegotiationStatistics),
    Failed(tonic::Code, String),
}

pub struct Workhorse {
    addr: SocketAddr,
    /// Every POST's outcome, for tests to check the statistics and codes.
    pub served: Arc<Mutex<Vec<Served>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Workhorse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Workhorse {
    /// Serves on a loopback port, calling through `client`.
    pub async fn start(client: GitlabClient) -> anyhow::Result<Workhorse> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(Mutex::new(Vec::new()));
        let log = served.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (client, log) = (client.clone(), log.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, &client, &log).await {
                        eprintln!("test workhorse: {e:#}");
                    }
                });
            }
        });
        Ok(Workhorse { addr, served, task })
    }

    /// The URL git fetches `relative` from.
    pub fn url(&self, relative: &str) -> String {
        format!("http://{}/{relative}", self.addr)
    }
}

struct Head {
    method: String,
    path: String,
    query: String,
    git_protocol: String,
    length: Option<usize>,
    chunked: bool,
    gzip: bool,
}

async fn read_head(conn: &mut BufReader<TcpStream>) -> anyhow::Result<Head> {
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let method = parts.next().context("empty request")?.to_owned();
    let target = parts.next().context("no request target")?.to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut head = Head {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        git_protocol: String::new(),
        length: None,
        chunked: false,
        gzip: false,
    };
    loop {
        let mut header = String::new();
        conn.read_line(&mut header).await?;
        let header = header.trim_end();
        if header.is_empty() {
            return Ok(head);
        }
        let (name, value) = header.split_once(':').context("malformed header")?;
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => head.length = Some(value.parse()?),
            "transfer-encoding" => head.chunked = value.eq_ignore_ascii_case("chunked"),
            "git-protocol" => head.git_protocol = value.to_owned(),
            "content-encoding" => match value {
                "gzip" | "x-gzip" => head.gzip = true,
                "identity" => {}
                other => bail!("unsupported content-encoding {other}"),
            },
            _ => {}
        }
    }
}

async fn read_body(conn: &mut BufReader<TcpStream>, head: &Head) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.chunked {
        loop {
            let mut size = String::new();
            conn.read_line(&mut size).await?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .context("chunk size")?;
            let mut chunk = vec![0u8; n + 2];
            conn.read_exact(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = head.length {
        body.resize(n, 0);
        conn.read_exact(&mut body).await?;
    }
    if head.gzip {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(body.as_slice())
            .read_to_end(&mut plain)
            .context("gunzip request body")?;
        body = plain;
    }
    Ok(body)
}

async fn respond(
    conn: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body).await?;
    conn.shutdown().await?;
    Ok(())
}

async fn serve(
    conn: TcpStream,
    client: &GitlabClient,
    log: &Mutex<Vec<Served>>,
) -> anyhow::Result<()> {
    let mut conn = BufReader::new(conn);
    let head = read_head(&mut conn).await?;
    let relative = head.path.trim_start_matches('/');
    if head.method == "GET" {
        let Some(repo) = relative.strip_suffix("/info/refs") else {
            return respond(
                conn.get_mut(),
                "404 Not Found",
                "text/plain",
                b"no such path\n",
            )
            .await;
        };
        if !head.query.contains("service=git-upload-pack") {
            return respond(
                conn.get_mut(),
                "403 Forbidden",
                "text/plain",
                b"fetches only\n",
            )
            .await;
        }
        return match client.info_refs(repo, &head.git_protocol).await {
            Ok(body) => {
                respond(
                    conn.get_mut(),
                    "200 OK",
                    "application/x-git-upload-pack-advertisement",
                    &body,
                )
                .await
            }
            Err(s) => {
                respond(
                    conn.get_mut(),
                    "500 Internal Server Error",
                    "text/plain",
                    format!("{s}\n").as_bytes(),
                )
                .await
            }
        };
    }
    let Some(repo) = relative.strip_suffix("/git-upload-pack") else {
        return respond(
            conn.get_mut(),
            "404 Not Found",
            "text/plain",
            b"no such path\n",
        )
        .await;
    };
    let body = read_body(&mut conn, &head).await?;
    let conn = conn.get_mut();
    // The answer streams as it comes; its end is the connection's.
    conn.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-result\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let outcome = client
        .http_upload_pack(repo, &head.git_protocol, body.as_slice(), &mut *conn)
        .await;
    let served = match &outcome {
        Ok(stats) => Served::Fetch(stats.clone()),
        Err(s) => Served::Failed(s.code(), s.message().to_owned()),
    };
    log.lock().expect("log lock").push(served);
    conn.shutdown().await?;
    outcome.map(|_| ()).map_err(|s| anyhow::anyhow!("{s}"))
}
