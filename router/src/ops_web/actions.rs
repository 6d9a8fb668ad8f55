//! The admin jobs as buttons, and the repository page they sit on. Each job calls
//! the router's admin service in-process (`crate::admin::Admin`: the repository's
//! lock, the drain of its transactions, the fenced etcd txn), never etcd itself:
//! synchronize, add a replica, remove a replica, remove the repository; and verify
//! (`verify`), which only reads. Removals need the repository's name typed
//! as confirmation. Every job is recorded with who ran it (`OpsWeb::record`).

use std::fmt::Write;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use refvote_cluster::RepoId;
use refvote_cluster::records::now_unix_ms;
use refvote_proto::admin::admin_service_server::AdminService;
use refvote_proto::admin::{
    CreateRepositoryReplicasRequest, GetRepositoryReplicasRequest, RemoveRepositoryReplicasRequest,
    RemoveRepositoryRequest, Replica, RepositoryName, SynchronizeRepositoryReplicasRequest,
};
use serde::Serialize;
use tonic::{Request, Status};

use super::auth::Who;
use super::html::{self, attr, badge, csrf_field, esc, node_link, table};
use super::login::fields;
use super::respond::{admin_gate, error, html_page, status_code};
use super::{AuditEntry, OpsWeb};

/// Longest form field accepted: a storage name, '/', and a relative path at its limit.
pub const MAX_FIELD: usize = 255 + 1 + 4096;

/// A replica as `votingctl replicas get --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaJson {
    pub node: String,
    pub state: String,
    pub generation: u64,
    pub checksum: String,
    pub live: bool,
    pub up_to_date: bool,
    pub reason: String,
    pub repairing_by: String,
}

impl From<&Replica> for ReplicaJson {
    fn from(r: &Replica) -> ReplicaJson {
        ReplicaJson {
            node: r.node.clone(),
            state: r.state.clone(),
            generation: r.generation,
            checksum: r.checksum.clone(),
            live: r.live,
            up_to_date: r.up_to_date,
            reason: r.reason.clone(),
            repairing_by: r.repairing_by.clone(),
        }
    }
}

/// A repository's page: `votingctl replicas get --json`'s fields.
#[derive(Debug, Clone, Serialize)]
pub struct RepoDetail {
    pub repo: String,
    pub generation: u64,
    pub replication_factor: u32,
    pub threshold: u32,
    pub creation_checksum: String,
    pub locked_by: String,
    pub replicas: Vec<ReplicaJson>,
}

fn name(repo: &RepoId) -> Option<RepositoryName> {
    Some(RepositoryName {
        virtual_storage: repo.virtual_storage.clone(),
        relative_path: repo.relative_path.clone(),
    })
}

/// The repository's replicas, through the admin service.
pub async fn replicas(web: &OpsWeb, repo: &RepoId) -> Result<RepoDetail, Status> {
    let r = web
        .admin
        .get_repository_replicas(Request::new(GetRepositoryReplicasRequest {
            repository: name(repo),
        }))
        .await?
        .into_inner();
    Ok(RepoDetail {
        repo: repo.to_string(),
        generation: r.generation,
        replication_factor: r.replication_factor,
        threshold: r.threshold,
        creation_checksum: r.creation_checksum,
        locked_by: r.locked_by,
        replicas: r.replicas.iter().map(Into::into).collect(),
    })
}

fn replica_table(replicas: &[ReplicaJson], forms: Option<(&str, &str)>) -> String {
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|r| {
            let mut row = vec![
                node_link(&r.node),
                if r.up_to_date {
                    badge("good", "up to date")
                } else {
                    badge("warn", &r.state.replace('_', " "))
                },
                r.generation.to_string(),
                format!("<code>{}</code>", esc(&r.checksum)),
                if r.live {
                    badge("good", "up")
                } else {
                    badge("bad", "down")
                },
                esc(&if r.repairing_by.is_empty() {
                    r.reason.clone()
                } else {
                    format!("being repaired by {}; {}", r.repairing_by, r.reason)
                }),
            ];
            if let Some((repo, csrf)) = forms {
                row.push(format!(
                    "<form class=\"action\" method=\"post\" action=\"/actions/remove-replica\">{}\
                     <input type=\"hidden\" name=\"repo\" value=\"{}\">\
                     <input type=\"hidden\" name=\"node\" value=\"{}\">\
                     <label>Type <code>{}</code> to confirm <input type=\"text\" name=\"confirm\"></label> \
                     <button class=\"danger\" type=\"submit\">Remove this replica</button></form>",
                    csrf_field(csrf),
                    attr(repo),
                    attr(&r.node),
                    esc(repo)
                ));
            }
            row
        })
        .collect();
    let mut headers = vec![
        "Node",
        "State",
        "Generation",
        "Checksum",
        "Node state",
        "Note",
    ];
    if forms.is_some() {
        headers.push("Admin");
    }
    table(&headers, &rows)
}

fn simple_form(action: &str, repo: &str, csrf: &str, label: &str) -> String {
    format!(
        "<form class=\"action\" method=\"post\" action=\"/actions/{action}\">{}\
         <input type=\"hidden\" name=\"repo\" value=\"{}\"><button type=\"submit\">{}</button></form>",
        csrf_field(csrf),
        attr(repo),
        esc(label)
    )
}

/// The repository page's body; `admin` (an admin's session) adds the job forms.
pub fn repository_body(web: &OpsWeb, d: &RepoDetail, admin: Option<&Who>) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<p>Generation {} · {} replicas wanted · a write needs {}{}</p>",
        d.generation,
        d.replication_factor,
        d.threshold,
        if d.locked_by.is_empty() {
            String::new()
        } else {
            format!(" · {}", badge("warn", &format!("locked: {}", d.locked_by)))
        }
    );
    body.push_str("<h2>Replicas</h2>");
    let forms = admin.map(|w| (d.repo.as_str(), w.csrf.as_str()));
    body.push_str(&replica_table(&d.replicas, forms));
    let Some(who) = admin else {
        return body;
    };
    let csrf = &who.csrf;
    body.push_str("<h2>Admin jobs</h2>");
    body.push_str(&simple_form(
        "synchronize",
        &d.repo,
        csrf,
        "Synchronize replicas",
    ));
    body.push_str(&simple_form("verify", &d.repo, csrf, "Verify checksums"));
    let free: Vec<String> = web
        .forwarder
        .reads()
        .inspect(|w| {
            w.nodes
                .keys()
                .filter(|n| !d.replicas.iter().any(|r| &r.node == *n))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let mut options = String::from("<option value=\"\">the least loaded node</option>");
    for n in &free {
        let _ = write!(options, "<option value=\"{}\">{}</option>", attr(n), esc(n));
    }
    let _ = write!(
        body,
        "<form class=\"action\" method=\"post\" action=\"/actions/add-replica\">{}\
         <input type=\"hidden\" name=\"repo\" value=\"{}\"><label>Add a replica on \
         <select name=\"node\">{options}</select></label> <button type=\"submit\">Add replica</button></form>",
        csrf_field(csrf),
        attr(&d.repo)
    );
    let _ = write!(
        body,
        "<form class=\"action\" method=\"post\" action=\"/actions/remove-repository\">{}\
         <input type=\"hidden\" name=\"repo\" value=\"{}\"><label>Type <code>{}</code> to confirm \
         <input type=\"text\" name=\"confirm\"></label> <button class=\"danger\" type=\"submit\">\
         Remove the repository and every replica</button></form>",
        csrf_field(csrf),
        attr(&d.repo),
        esc(&d.repo)
    );
    body
}

/// What a job did, for its result page.
struct Done {
    message: String,
    extra: String,
}

async fn job(
    web: &OpsWeb,
    action: &str,
    repo: &RepoId,
    node: &str,
    confirm: &str,
) -> Result<Done, Status> {
    let confirmed = || {
        if confirm.trim() == repo.to_string() {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "type the repository's name, {repo}, to confirm; nothing was done"
            )))
        }
    };
    let admin = &web.admin;
    match action {
        "synchronize" => {
            let r = admin
                .synchronize_repository_replicas(Request::new(
                    SynchronizeRepositoryReplicasRequest {
                        repository: name(repo),
                    },
                ))
                .await?
                .into_inner();
            let replicas: Vec<ReplicaJson> = r.replicas.iter().map(Into::into).collect();
            Ok(Done {
                message: if r.synchronized.is_empty() {
                    format!("every live replica already matched {}", r.source)
                } else {
                    format!("copied {} from {}", r.synchronized.join(", "), r.source)
                },
                extra: replica_table(&replicas, None),
            })
        }
        "verify" => {
            let v = super::verify::verify(web, repo).await?;
            let rows: Vec<Vec<String>> = v
                .replicas
                .iter()
                .map(|c| {
                    vec![
                        node_link(&c.node),
                        badge(if c.result == "match" { "good" } else { "warn" }, &c.result),
                        format!("<code>{}</code>", esc(&c.checksum)),
                        esc(&c.detail),
                    ]
                })
                .collect();
            Ok(Done {
                message: if v.problem.is_empty() {
                    format!("every compared replica holds checksum {}", v.expected)
                } else {
                    v.problem.clone()
                },
                extra: table(&["Node", "Result", "Checksum", "Detail"], &rows),
            })
        }
        "add-replica" => {
            let current = replicas(web, repo).await?;
            let request = if node.is_empty() {
                CreateRepositoryReplicasRequest {
                    repository: name(repo),
                    replica_count: current.replicas.len() as u32 + 1,
                    nodes: Vec::new(),
                }
            } else {
                CreateRepositoryReplicasRequest {
                    repository: name(repo),
                    replica_count: 0,
                    nodes: vec![node.to_owned()],
                }
            };
            let r = admin
                .create_repository_replicas(Request::new(request))
                .await?
                .into_inner();
            let replicas: Vec<ReplicaJson> = r.replicas.iter().map(Into::into).collect();
            Ok(Done {
                message: format!("added a replica on {}", r.added.join(", ")),
                extra: replica_table(&replicas, None),
            })
        }
        "remove-replica" => {
            if node.is_empty() {
                return Err(Status::invalid_argument(
                    "name the node whose replica to remove",
                ));
            }
            confirmed()?;
            let r = admin
                .remove_repository_replicas(Request::new(RemoveRepositoryReplicasRequest {
                    repository: name(repo),
                    nodes: vec![node.to_owned()],
                }))
                .await?
                .into_inner();
            let replicas: Vec<ReplicaJson> = r.replicas.iter().map(Into::into).collect();
            let mut message = format!("removed the replica on {}", r.removed.join(", "));
            if !r.left_on_disk.is_empty() {
                let _ = write!(
                    message,
                    "; its copy on {} could not be deleted (node down): delete it by hand",
                    r.left_on_disk.join(", ")
                );
            }
            Ok(Done {
                message,
                extra: replica_table(&replicas, None),
            })
        }
        "remove-repository" => {
            confirmed()?;
            let r = admin
                .remove_repository(Request::new(RemoveRepositoryRequest {
                    repository: name(repo),
                }))
                .await?
                .into_inner();
            let mut message = format!(
                "removed {repo}; its copies were deleted on {}",
                r.removed_from.join(", ")
            );
            if !r.left_on_disk.is_empty() {
                let _ = write!(
                    message,
                    "; not on {} (down): delete them by hand",
                    r.left_on_disk.join(", ")
                );
            }
            Ok(Done {
                message,
                extra: String::new(),
            })
        }
        other => Err(Status::not_found(format!(
            "there is no admin job {other:?}"
        ))),
    }
}

/// `POST /actions/<job>`: the gate (session, admin, CSRF), the form's checks, the job.
pub async fn run(
    State(web): State<Arc<OpsWeb>>,
    Path(action): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = fields(&body);
    let who = match admin_gate(&web, &headers, form.get("csrf").map(String::as_str)) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let fail =
        |status, message: &str| error(false, Some(&who), status, "Admin job refused", message);
    if let Some(k) = form.keys().find(|k| form[*k].len() > MAX_FIELD) {
        return fail(
            StatusCode::BAD_REQUEST,
            &format!("the field {k:?} is longer than {MAX_FIELD} bytes; nothing was done"),
        );
    }
    let text = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let repo = match RepoId::parse(text("repo")) {
        Ok(r) => r,
        Err(e) => {
            return fail(
                StatusCode::BAD_REQUEST,
                &format!("repo: {e}; nothing was done"),
            );
        }
    };
    let node = text("node");
    if !node.is_empty() && refvote_cluster::settings::check_name(node).is_err() {
        return fail(
            StatusCode::BAD_REQUEST,
            "node: not a node name; nothing was done",
        );
    }
    let outcome = job(&web, &action, &repo, node, text("confirm")).await;
    web.record(AuditEntry {
        unix_ms: now_unix_ms(),
        user: who.user.clone(),
        action: action.clone(),
        repo: repo.to_string(),
        node: node.to_owned(),
        outcome: match &outcome {
            Ok(_) => "ok".into(),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        },
    });
    let viewer = html::Viewer {
        user: &who.user,
        role: who.role.name(),
        csrf: &who.csrf,
    };
    let back = if action == "remove-repository" {
        "<p><a href=\"/\">Back to the overview</a></p>".to_string()
    } else {
        format!(
            "<p><a href=\"{}\">Back to {}</a></p>",
            attr(&html::repo_url(&repo.to_string())),
            esc(&repo.to_string())
        )
    };
    let title = format!("{action} {repo}");
    match outcome {
        Ok(done) => {
            let body = format!("{}{}{back}", html::notice("ok", &done.message), done.extra);
            html_page(StatusCode::OK, html::page(&title, Some(&viewer), &body))
        }
        Err(s) => {
            let body = format!("{}{back}", html::notice("error", s.message()));
            html_page(
                status_code(s.code()),
                html::page(&title, Some(&viewer), &body),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_get_no_forms() {
        let replicas = vec![ReplicaJson {
            node: "n1".into(),
            state: "up_to_date".into(),
            generation: 3,
            checksum: "abc".into(),
            live: true,
            up_to_date: true,
            reason: String::new(),
            repairing_by: String::new(),
        }];
        let plain = replica_table(&replicas, None);
        assert!(!plain.contains("<form"), "{plain}");
        let admin = replica_table(&replicas, Some(("default/a.git", "tok")));
        assert!(admin.contains("/actions/remove-replica") && admin.contains("tok"));
    }
}
