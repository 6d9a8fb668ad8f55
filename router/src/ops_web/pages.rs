//! The site's routes and its pages: each GET renders HTML for people and, under
//! `/api/`, the same data as JSON. Admins see the admin jobs' forms; viewers do not.

use std::fmt::Write;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use refvote_cluster::RepoId;
use refvote_cluster::summary::{Holder, RepoSummary};

use super::auth::{Role, Who};
use super::data::{self, Job};
use super::html::{self, badge, esc, node_link, repo_link, table};
use super::login::fields;
use super::respond::{error, gate, html_page, json};
use super::{MAX_BODY, OpsWeb};

pub fn router(web: Arc<OpsWeb>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/api/overview", get(overview))
        .route("/nodes/{name}", get(node))
        .route("/api/nodes/{name}", get(node))
        .route("/repos/{storage}/{*path}", get(repository))
        .route("/api/repos/{storage}/{*path}", get(repository))
        .route("/repairs", get(repairs))
        .route("/api/repairs", get(repairs))
        .route("/search", get(search))
        .route("/api/search", get(search))
        .route("/api/actions", get(actions))
        .route("/actions/{action}", post(super::actions::run))
        .route("/login", get(super::login::page).post(super::login::submit))
        .route("/logout", post(super::login::logout))
        .route("/static/ops.css", get(stylesheet))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(web)
}

/// What each page handler starts from.
struct Ask {
    who: Who,
    api: bool,
}

// The refusal is the request's whole answer, made once per request.
#[allow(clippy::result_large_err)]
fn ask(web: &OpsWeb, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Ask, Response> {
    let api = uri.path().starts_with("/api/");
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_else(|| uri.path());
    let who = gate(web, method, headers, path, api)?;
    Ok(Ask { who, api })
}

impl Ask {
    fn viewer(&self) -> html::Viewer<'_> {
        html::Viewer {
            user: &self.who.user,
            role: self.who.role.name(),
            csrf: &self.who.csrf,
        }
    }

    fn page(&self, title: &str, body: &str) -> Response {
        html_page(
            StatusCode::OK,
            html::page(title, Some(&self.viewer()), body),
        )
    }

    fn fail(&self, status: StatusCode, title: &str, message: &str) -> Response {
        error(self.api, Some(&self.who), status, title, message)
    }

    fn etcd(&self, e: refvote_cluster::Error) -> Response {
        self.fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "etcd is not answering",
            &format!("cannot read the cluster from etcd: {e}; retry shortly"),
        )
    }

    fn admin(&self) -> bool {
        self.who.role == Role::Admin && !self.who.csrf.is_empty()
    }
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        html::STYLESHEET,
    )
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    let api = uri.path().starts_with("/api/");
    error(
        api,
        None,
        StatusCode::NOT_FOUND,
        "Not found",
        "there is no such page; start from the overview",
    )
}

fn ttl_badge(h: &Holder) -> String {
    if h.ttl_secs > 0 {
        badge("good", &format!("lease {} · {}s left", h.lease, h.ttl_secs))
    } else {
        badge("bad", &format!("lease {} expiring", h.lease))
    }
}

fn replica_cells(s: &RepoSummary) -> String {
    s.replicas
        .iter()
        .map(|r| {
            let kind = match (r.up_to_date, r.live) {
                (true, true) => "good",
                (_, false) => "bad",
                _ => "warn",
            };
            let word = match (r.up_to_date, r.live) {
                (true, true) => "up to date".to_string(),
                (up, false) => format!("{} · node down", if up { "up to date" } else { &r.state }),
                _ => r.state.replace('_', " "),
            };
            format!("{} {}", node_link(&r.node), badge(kind, &word))
        })
        .collect::<Vec<_>>()
        .join("<br>")
}

fn summary_rows(list: &[RepoSummary]) -> Vec<Vec<String>> {
    list.iter()
        .map(|s| {
            vec![
                repo_link(&s.repo),
                s.generation.to_string(),
                format!("{}/{}", s.available, s.replicas.len()),
                replica_cells(s),
            ]
        })
        .collect()
}

const SUMMARY_HEADERS: [&str; 4] = ["Repository", "Generation", "Available", "Replicas"];

fn job_rows(jobs: &[Job]) -> Vec<Vec<String>> {
    jobs.iter()
        .map(|j| {
            vec![
                repo_link(&j.repo),
                node_link(&j.node),
                esc(&j.reason),
                j.attempts.to_string(),
                if j.claimed_by.is_empty() {
                    "waiting".into()
                } else {
                    format!("by {}", esc(&j.claimed_by))
                },
                esc(&j.last_error),
            ]
        })
        .collect()
}

const JOB_HEADERS: [&str; 6] = [
    "Repository",
    "Node",
    "Reason",
    "Attempts",
    "Worker",
    "Last error",
];

async fn overview(
    State(web): State<Arc<OpsWeb>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let ask = match ask(&web, &method, &uri, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let o = match data::overview(&web.store, web.forwarder.reads()).await {
        Ok(o) => o,
        Err(e) => return ask.etcd(e),
    };
    if ask.api {
        return json(&o);
    }
    let mut body = String::new();
    let b = &o.by_state;
    let card = |label: &str, n: String, kind: &str| {
        format!(
            "<div class=\"card {kind}\"><div class=\"n\">{}</div>{}</div>",
            esc(&n),
            esc(label)
        )
    };
    body.push_str("<div class=\"cards\">");
    body.push_str(&card("nodes live", o.nodes.len().to_string(), ""));
    body.push_str(&card("repositories", o.repositories.to_string(), ""));
    body.push_str(&card("up to date", b.up_to_date.to_string(), "good"));
    body.push_str(&card("degraded", b.degraded.to_string(), "warn"));
    body.push_str(&card("outdated", b.outdated.to_string(), "warn"));
    body.push_str(&card("repairing", b.repairing.to_string(), "warn"));
    body.push_str(&card("data loss", b.dataloss.to_string(), "bad"));
    body.push_str(&card(
        "open transactions",
        o.open_transactions.to_string(),
        "",
    ));
    body.push_str(&card("repair jobs", o.repair_jobs.to_string(), ""));
    body.push_str("</div>");
    if !o.view_current {
        body.push_str(&html::notice(
            "error",
            "This router's view of etcd is not current: the repository counts are what it last saw.",
        ));
    }
    body.push_str("<h2>etcd members</h2>");
    let rows: Vec<Vec<String>> = o
        .etcd_members
        .iter()
        .map(|m| {
            vec![
                esc(&m.name),
                esc(&m.client_urls.join(", ")),
                if m.leader {
                    badge("good", "leader")
                } else {
                    "follower".into()
                },
            ]
        })
        .collect();
    body.push_str(&table(&["Member", "Client URLs", "Role"], &rows));
    body.push_str("<section id=\"nodes\"><h2>Nodes</h2>");
    let rows: Vec<Vec<String>> = o
        .nodes
        .iter()
        .map(|h| vec![node_link(&h.name), esc(&h.address), ttl_badge(h)])
        .collect();
    body.push_str(&table(&["Node", "Address", "Lease"], &rows));
    body.push_str("</section>");
    body.push_str("<h2>Routers</h2>");
    let rows: Vec<Vec<String>> = o
        .routers
        .iter()
        .map(|h| vec![esc(&h.name), esc(&h.address), ttl_badge(h)])
        .collect();
    body.push_str(&table(&["Router", "Address", "Lease"], &rows));
    let _ = write!(
        body,
        "<h2>Degraded repositories ({})</h2>",
        o.by_state.degraded
    );
    body.push_str(&table(&SUMMARY_HEADERS, &summary_rows(&o.degraded)));
    if o.by_state.degraded > o.degraded.len() {
        let _ = write!(
            body,
            "<p>The first {} are listed; <a href=\"/repairs\">repairs and data loss</a> has more.</p>",
            o.degraded.len()
        );
    }
    let _ = write!(body, "<h2>Repair queue ({})</h2>", o.repair_jobs);
    body.push_str(&table(&JOB_HEADERS, &job_rows(&o.repair_queue)));
    verifiers(&mut body, &o.verifiers);
    ask.page("Overview", &body)
}

/// The background verifiers' progress, on the overview.
fn verifiers(body: &mut String, list: &[refvote_cluster::verifier::VerifierStatus]) {
    let now = refvote_cluster::records::now_unix_ms();
    let ago = |ms: u64| {
        if ms == 0 {
            "not yet".to_string()
        } else {
            format!("{} s ago", now.saturating_sub(ms) / 1000)
        }
    };
    body.push_str("<section id=\"verifier\"><h2>Background verifier</h2>");
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|v| {
            vec![
                esc(&v.router),
                v.shards.len().to_string(),
                format!("{} ({} of {})", v.pass, v.pass_done, v.pass_total),
                esc(&format!(
                    "{} (took {} ms)",
                    ago(v.last_full_pass_unix_ms),
                    v.last_full_pass_ms
                )),
                v.replicas_checked.to_string(),
                v.busy_skipped.to_string(),
                if v.mismatches > 0 {
                    badge("bad", &v.mismatches.to_string())
                } else {
                    "0".into()
                },
            ]
        })
        .collect();
    body.push_str(&table(
        &[
            "Router",
            "Shards",
            "Pass (progress)",
            "Last full pass",
            "Replicas checked",
            "Skipped (busy)",
            "Mismatches",
        ],
        &rows,
    ));
    let recent: Vec<Vec<String>> = list
        .iter()
        .flat_map(|v| v.recent_mismatches.iter().map(|m| vec![esc(m)]))
        .collect();
    if !recent.is_empty() {
        body.push_str(&table(
            &["Recent mismatches (repository node unix-ms: why)"],
            &recent,
        ));
    }
    body.push_str("</section>");
}

async fn node(
    State(web): State<Arc<OpsWeb>>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let ask = match ask(&web, &method, &uri, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if refvote_cluster::settings::check_name(&name).is_err() {
        return ask.fail(
            StatusCode::BAD_REQUEST,
            "Bad node name",
            "a node name has only letters, digits, '-', '_' and '.'",
        );
    }
    let n = match data::node(&web.store, web.forwarder.reads(), &name).await {
        Ok(Some(n)) => n,
        Ok(None) => {
            return ask.fail(
                StatusCode::NOT_FOUND,
                "Unknown node",
                &format!("no node {name} is registered or holds a replica"),
            );
        }
        Err(e) => return ask.etcd(e),
    };
    if ask.api {
        return json(&n);
    }
    let mut body = String::new();
    let _ = write!(
        body,
        "<p>{} · address <code>{}</code> · storages {} · version {}</p>",
        if n.live {
            badge(
                "good",
                &format!("live, lease {} · {}s left", n.lease, n.ttl_secs),
            )
        } else {
            badge("bad", "down: holds no lease")
        },
        esc(&n.address),
        esc(&n.storages.join(", ")),
        esc(&n.version)
    );
    let _ = write!(
        body,
        "<h2>Replicas ({} of {} up to date)</h2>",
        n.up_to_date, n.replicas_total
    );
    let rows: Vec<Vec<String>> = n
        .replicas
        .iter()
        .map(|r| {
            vec![
                repo_link(&r.repo),
                if r.up_to_date {
                    badge("good", "up to date")
                } else {
                    badge("warn", &r.state.replace('_', " "))
                },
                r.generation.to_string(),
                esc(&r.reason),
            ]
        })
        .collect();
    body.push_str(&table(
        &["Repository", "State", "Generation", "Reason"],
        &rows,
    ));
    if n.replicas_total > n.replicas.len() {
        let _ = write!(body, "<p>The first {} are listed.</p>", n.replicas.len());
    }
    body.push_str("<h2>Repair jobs</h2>");
    body.push_str(&table(&JOB_HEADERS, &job_rows(&n.repair_jobs)));
    ask.page(&format!("Node {}", n.name), &body)
}

async fn repository(
    State(web): State<Arc<OpsWeb>>,
    Path((storage, path)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let ask = match ask(&web, &method, &uri, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let repo = match RepoId::new(&storage, &path) {
        Ok(r) => r,
        Err(e) => {
            return ask.fail(
                StatusCode::BAD_REQUEST,
                "Bad repository name",
                &format!("{storage}/{path}: {e}"),
            );
        }
    };
    let detail = match super::actions::replicas(&web, &repo).await {
        Ok(d) => d,
        Err(s) => {
            return ask.fail(
                super::respond::status_code(s.code()),
                "Repository",
                s.message(),
            );
        }
    };
    if ask.api {
        return json(&detail);
    }
    let mut body = super::actions::repository_body(&web, &detail, ask.admin().then_some(&ask.who));
    let jobs = data::jobs_of(&web.store, &repo).await.unwrap_or_default();
    body.push_str("<h2>Repair jobs</h2>");
    body.push_str(&table(&JOB_HEADERS, &job_rows(&jobs)));
    ask.page(&repo.to_string(), &body)
}

async fn repairs(
    State(web): State<Arc<OpsWeb>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let ask = match ask(&web, &method, &uri, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let r = match data::repairs(&web.store, web.forwarder.reads()).await {
        Ok(r) => r,
        Err(e) => return ask.etcd(e),
    };
    if ask.api {
        return json(&r);
    }
    let mut body = String::new();
    let _ = write!(body, "<h2>Repair jobs ({})</h2>", r.repair_jobs);
    body.push_str(&table(&JOB_HEADERS, &job_rows(&r.jobs)));
    let _ = write!(
        body,
        "<h2>Data loss ({})</h2><p>Repositories with no up-to-date replica on a live node: \
         start a node that holds one, or accept the loss with \
         <code>votingctl accept-dataloss</code>.</p>",
        r.dataloss.len()
    );
    body.push_str(&table(&SUMMARY_HEADERS, &summary_rows(&r.dataloss)));
    ask.page("Repairs and data loss", &body)
}

/// Longest search prefix accepted (a relative path's limit).
const MAX_PREFIX: usize = 4096;

async fn search(
    State(web): State<Arc<OpsWeb>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let ask = match ask(&web, &method, &uri, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let q = fields(query.unwrap_or_default().as_bytes());
    let storage = q
        .get("storage")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| web.storages.first().cloned().unwrap_or_default());
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    if refvote_cluster::repo::validate_storage_name(&storage).is_err() || prefix.len() > MAX_PREFIX
    {
        return ask.fail(
            StatusCode::BAD_REQUEST,
            "Search",
            "the storage is not a valid name, or the prefix is longer than 4096 bytes",
        );
    }
    let after = match q.get("after").filter(|a| !a.is_empty()) {
        Some(a) => match RepoId::parse(a) {
            Ok(r) => Some(r),
            Err(e) => return ask.fail(StatusCode::BAD_REQUEST, "Search", &format!("after: {e}")),
        },
        None => None,
    };
    let s = match data::search(
        &web.store,
        web.forwarder.reads(),
        &storage,
        &prefix,
        after.as_ref(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return ask.etcd(e),
    };
    if ask.api {
        return json(&s);
    }
    let mut body =
        String::from("<form method=\"get\" action=\"/search\"><select name=\"storage\">");
    for name in &web.storages {
        let _ = write!(
            body,
            "<option{}>{}</option>",
            if *name == storage { " selected" } else { "" },
            esc(name)
        );
    }
    let _ = write!(
        body,
        "</select> <input type=\"text\" name=\"prefix\" value=\"{}\" placeholder=\"path prefix, e.g. @hashed/ab\"> \
         <button type=\"submit\">Search</button></form>",
        html::attr(&prefix)
    );
    body.push_str(&table(&SUMMARY_HEADERS, &summary_rows(&s.repositories)));
    if !s.next.is_empty() {
        let _ = write!(
            body,
            "<p><a href=\"/search?storage={}&amp;prefix={}&amp;after={}\">Next page</a></p>",
            html::url_part(&storage),
            html::url_part(&prefix),
            html::url_part(&s.next)
        );
    }
    ask.page("Search", &body)
}

async fn actions(
    State(web): State<Arc<OpsWeb>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = ask(&web, &method, &uri, &headers) {
        return r;
    }
    json(&web.recent_actions())
}
