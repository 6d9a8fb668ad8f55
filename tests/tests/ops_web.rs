//! The router's ops web over real HTTP, against a real cluster (etcd, three votingd
//! nodes, routers as processes): logging in (sessions, cookies, the login form's
//! pairing), the overview, node, repository, repairs and search pages and their JSON
//! (compared with `votingctl --json`), the admin jobs through the buttons' forms
//! (synchronize, verify, remove and add a replica) with who ran them recorded, and
//! what must be refused: no session, a forged or expired one, a viewer's POST, a
//! missing or forged CSRF token, an unknown repository, path traversal, oversized
//! forms. Nothing refused changes anything. Under TLS the cookie is `Secure`; a real
//! browser (Debian's chromium over WebDriver) logs in and sees the overview.

use std::net::SocketAddr;
use std::time::Duration;

use refvote_cluster::RepoId;
use refvote_tests::cluster::{Fixture, VoteCluster};
use refvote_tests::node::bin;
use refvote_tests::proc::{free_port, loopback_ip, wait_until};
use refvote_tests::router::RouterOptions;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, HeaderMap, LOCATION, SET_COOKIE};
use serde_json::Value;

const ADMIN: (&str, &str) = ("alice", "alice-token-0123456789");
const VIEWER: (&str, &str) = ("victor", "victor-token-0123456789");
const REPO: &str = "default/ops/a.git";

/// A router's options serving the ops web on `addr` with both accounts.
fn with_ops_web(addr: SocketAddr, session_ttl_secs: u64) -> RouterOptions {
    RouterOptions::default().config(move |c| {
        c.admin_listen_addr = addr.to_string();
        c.ops_web.admins.insert(ADMIN.0.into(), ADMIN.1.into());
        c.ops_web.viewers.insert(VIEWER.0.into(), VIEWER.1.into());
        c.ops_web.session_ttl_secs = session_ttl_secs;
    })
}

fn ops_addr() -> anyhow::Result<SocketAddr> {
    let ip = loopback_ip();
    Ok(SocketAddr::from((ip, free_port(ip)?)))
}

/// One browser: its cookie jar is the session cookie, kept by hand so the test sees
/// every `Set-Cookie`.
struct Browser {
    base: String,
    http: reqwest::Client,
    session: Option<String>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn location(&self) -> &str {
        self.headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn cookies(&self) -> Vec<String> {
        self.headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    }
    fn cookie(&self, name: &str) -> Option<String> {
        self.cookies()
            .into_iter()
            .find(|c| c.starts_with(&format!("{name}=")))
    }
}

/// The value of the first `name="csrf" value="…"` in a page.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no CSRF field in {page}"));
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

fn encode(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let v: String = v
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_' {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl Browser {
    fn new(addr: SocketAddr) -> Browser {
        // reqwest's TLS (unused here: plain HTTP) wants a provider chosen.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Browser {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            session: None,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, cookie: Option<String>) -> Answer {
        let req = match cookie {
            Some(c) => req.header(COOKIE, c),
            None => req,
        };
        let resp = req.send().await.expect("the ops web answers");
        let (status, headers) = (resp.status(), resp.headers().clone());
        let body = resp.text().await.unwrap_or_default();
        Answer {
            status,
            headers,
            body,
        }
    }

    fn session_cookie(&self) -> Option<String> {
        self.session.as_ref().map(|s| format!("refvote_ops={s}"))
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(
            self.http.get(format!("{}{path}", self.base)),
            self.session_cookie(),
        )
        .await
    }

    async fn post(&self, path: &str, body: String) -> Answer {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body),
            self.session_cookie(),
        )
        .await
    }

    /// Logs in through the form; the session cookie is kept.
    async fn log_in(&mut self, (user, token): (&str, &str)) -> Answer {
        let form = self.get("/login").await;
        assert_eq!(form.status, StatusCode::OK, "{}", form.body);
        let pairing = form.cookie("refvote_ops_login").expect("a pairing cookie");
        let pairing = pairing.split(';').next().unwrap().to_owned();
        let body = encode(&[
            ("csrf", &csrf_of(&form.body)),
            ("user", user),
            ("token", token),
            ("next", "/"),
        ]);
        let resp = self
            .send(
                self.http
                    .post(format!("{}/login", self.base))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body),
                Some(pairing),
            )
            .await;
        if let Some(c) = resp.cookie("refvote_ops") {
            let value = c
                .split(';')
                .next()
                .unwrap()
                .trim_start_matches("refvote_ops=");
            self.session = Some(value.to_owned());
        }
        resp
    }

    /// The CSRF token of this session (from any page's logout form).
    async fn csrf(&self) -> String {
        csrf_of(&self.get("/").await.body)
    }

    async fn action(&self, action: &str, fields: &[(&str, &str)]) -> Answer {
        self.post(&format!("/actions/{action}"), encode(fields))
            .await
    }
}

async fn votingctl_json(args: &[&str]) -> anyhow::Result<Value> {
    let out = tokio::process::Command::new(bin("votingctl"))
        .args(args)
        .kill_on_drop(true)
        .output()
        .await?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "votingctl {args:?}: not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    k.sort();
    k
}

/// The repository's replicas (node, up to date) as the API lists them.
async fn replicas(b: &Browser) -> Vec<(String, bool)> {
    let d = b.get("/api/repos/default/ops/a.git").await.json();
    d["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap().to_owned(),
                r["up_to_date"] == true,
            )
        })
        .collect()
}

async fn cluster(ttl: u64) -> anyhow::Result<(VoteCluster, SocketAddr)> {
    let addr = ops_addr()?;
    let c = Fixture::nodes(3)
        .seeded("ops/a.git")
        .router_with(with_ops_web(addr, ttl))
        .start()
        .await?;
    Ok((c, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_pages_and_their_json_match_votingctl() -> anyhow::Result<()> {
    let (c, addr) = cluster(3600).await?;
    let mut b = Browser::new(addr);

    // No session: pages redirect to the login page, the API answers 401.
    let r = b.get("/").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/login?next=%2F");
    assert_eq!(
        b.get("/api/overview").await.status,
        StatusCode::UNAUTHORIZED
    );

    // The login page: no script, a policy that allows none, a pairing cookie.
    let form = b.get("/login").await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(!form.body.contains("<script"), "{}", form.body);
    let csp = form.headers["content-security-policy"].to_str()?;
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    assert_eq!(form.headers["x-frame-options"], "DENY");
    let pairing = form.cookie("refvote_ops_login").unwrap();
    assert!(
        pairing.contains("HttpOnly") && pairing.contains("SameSite=Strict"),
        "{pairing}"
    );

    // A login posted without the pairing cookie (from another site) is refused.
    let r = b
        .post(
            "/login",
            encode(&[
                ("csrf", &csrf_of(&form.body)),
                ("user", ADMIN.0),
                ("token", ADMIN.1),
            ]),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.cookie("refvote_ops").is_none());
    // A wrong token: 401, no session.
    let r = b.log_in((ADMIN.0, "wrong-token-0123456789")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert!(b.session.is_none());
    assert!(
        r.body.contains("Unknown account or wrong token"),
        "{}",
        r.body
    );

    // The right one: a strict, HttpOnly session cookie (no Secure without TLS).
    let r = b.log_in(ADMIN).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.location(), "/");
    let cookie = r.cookie("refvote_ops").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "{cookie}");

    // The overview: three live nodes, one router, the seeded repository up to date.
    let page = b.get("/").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    for n in ["node1", "node2", "node3", "router1", "alice (admin)"] {
        assert!(page.body.contains(n), "{n} missing from {}", page.body);
    }
    assert!(!page.body.contains("<script"));
    let o = b.get("/api/overview").await.json();
    assert_eq!(o["nodes"].as_array().unwrap().len(), 3, "{o}");
    assert!(
        o["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["ttl_secs"].as_i64() > Some(0)),
        "{o}"
    );
    assert_eq!(o["repositories"], 1, "{o}");
    assert_eq!(o["by_state"]["up_to_date"], 1, "{o}");
    assert_eq!(o["by_state"]["degraded"], 0, "{o}");
    assert_eq!(o["etcd_members"][0]["leader"], true, "{o}");
    assert_eq!(o["routers"][0]["name"], "router1", "{o}");
    assert!(o["open_transactions"].as_i64().is_some(), "{o}");

    // The same fields as `votingctl status --json`'s cluster view.
    let config = c.node("node1").config.display().to_string();
    let status = votingctl_json(&["status", "--json", "--config", &config]).await?;
    let view = &status["cluster_view"];
    for field in [
        "etcd_members",
        "nodes",
        "routers",
        "repositories",
        "degraded",
        "repair_jobs",
    ] {
        assert!(
            o.get(field).is_some() && view.get(field).is_some(),
            "{field}: {o} / {view}"
        );
    }
    assert_eq!(keys(&o["nodes"][0]), keys(&view["nodes"][0]));
    assert_eq!(keys(&o["etcd_members"][0]), keys(&view["etcd_members"][0]));
    assert_eq!(o["repositories"], view["repositories"]);
    let names = |v: &Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].clone())
            .collect()
    };
    assert_eq!(names(&o["nodes"]), names(&view["nodes"]));

    // The repository page and its JSON, as `votingctl replicas get --json`.
    let page = b.get("/repos/default/ops/a.git").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("/actions/synchronize"), "{}", page.body);
    let api = b.get("/api/repos/default/ops/a.git").await.json();
    let etcd = c.etcd.endpoints().join(",");
    let ctl = votingctl_json(&["replicas", "get", REPO, "--json", "--etcd", &etcd]).await?;
    assert_eq!(keys(&api), keys(&ctl), "{api} / {ctl}");
    assert_eq!(keys(&api["replicas"][0]), keys(&ctl["replicas"][0]));
    assert_eq!(api["generation"], ctl["generation"]);
    assert_eq!(api["replicas"].as_array().unwrap().len(), 3);

    // The node page and the repairs page.
    let n = b.get("/api/nodes/node2").await.json();
    assert_eq!(n["live"], true, "{n}");
    assert_eq!(n["replicas_total"], 1, "{n}");
    assert_eq!(n["replicas"][0]["repo"], REPO, "{n}");
    assert_eq!(b.get("/nodes/node2").await.status, StatusCode::OK);
    let r = b.get("/api/repairs").await.json();
    assert_eq!(r["repair_jobs"], 0, "{r}");
    assert_eq!(r["dataloss"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(b.get("/repairs").await.status, StatusCode::OK);

    // Search by prefix, paged: 60 more repositories registered (records only).
    let nodes = c.node_names();
    for i in 0..60 {
        let repo = RepoId::new("default", &format!("ops/many/r{i:02}.git"))?;
        c.store.create_repository(&repo, &nodes, "").await?;
    }
    wait_until(
        "the router's view sees the new repositories",
        Duration::from_secs(10),
        || async { b.get("/api/overview").await.json()["repositories"] == 61 },
    )
    .await?;
    let first = b.get("/api/search?prefix=ops%2Fmany%2F").await.json();
    assert_eq!(
        first["repositories"].as_array().unwrap().len(),
        50,
        "{first}"
    );
    assert_eq!(first["next"], "default/ops/many/r49.git", "{first}");
    let second = b
        .get("/api/search?prefix=ops%2Fmany%2F&after=default%2Fops%2Fmany%2Fr49.git")
        .await
        .json();
    assert_eq!(
        second["repositories"].as_array().unwrap().len(),
        10,
        "{second}"
    );
    assert_eq!(
        second["repositories"][0]["repo"],
        "default/ops/many/r50.git"
    );
    assert_eq!(second["next"], "", "{second}");
    let none = b.get("/api/search?prefix=zzz").await.json();
    assert_eq!(none["repositories"].as_array().unwrap().len(), 0, "{none}");
    let page = b.get("/search?prefix=ops%2Fa").await;
    assert!(page.body.contains("default/ops/a.git"), "{}", page.body);
    assert!(!page.body.contains("ops/many"), "{}", page.body);

    // Scripts: a bearer token reads the API; a wrong one is 401.
    let r = b
        .send(
            b.http
                .get(format!("{}/api/overview", b.base))
                .bearer_auth(VIEWER.1),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = b
        .send(
            b.http
                .get(format!("{}/api/overview", b.base))
                .bearer_auth("not-a-token-0123456789"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Logging out ends the session.
    let csrf = b.csrf().await;
    let r = b.post("/logout", encode(&[("csrf", &csrf)])).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(b.get("/").await.status, StatusCode::SEE_OTHER);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_jobs_run_from_the_forms_and_everything_else_is_refused() -> anyhow::Result<()> {
    let (c, addr) = cluster(3600).await?;
    let mut admin = Browser::new(addr);
    assert_eq!(admin.log_in(ADMIN).await.status, StatusCode::SEE_OTHER);
    let csrf = admin.csrf().await;
    let all_three = vec![
        ("node1".to_string(), true),
        ("node2".to_string(), true),
        ("node3".to_string(), true),
    ];
    assert_eq!(replicas(&admin).await, all_three);

    // Bad input: clear codes.
    let r = admin.get("/repos/default/nope.git").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(
        r.body.contains("default/nope.git is not registered"),
        "{}",
        r.body
    );
    assert_eq!(
        admin.get("/api/repos/default/nope.git").await.status,
        StatusCode::NOT_FOUND
    );
    for traversal in [
        "/repos/default/..%2F..%2Fetc%2Fpasswd",
        "/repos/default/a%2F..%2F..%2Fetc%2Fpasswd",
        "/repos/..%2F..%2Fetc/passwd",
        "/nodes/..%2Fnode1",
    ] {
        let r = admin.get(traversal).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{traversal}: {}", r.body);
    }
    // The client resolves plain dots itself; whatever arrives names no page.
    assert_eq!(
        admin
            .get("/repos/default/a/../../../etc/passwd")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin.get("/static/..%2F..%2FCargo.toml").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin.get("/nodes/node9").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin.get("/no/such/page").await.status,
        StatusCode::NOT_FOUND
    );
    let big = "x".repeat(20 * 1024);
    let r = admin
        .action("synchronize", &[("csrf", &csrf), ("repo", &big)])
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    let long = format!("default/{}", "y".repeat(5000));
    let r = admin
        .action("synchronize", &[("csrf", &csrf), ("repo", &long)])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = admin
        .action("synchronize", &[("csrf", &csrf), ("repo", "default/../x")])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = admin
        .action("explode", &[("csrf", &csrf), ("repo", REPO)])
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // CSRF: a form without the token, or with another, does nothing.
    let r = admin
        .action(
            "remove-replica",
            &[("repo", REPO), ("node", "node3"), ("confirm", REPO)],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = admin
        .action(
            "remove-replica",
            &[
                ("csrf", "forged"),
                ("repo", REPO),
                ("node", "node3"),
                ("confirm", REPO),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // A forged session: pages go to the login, forms are refused.
    let forged = Browser {
        session: Some("0123456789abcdef0123456789abcdef".into()),
        ..Browser::new(addr)
    };
    assert_eq!(forged.get("/").await.status, StatusCode::SEE_OTHER);
    let r = forged
        .action(
            "remove-replica",
            &[
                ("csrf", &csrf),
                ("repo", REPO),
                ("node", "node3"),
                ("confirm", REPO),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // A removal without the typed confirmation.
    let r = admin
        .action(
            "remove-replica",
            &[("csrf", &csrf), ("repo", REPO), ("node", "node3")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body.contains("to confirm"), "{}", r.body);

    // A viewer sees no buttons and cannot post one.
    let mut viewer = Browser::new(addr);
    assert_eq!(viewer.log_in(VIEWER).await.status, StatusCode::SEE_OTHER);
    let page = viewer.get("/repos/default/ops/a.git").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("/actions/"), "{}", page.body);
    assert!(page.body.contains("victor (viewer)"));
    let viewer_csrf = viewer.csrf().await;
    let r = viewer
        .action(
            "remove-replica",
            &[
                ("csrf", &viewer_csrf),
                ("repo", REPO),
                ("node", "node3"),
                ("confirm", REPO),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.body.contains("viewer"), "{}", r.body);
    // Nothing refused changed anything or was recorded as done.
    assert_eq!(replicas(&admin).await, all_three);
    let done = admin.get("/api/actions").await.json();
    // (The unknown job and the unconfirmed removal passed the gate and were refused
    // by the job itself: recorded, with their errors.)
    assert_eq!(done.as_array().unwrap().len(), 2, "{done}");

    // The jobs themselves.
    let r = admin
        .action("synchronize", &[("csrf", &csrf), ("repo", REPO)])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body.contains("every live replica already matched"),
        "{}",
        r.body
    );
    let r = admin
        .action("verify", &[("csrf", &csrf), ("repo", REPO)])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body.contains("every compared replica holds checksum"),
        "{}",
        r.body
    );
    assert_eq!(r.body.matches(">match<").count(), 3, "{}", r.body);
    let r = admin
        .action(
            "remove-replica",
            &[
                ("csrf", &csrf),
                ("repo", REPO),
                ("node", "node3"),
                ("confirm", REPO),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        replicas(&admin).await,
        vec![("node1".to_string(), true), ("node2".to_string(), true)]
    );
    // Removing another would leave fewer than a write needs: refused by the service.
    let r = admin
        .action(
            "remove-replica",
            &[
                ("csrf", &csrf),
                ("repo", REPO),
                ("node", "node2"),
                ("confirm", REPO),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = admin
        .action(
            "add-replica",
            &[("csrf", &csrf), ("repo", REPO), ("node", "node3")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("added a replica on node3"), "{}", r.body);
    assert_eq!(replicas(&admin).await, all_three);
    // The copy on node3 is a real one: its checksum matches the others.
    let r = admin
        .action("verify", &[("csrf", &csrf), ("repo", REPO)])
        .await;
    assert_eq!(r.body.matches(">match<").count(), 3, "{}", r.body);

    // Every job is recorded with who ran it, in the list and the router's log.
    let done = admin.get("/api/actions").await.json();
    let list: Vec<(String, String, String)> = done
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| {
            (
                e["user"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let jobs: Vec<&str> = list.iter().map(|(_, a, _)| a.as_str()).collect();
    assert_eq!(
        jobs,
        [
            "explode",
            "remove-replica",
            "synchronize",
            "verify",
            "remove-replica",
            "remove-replica",
            "add-replica",
            "verify"
        ],
        "{done}"
    );
    assert!(list.iter().all(|(u, _, _)| u == "alice"), "{done}");
    assert_eq!(list[4].2, "ok", "{done}");
    assert!(list[5].2.starts_with("FailedPrecondition"), "{done}");
    let log = c.routers[0].log_tail(400);
    assert!(
        log.contains("admin job from the ops web") && log.contains("alice"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_goes_back_to_the_login_and_does_nothing() -> anyhow::Result<()> {
    let (_c, addr) = cluster(2).await?;
    let mut b = Browser::new(addr);
    assert_eq!(b.log_in(ADMIN).await.status, StatusCode::SEE_OTHER);
    let csrf = b.csrf().await;
    wait_until("the session expires", Duration::from_secs(10), || async {
        b.get("/").await.status == StatusCode::SEE_OTHER
    })
    .await?;
    let r = b
        .action(
            "remove-replica",
            &[
                ("csrf", &csrf),
                ("repo", REPO),
                ("node", "node3"),
                ("confirm", REPO),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.body.contains("nothing was done"), "{}", r.body);
    // A fresh login sees the replica still there.
    assert_eq!(b.log_in(ADMIN).await.status, StatusCode::SEE_OTHER);
    let d = b.get("/api/repos/default/ops/a.git").await.json();
    assert_eq!(d["replicas"].as_array().unwrap().len(), 3, "{d}");
    Ok(())
}

/// Where the browser test's screenshots go: `$REFVOTE_TEST_ARTEFACTS/ops_web/`, or
/// the target's test directory.
fn artefacts() -> std::path::PathBuf {
    std::env::var_os("REFVOTE_TEST_ARTEFACTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
        .join("ops_web")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_logs_in_and_sees_three_healthy_nodes() -> anyhow::Result<()> {
    use refvote_tests::webdriver;
    if let Some(why) = webdriver::missing() {
        println!("skipping the browser test: {why}");
        return Ok(());
    }
    let (c, addr) = cluster(3600).await?;
    let driver = webdriver::Driver::start(c.dir.path()).await?;
    let browser = driver
        .browser(c.dir.path().join("chromium-profile"))
        .await?;
    // The session is closed whatever the checks say.
    let checked = async {
        let base = format!("http://{addr}");
        browser.goto(&format!("{base}/")).await?;
        let url = browser.current_url().await?;
        anyhow::ensure!(
            url.starts_with(&format!("{base}/login")),
            "not sent to the login page: {url}"
        );
        browser.type_into("input[name=user]", ADMIN.0).await?;
        browser.type_into("input[name=token]", ADMIN.1).await?;
        browser.click("form.login button[type=submit]").await?;
        wait_until(
            "the overview after logging in",
            Duration::from_secs(20),
            || async {
                browser
                    .current_url()
                    .await
                    .is_ok_and(|u| u == format!("{base}/"))
            },
        )
        .await?;
        let live = browser.find_all("#nodes span.badge.good").await?;
        let source = browser.source().await?;
        anyhow::ensure!(live.len() == 3, "{} live nodes shown: {source}", live.len());
        for n in ["node1", "node2", "node3", "alice (admin)"] {
            anyhow::ensure!(source.contains(n), "{n} not shown: {source}");
        }
        // The stylesheet loaded under the policy: the header is dark, not unstyled.
        let shot = artefacts().join("overview.png");
        browser.screenshot(&shot).await?;
        println!("screenshot: {}", shot.display());
        let repo = format!("{base}/repos/default/ops/a.git");
        browser.goto(&repo).await?;
        let buttons = browser.find_all("form.action button").await?;
        anyhow::ensure!(buttons.len() >= 4, "{} admin buttons", buttons.len());
        browser
            .screenshot(&artefacts().join("repository.png"))
            .await?;
        anyhow::Ok(())
    }
    .await;
    browser.close().await?;
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_tls_the_session_cookie_is_secure() -> anyhow::Result<()> {
    let ca_dir = tempfile::Builder::new().prefix("refvote-ca-").tempdir()?;
    let ca = refvote_tests::tls::TestCa::new(ca_dir.path())?;
    let addr = ops_addr()?;
    // The router's certificate names the ops web's address (its gRPC port serves TLS
    // with it too).
    let tls = refvote_tests::node::tls_settings(&ca, "router1", addr.ip())?;
    let _c = Fixture::nodes(3)
        .seeded("ops/a.git")
        .router_with(with_ops_web(addr, 3600).config(move |c| c.tls = tls.clone()))
        .start()
        .await?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca.cert)?)?)
        .build()?;
    let mut b = Browser {
        base: format!("https://{addr}"),
        http,
        session: None,
    };
    let r = b.log_in(ADMIN).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let cookie = r.cookie("refvote_ops").unwrap();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let page = b.get("/").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("node3"), "{}", page.body);
    // Plain HTTP gets no page.
    let plain = reqwest::Client::builder().no_proxy().build()?;
    let served = plain
        .get(format!("http://{addr}/login"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    assert!(!served, "the TLS listener served plain HTTP");
    Ok(())
}
