//! `replicas get|add|remove|sync <repo>`: the router's admin service.

use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;
use refvote_cluster::RepoId;
use refvote_proto::admin::admin_service_client::AdminServiceClient;
use refvote_proto::admin::{
    CreateRepositoryReplicasRequest, GetRepositoryReplicasRequest, RemoveRepositoryReplicasRequest,
    Replica, RepositoryName, SynchronizeRepositoryReplicasRequest,
};
use serde::Serialize;

use crate::connect::{Ctl, table};

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

fn name(repo: &RepoId) -> Option<RepositoryName> {
    Some(RepositoryName {
        virtual_storage: repo.virtual_storage.clone(),
        relative_path: repo.relative_path.clone(),
    })
}

fn replica_table(replicas: &[ReplicaJson]) -> String {
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|r| {
            let mut note = r.reason.clone();
            if !r.repairing_by.is_empty() {
                note = format!("being repaired by {}; {note}", r.repairing_by);
            }
            vec![
                r.node.clone(),
                r.state.clone(),
                r.generation.to_string(),
                if r.up_to_date { "yes" } else { "no" }.into(),
                if r.live { "up" } else { "DOWN" }.into(),
                r.checksum.chars().take(12).collect(),
                note,
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "STATE",
            "GENERATION",
            "CURRENT",
            "LIVE",
            "CHECKSUM",
            "NOTE",
        ],
        &rows,
    )
}

fn status_error(what: &str, repo: &RepoId, s: tonic::Status) -> anyhow::Error {
    let hint = match s.code() {
        tonic::Code::NotFound => "; `votingctl repos list` shows the registered repositories",
        tonic::Code::Unavailable => "; retry once the nodes or etcd are back",
        tonic::Code::Unauthenticated => {
            "; pass --config with a votingd.toml whose [auth] token the router shares"
        }
        _ => "",
    };
    anyhow::anyhow!("{what} {repo}: {:?}: {}{hint}", s.code(), s.message())
}

/// Runs `call`, showing an elapsed-time line on a terminal's stderr while it runs.
async fn with_progress<T>(what: &str, call: impl Future<Output = T>) -> T {
    if !std::io::stderr().is_terminal() {
        return call.await;
    }
    let start = Instant::now();
    let spin = ['|', '/', '-', '\\'];
    tokio::pin!(call);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut i = 0;
    loop {
        tokio::select! {
            out = &mut call => {
                eprint!("\r\x1b[2K");
                return out;
            }
            _ = tick.tick() => {
                eprint!("\r{} {what} ({:.1}s)", spin[i % 4], start.elapsed().as_secs_f64());
                i += 1;
            }
        }
    }
}

pub async fn get(ctl: &Ctl, repo: &RepoId) -> anyhow::Result<i32> {
    let mut client = AdminServiceClient::new(ctl.router_channel().await?);
    let resp = client
        .get_repository_replicas(GetRepositoryReplicasRequest {
            repository: name(repo),
        })
        .await
        .map_err(|s| status_error("GetRepositoryReplicas", repo, s))?
        .into_inner();
    let replicas: Vec<ReplicaJson> = resp.replicas.iter().map(Into::into).collect();
    let doc = serde_json::json!({
        "repo": repo.to_string(),
        "generation": resp.generation,
        "replication_factor": resp.replication_factor,
        "threshold": resp.threshold,
        "creation_checksum": resp.creation_checksum,
        "locked_by": resp.locked_by,
        "replicas": replicas,
    });
    ctl.print(&doc, || {
        let mut out = format!(
            "{repo}: generation {}, {} replicas, writes need {}{}\n",
            resp.generation,
            resp.replication_factor,
            resp.threshold,
            if resp.locked_by.is_empty() {
                String::new()
            } else {
                format!(", locked: {}", resp.locked_by)
            }
        );
        out.push_str(&replica_table(&replicas));
        out
    });
    Ok(0)
}

pub async fn add(
    ctl: &Ctl,
    repo: &RepoId,
    count: Option<u32>,
    nodes: Vec<String>,
) -> anyhow::Result<i32> {
    if count.is_none() && nodes.is_empty() {
        bail!("say how many replicas to add (--count N) or where (--node NAME)");
    }
    let mut client = AdminServiceClient::new(ctl.router_channel().await?);
    let replica_count = match count {
        Some(0) => bail!("--count must be at least 1"),
        Some(n) => {
            let current = client
                .get_repository_replicas(GetRepositoryReplicasRequest {
                    repository: name(repo),
                })
                .await
                .map_err(|s| status_error("GetRepositoryReplicas", repo, s))?
                .into_inner();
            current.replicas.len() as u32 + nodes.len() as u32 + n
        }
        None => 0,
    };
    let request = CreateRepositoryReplicasRequest {
        repository: name(repo),
        replica_count,
        nodes,
    };
    let resp = with_progress(
        &format!("copying {repo} onto the new replicas"),
        client.create_repository_replicas(request),
    )
    .await
    .map_err(|s| status_error("CreateRepositoryReplicas", repo, s))?
    .into_inner();
    let replicas: Vec<ReplicaJson> = resp.replicas.iter().map(Into::into).collect();
    let doc =
        serde_json::json!({ "repo": repo.to_string(), "added": resp.added, "replicas": replicas });
    ctl.print(&doc, || {
        format!(
            "{repo}: added {}\n{}",
            if resp.added.is_empty() {
                "nothing".into()
            } else {
                resp.added.join(", ")
            },
            replica_table(&replicas)
        )
    });
    Ok(0)
}

pub async fn remove(ctl: &Ctl, repo: &RepoId, nodes: Vec<String>) -> anyhow::Result<i32> {
    if nodes.is_empty() {
        bail!("say which replicas to remove: --node NAME (repeatable)");
    }
    let mut client = AdminServiceClient::new(ctl.router_channel().await?);
    let resp = with_progress(
        &format!("removing replicas of {repo}"),
        client.remove_repository_replicas(RemoveRepositoryReplicasRequest {
            repository: name(repo),
            nodes,
        }),
    )
    .await
    .map_err(|s| status_error("RemoveRepositoryReplicas", repo, s))?
    .into_inner();
    let replicas: Vec<ReplicaJson> = resp.replicas.iter().map(Into::into).collect();
    let doc = serde_json::json!({
        "repo": repo.to_string(),
        "removed": resp.removed,
        "left_on_disk": resp.left_on_disk,
        "replicas": replicas,
    });
    ctl.print(&doc, || {
        let mut out = format!("{repo}: removed {}\n", resp.removed.join(", "));
        if !resp.left_on_disk.is_empty() {
            out.push_str(&format!(
                "left on disk (node down; delete the copy by hand): {}\n",
                resp.left_on_disk.join(", ")
            ));
        }
        out.push_str(&replica_table(&replicas));
        out
    });
    Ok(0)
}

pub async fn sync(ctl: &Ctl, repo: &RepoId) -> anyhow::Result<i32> {
    let mut client = AdminServiceClient::new(ctl.router_channel().await?);
    let resp = with_progress(
        &format!("synchronizing {repo}"),
        client.synchronize_repository_replicas(SynchronizeRepositoryReplicasRequest {
            repository: name(repo),
        }),
    )
    .await
    .map_err(|s| status_error("SynchronizeRepositoryReplicas", repo, s))?
    .into_inner();
    let replicas: Vec<ReplicaJson> = resp.replicas.iter().map(Into::into).collect();
    let doc = serde_json::json!({
        "repo": repo.to_string(),
        "source": resp.source,
        "synchronized": resp.synchronized,
        "replicas": replicas,
    });
    ctl.print(&doc, || {
        format!(
            "{repo}: source {}, copied onto {}\n{}",
            resp.source,
            if resp.synchronized.is_empty() {
                "none (all level)".into()
            } else {
                resp.synchronized.join(", ")
            },
            replica_table(&replicas)
        )
    });
    Ok(0)
}
