//! Scraping a process's Prometheus `/metrics` over plain HTTP/1.1, and reading the
//! samples back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET <path>` on `addr`: the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8(raw)?)
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .context("scrape timed out")??;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    Ok((status, body.to_owned()))
}

/// The samples of a scrape: `name{labels}` (exactly as exposed) → value. Fails on a
/// line that is not a comment or a `series value` pair, or a series without a
/// `# TYPE` line before it.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let (status, body) = get(addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}: {body}");
    let mut samples = BTreeMap::new();
    let mut typed = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.push(rest.split_whitespace().next().unwrap_or("").to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .context(format!("bad line {line:?}"))?;
        let name = series.split('{').next().unwrap_or(series);
        anyhow::ensure!(
            typed.iter().any(|t| name == t
                || name
                    .strip_prefix(t.as_str())
                    .is_some_and(|s| matches!(s, "_bucket" | "_sum" | "_count"))),
            "{name} has no # TYPE line"
        );
        let value = value
            .parse::<f64>()
            .with_context(|| format!("bad value in {line:?}"))?;
        samples.insert(series.to_owned(), value);
    }
    Ok(samples)
}
