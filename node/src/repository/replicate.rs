//! ReplicateRepository, the repair of an outdated replica (DESIGN.md §4): the source is
//! another node's Gitaly gRPC service, named in the `gitaly-servers` request metadata as
//! Gitaly does it (base64 of JSON `{"<storage>": {"address": "tcp://…", "token": …}}`).
//!
//! The objects and refs come through the source's CreateBundle, streamed into a file
//! in this storage's private area and fetched from with `--prune` (refs the source no
//! longer has go); HEAD comes from the source's FindDefaultBranchName. A bundle that
//! lacks a ref the source has (git leaves out a ref that moves while it writes the
//! bundle) is fetched again, and never applied: with `--prune` it would delete that
//! branch here. Every git run here is maintenance: the hook lets it pass, since a
//! repair copies what the majority already decided. Running it again against an
//! unchanged source changes nothing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use refvote_auth::{Secret, Signed};
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{
    CreateBundleRequest, FindDefaultBranchNameRequest, ListRefsRequest, Repository,
};
use tokio_stream::StreamExt;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Code, Status};

use super::bundle;
use crate::error::NodeError;
use crate::git::Git;
use crate::refs::names;
use crate::refs::update::{self, RefUpdate};
use crate::storage::RepoPath;
use crate::tx::{WriteContext, WriteIn};

/// The request metadata key naming the nodes a call may reach, as in Gitaly.
pub const SERVERS_METADATA: &str = "gitaly-servers";

/// How many bundles a repair asks its source for before it gives up on ones that keep
/// lacking refs the source has (see [`missing_from_bundle`]) with ABORTED; the router
/// tries again (at last under the repository's lock).
const BUNDLE_TRIES: usize = 3;

#[derive(serde::Deserialize)]
struct Server {
    address: String,
    /// The secret the source checks tokens against, as Gitaly sends it; empty: this
    /// node's own `[auth]` secret, which a refvote cluster shares.
    #[serde(default)]
    token: String,
}

/// Where the source is and the secret to sign calls to it with.
pub struct SourceServer {
    pub url: String,
    pub secret: Option<Arc<Secret>>,
    /// Set for a `tls://` source.
    pub tls: Option<ClientTlsConfig>,
}

/// The node serving `storage`, from the `gitaly-servers` metadata; `own` is this
/// node's secret, used when the metadata names none.
pub fn source_server(
    metadata: &MetadataMap,
    storage: &str,
    own: Option<&Arc<Secret>>,
    client_tls: Option<&ClientTlsConfig>,
) -> Result<SourceServer, NodeError> {
    let raw = metadata
        .get(SERVERS_METADATA)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            NodeError::invalid(format!(
                "metadata {SERVERS_METADATA} is missing: it must say where the source storage {storage:?} is served"
            ))
        })?;
    let json = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .map_err(|e| {
            NodeError::invalid(format!("metadata {SERVERS_METADATA} is not base64: {e}"))
        })?;
    let servers: HashMap<String, Server> = serde_json::from_slice(&json).map_err(|e| {
        NodeError::invalid(format!(
            "metadata {SERVERS_METADATA} is not a JSON map of storage to {{\"address\": …}}: {e}"
        ))
    })?;
    let server = servers.get(storage).ok_or_else(|| {
        NodeError::invalid(format!(
            "metadata {SERVERS_METADATA} does not name the source storage {storage:?}"
        ))
    })?;
    let secret = match Secret::new(server.token.as_bytes()) {
        Some(s) => Some(Arc::new(s)),
        None => own.cloned(),
    };
    let (url, tls) = refvote_auth::tls::node_url(&server.address)
        .map_err(|e| NodeError::invalid(format!("source {e}")))?;
    let tls = match (tls, client_tls) {
        (false, _) => None,
        (true, Some(c)) => Some(c.clone()),
        (true, None) => {
            return Err(NodeError::invalid(format!(
                "the source {} serves TLS but this node has no [tls] ca_path to check it with",
                server.address
            )));
        }
    };
    Ok(SourceServer { url, secret, tls })
}

async fn connect(url: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, Status> {
    let mut endpoint = Channel::from_shared(url.to_owned())
        .map_err(|e| Status::invalid_argument(format!("source address {url:?}: {e}")))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Status::invalid_argument(format!("source address {url:?}: TLS: {e}")))?;
    }
    endpoint
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach the source node at {url}: {e}")))
}

/// A signed (and for a `tls://` source, TLS) channel to the source node.
pub async fn channel(server: &SourceServer) -> Result<Signed<Channel>, Status> {
    Ok(Signed::new(
        connect(&server.url, server.tls.clone()).await?,
        server.secret.clone(),
    ))
}

/// The branch the source's HEAD points at (FindDefaultBranchName, HEAD only).
pub async fn source_head(channel: &Signed<Channel>, source: &Repository) -> Result<String, Status> {
    let head = RefServiceClient::new(channel.clone())
        .find_default_branch_name(FindDefaultBranchNameRequest {
            repository: Some(source.clone()),
            head_only: true,
        })
        .await
        .map_err(|s| from_source("reading HEAD", s))?
        .into_inner()
        .name;
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// What the source holds: its bundle (`None` when it has no refs) and HEAD's branch.
pub struct Source {
    pub bundle: Option<bundle::BundleFile>,
    pub head: String,
}

/// Fetches the source's bundle into `target_root`'s private area and reads its HEAD.
/// The bundle carries every ref the source has once it is written, or none is used.
pub async fn fetch_source(
    git: &Git,
    server: &SourceServer,
    source: Repository,
    target_root: &Path,
) -> Result<Source, Status> {
    let channel = channel(server).await?;
    // HEAD first: a ref written between the two calls is then in the bundle, and a
    // HEAD change will be caught by the next repair.
    let head = source_head(&channel, &source).await?;
    let mut missing = Vec::new();
    for attempt in 1..=BUNDLE_TRIES {
        let stream = RepositoryServiceClient::new(channel.clone())
            .create_bundle(CreateBundleRequest {
                repository: Some(source.clone()),
            })
            .await;
        let bundle = match stream {
            Ok(s) => {
                let chunks = s.into_inner().map(|m| m.map(|m| m.data));
                Some(
                    bundle::receive(target_root, chunks)
                        .await
                        .map_err(|s| from_source("copying the bundle", s))?,
                )
            }
            // The source has no refs: the replica must have none either.
            Err(s) if source_is_empty(&s) => None,
            Err(s) => return Err(from_source("creating a bundle", s)),
        };
        // What the source has now, after the bundle was written.
        let has = source_refs(&channel, &source).await?;
        let carried = match &bundle {
            Some(b) => bundle::heads(git, &b.path)
                .await?
                .into_iter()
                .map(|(_, name)| name)
                .collect(),
            None => Vec::new(),
        };
        missing = missing_from_bundle(&has, &carried);
        if missing.is_empty() {
            return Ok(Source { bundle, head });
        }
        tracing::info!(
            attempt,
            ?missing,
            "the source's bundle lacks refs the source has (moved while it was written); asking again"
        );
    }
    // ABORTED: a concurrency conflict; the router's repair tries again, at last under
    // the repository's write lock, where nothing moves.
    Err(Status::aborted(format!(
        "source repository: {BUNDLE_TRIES} bundles lacked refs the source has ({}): writes \
         moved them while git wrote the bundle; nothing was applied, retry",
        missing.join(", ")
    )))
}

/// Every ref name the source has (ListRefs of `refs/`).
async fn source_refs(
    channel: &Signed<Channel>,
    source: &Repository,
) -> Result<Vec<String>, Status> {
    let mut stream = RefServiceClient::new(channel.clone())
        .list_refs(ListRefsRequest {
            repository: Some(source.clone()),
            patterns: vec![b"refs/".to_vec()],
            ..Default::default()
        })
        .await
        .map_err(|s| from_source("listing refs", s))?
        .into_inner();
    let mut names = Vec::new();
    while let Some(m) = stream
        .message()
        .await
        .map_err(|s| from_source("listing refs", s))?
    {
        names.extend(
            m.references
                .into_iter()
                .map(|r| String::from_utf8_lossy(&r.name).into_owned()),
        );
    }
    Ok(names)
}

/// The refs in `has` (the source's, listed after its bundle was written) that the
/// bundle does not carry. `git bundle create --all` reads every ref, walks the history,
/// then reads each ref again and leaves out one whose value changed meanwhile, without
/// a word: under writes, a bundle can lack a branch the source has had all along.
/// Fetched with `--prune`, such a bundle deletes that branch here, and nothing in etcd
/// need have moved to stop the repair recording the replica up to date. A ref created
/// after the bundle shows here too; asking again settles it.
fn missing_from_bundle(has: &[String], carried: &[String]) -> Vec<String> {
    let carried: std::collections::HashSet<&str> = carried.iter().map(String::as_str).collect();
    has.iter()
        .filter(|n| n.as_str() != "HEAD" && !carried.contains(n.as_str()))
        .cloned()
        .collect()
}

/// Whether the source's CreateBundle refusal says it has no refs (ours and Gitaly's
/// wording). Only that one: any other FAILED_PRECONDITION (a git failure on a busy
/// source, a source that knows it is behind) taken for "no refs" made a repair delete
/// every ref of its target, and a quiet moment let that empty replica be recorded up
/// to date (the fault suite read a branch as absent through it).
fn source_is_empty(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition
        && status.message().contains("refusing to create empty bundle")
}

/// A failure on the source node, said as such (the target is fine).
fn from_source(step: &str, s: Status) -> Status {
    let code = match s.code() {
        // The source's own client errors are this request's fault (wrong source).
        Code::NotFound | Code::InvalidArgument => s.code(),
        Code::FailedPrecondition => Code::FailedPrecondition,
        _ => Code::Unavailable,
    };
    Status::new(code, format!("source repository: {step}: {}", s.message()))
}

/// Brings the existing repository at `target` level with `source`: refs (pruned) and
/// objects from the bundle, then HEAD.
pub async fn sync_existing(git: &Git, target: &RepoPath, source: &Source) -> Result<(), NodeError> {
    let ctx = WriteContext::Maintenance;
    refvote_cluster::faults::reach(refvote_cluster::faults::MID_REPAIR).await;
    match &source.bundle {
        Some(b) => bundle::fetch(git, &target.path, &b.path, &ctx, true).await?,
        None => {
            tracing::warn!(repo = %target, "the source has no refs: deleting every ref of this replica");
            delete_all_refs(git, &target.path).await?
        }
    }
    set_head(git, &target.path, &source.head).await
}

/// Deletes every ref, each with its current value as the expected old one.
async fn delete_all_refs(git: &Git, repo: &Path) -> Result<(), NodeError> {
    let oid_len = names::oid_len(git, repo).await?;
    let zero = "0".repeat(oid_len);
    let (out, exit) = git
        .command(["for-each-ref", "--format=%(objectname) %(refname)"])
        .git_dir(repo)
        .output(256 << 20)
        .await?;
    exit.check()?;
    let updates: Vec<RefUpdate> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(o, n)| RefUpdate {
            name: n.to_owned(),
            old: o.to_owned(),
            new: zero.clone(),
        })
        .collect();
    update::apply(git, repo, &WriteContext::Maintenance, &updates)
        .await
        .map_err(|f| NodeError::Aborted(format!("pruning refs: {f}")))
}

/// Points HEAD where the source's points, if it is not there already.
pub async fn set_head(git: &Git, repo: &Path, head: &str) -> Result<(), NodeError> {
    if head.is_empty() || !names::valid_ref_name(head) {
        // A detached or odd HEAD on the source: leave ours alone.
        return Ok(());
    }
    set_head_with(git, repo, head, &WriteContext::Maintenance).await
}

/// Points the HEAD symref at `head` as the write `ctx` (unchanged HEAD: no git write).
pub async fn set_head_with(
    git: &Git,
    repo: &Path,
    head: &str,
    ctx: &WriteContext,
) -> Result<(), NodeError> {
    let (out, _) = git
        .command(["symbolic-ref", "--quiet", "HEAD"])
        .git_dir(repo)
        .output(4096)
        .await?;
    if String::from_utf8_lossy(&out).trim() == head {
        return Ok(());
    }
    git.command(["symbolic-ref", "HEAD"])
        .arg(head)
        .git_dir(repo)
        .write_in(ctx)
        .status()
        .await?
        .check()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_missing_a_ref_the_source_has_is_caught() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let has = names(&["refs/heads/main", "refs/heads/moving", "refs/tags/v1"]);
        // git left out the ref that moved while it wrote the bundle.
        let carried = names(&["HEAD", "refs/heads/main", "refs/tags/v1"]);
        assert_eq!(missing_from_bundle(&has, &carried), ["refs/heads/moving"]);
        // Complete (HEAD is not a ref the listing returns): nothing missing.
        let carried = names(&[
            "HEAD",
            "refs/heads/main",
            "refs/heads/moving",
            "refs/tags/v1",
        ]);
        assert!(missing_from_bundle(&has, &carried).is_empty());
        // Refs the source deleted after the bundle are simply not asked for.
        assert!(missing_from_bundle(&names(&["refs/heads/main"]), &carried).is_empty());
        // An empty source after an empty-bundle refusal: nothing missing; one that got a
        // ref meanwhile: that ref.
        assert!(missing_from_bundle(&[], &[]).is_empty());
        assert_eq!(
            missing_from_bundle(&names(&["refs/heads/new"]), &[]),
            ["refs/heads/new"]
        );
    }

    #[test]
    fn only_the_empty_bundle_refusal_means_the_source_has_no_refs() {
        let empty = Status::failed_precondition(
            "refusing to create empty bundle: the repository has no refs",
        );
        assert!(source_is_empty(&empty));
        let gitaly = Status::failed_precondition("CreateBundle: refusing to create empty bundle");
        assert!(source_is_empty(&gitaly));
        let other = Status::failed_precondition("git bundle failed: fatal: bad object");
        assert!(!source_is_empty(&other));
        let behind = Status::failed_precondition("replica is behind; another serves reads");
        assert!(!source_is_empty(&behind));
        assert!(!source_is_empty(&Status::unavailable(
            "refusing to create empty bundle"
        )));
    }
}
