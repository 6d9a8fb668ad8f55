//! A small W3C WebDriver client over HTTP, driving Debian's `chromium` through its
//! `chromedriver` (started here on loopback, killed by pid with the [`Driver`]),
//! headless: open a page, find elements by CSS selector, type, click, read the page,
//! take a screenshot. Only what the browser tests use; no browser is downloaded, and
//! [`Driver::start`] says why when the binaries are missing so a test can skip.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use serde_json::{Value, json};

use crate::proc::{Proc, free_port, wait_until};

/// Where Debian puts them (`scripts/setup.sh` installs both).
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running chromedriver.
pub struct Driver {
    base: String,
    http: reqwest::Client,
    _proc: Proc,
}

/// One browser session (its own profile directory under the driver's).
pub struct Browser {
    http: reqwest::Client,
    url: String,
}

/// Why the browser tests cannot run here, if they cannot.
pub fn missing() -> Option<String> {
    for bin in [CHROMIUM, CHROMEDRIVER] {
        if !Path::new(bin).exists() {
            return Some(format!(
                "{bin} is missing (Debian's chromium and chromium-driver; scripts/setup.sh installs them)"
            ));
        }
    }
    None
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let req = http.request(method.clone(), url);
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(b.to_string()),
        None => req,
    };
    let resp = req
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{method} {url}: {text}"))?;
    if !status.is_success() {
        bail!("{method} {url}: {status}: {}", doc["value"]);
    }
    Ok(doc["value"].clone())
}

impl Driver {
    /// Starts chromedriver on a free loopback port, its log in `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Driver> {
        if let Some(why) = missing() {
            bail!(why);
        }
        let port = free_port(Ipv4Addr::LOCALHOST)?;
        let mut cmd = std::process::Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1");
        let proc = Proc::spawn("chromedriver", cmd, dir)?;
        let base = format!("http://127.0.0.1:{port}");
        // reqwest's TLS (unused: plain HTTP on loopback) wants a provider chosen.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()?;
        let status = format!("{base}/status");
        wait_until("chromedriver answers", Duration::from_secs(20), || {
            let (http, status) = (http.clone(), status.clone());
            async move {
                call(&http, reqwest::Method::GET, &status, None)
                    .await
                    .is_ok_and(|v| v["ready"] == true)
            }
        })
        .await?;
        Ok(Driver {
            base,
            http,
            _proc: proc,
        })
    }

    /// A new headless browser with its own profile under `profile`.
    pub async fn browser(&self, profile: PathBuf) -> anyhow::Result<Browser> {
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                // Root needs --no-sandbox; the rest keeps it headless and quiet.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let v = call(
            &self.http,
            reqwest::Method::POST,
            &format!("{}/session", self.base),
            Some(caps),
        )
        .await?;
        let id = v["sessionId"].as_str().context("no sessionId")?;
        Ok(Browser {
            http: self.http.clone(),
            url: format!("{}/session/{id}", self.base),
        })
    }
}

impl Browser {
    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        call(
            &self.http,
            reqwest::Method::POST,
            &format!("{}{path}", self.url),
            Some(body),
        )
        .await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        call(
            &self.http,
            reqwest::Method::GET,
            &format!("{}{path}", self.url),
            None,
        )
        .await
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.post("/url", json!({ "url": url })).await.map(|_| ())
    }

    pub async fn current_url(&self) -> anyhow::Result<String> {
        Ok(self.get("/url").await?.as_str().unwrap_or("").to_owned())
    }

    /// The page's HTML as the browser holds it.
    pub async fn source(&self) -> anyhow::Result<String> {
        Ok(self.get("/source").await?.as_str().unwrap_or("").to_owned())
    }

    /// The elements matching a CSS selector (their references).
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<String>> {
        let v = self
            .post(
                "/elements",
                json!({ "using": "css selector", "value": css }),
            )
            .await?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn find(&self, css: &str) -> anyhow::Result<String> {
        let v = self
            .post("/element", json!({ "using": "css selector", "value": css }))
            .await?;
        Ok(v[ELEMENT]
            .as_str()
            .with_context(|| format!("no element {css}: {v}"))?
            .to_owned())
    }

    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let e = self.find(css).await?;
        self.post(&format!("/element/{e}/value"), json!({ "text": text }))
            .await
            .map(|_| ())
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let e = self.find(css).await?;
        self.post(&format!("/element/{e}/click"), json!({}))
            .await
            .map(|_| ())
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let v = self.get("/screenshot").await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().context("no screenshot")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Ends the session (the browser exits).
    pub async fn close(self) -> anyhow::Result<()> {
        call(&self.http, reqwest::Method::DELETE, &self.url, None)
            .await
            .map(|_| ())
    }
}
