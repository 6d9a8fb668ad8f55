//! Where the cluster is ([`Target`]: a votingd config or etcd endpoints) and the
//! connections the commands share ([`Ctl`]: etcd, a signed channel to a node or a
//! router), with the errors and the table and JSON output they print.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use refvote_auth::{Secret, Signed};
use refvote_cluster::repository::RepoView;
use refvote_cluster::settings::EtcdSettings;
use refvote_cluster::{RepoId, Store, StoreConfig};
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{CalculateChecksumRequest, Repository};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use votingd::Config;

/// Where the cluster is: a votingd config (its etcd settings, the `[auth]` secret and
/// the `[tls]` CA, all used as votingd uses them) or etcd endpoints given directly, and
/// optionally a router.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// A node's votingd configuration: its [etcd] and [auth] sections are used.
    #[arg(
        long,
        short,
        default_value = "/etc/refvote/votingd.toml",
        global = true
    )]
    pub config: PathBuf,
    /// etcd endpoints (comma-separated), instead of the config's.
    #[arg(long, global = true)]
    pub etcd: Option<String>,
    /// The etcd key prefix, with --etcd.
    #[arg(long, default_value = "/refvote/", global = true)]
    pub prefix: String,
    /// A router's gRPC address (host:port), instead of one registered in etcd.
    #[arg(long, global = true)]
    pub router: Option<String>,
    /// Print JSON for scripts.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Target {
    /// The cluster a node's votingd.toml names (its etcd, `[auth]` and `[tls]`), with
    /// no router chosen and table output.
    pub fn from_config(config: &std::path::Path) -> Target {
        Target {
            config: config.to_owned(),
            etcd: None,
            prefix: String::new(),
            router: None,
            json: false,
        }
    }
}

/// A connected cluster.
pub struct Ctl {
    pub store: Store,
    pub secret: Option<Arc<Secret>>,
    /// The config's `[tls] ca_path` (and client identity), for `tls://` nodes and
    /// routers that serve TLS.
    pub tls: Option<ClientTlsConfig>,
    pub router: Option<String>,
    pub json: bool,
}

impl Ctl {
    pub async fn connect(target: &Target) -> anyhow::Result<Ctl> {
        let (config, secret, tls) = match &target.etcd {
            Some(endpoints) => {
                let endpoints: Vec<String> = endpoints
                    .split(',')
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect();
                if endpoints.is_empty() {
                    bail!("--etcd needs at least one endpoint, e.g. --etcd http://127.0.0.1:2379");
                }
                let settings = EtcdSettings {
                    endpoints,
                    prefix: target.prefix.clone(),
                    ..toml::from_str::<EtcdSettings>("").context("etcd defaults")?
                };
                (settings.store_config(), None, None)
            }
            None => {
                let config = Config::load(&target.config).with_context(|| {
                    format!(
                        "pass --etcd ENDPOINTS, or --config with a node's votingd.toml (read {})",
                        target.config.display()
                    )
                })?;
                let secret = config
                    .auth
                    .policy()
                    .map_err(|(key, reason)| anyhow::anyhow!("{key}: {reason}"))?
                    .map(|p| p.secret);
                let tls = config
                    .tls
                    .client()
                    .map_err(|(key, reason)| anyhow::anyhow!("{key}: {reason}"))?;
                (config.etcd.store_config(), secret, tls)
            }
        };
        let store = connect_store(&config).await?;
        Ok(Ctl {
            store,
            secret,
            tls,
            router: target.router.clone(),
            json: target.json,
        })
    }

    /// A repository's records, or an error that names it and says how to list them.
    pub async fn view(&self, repo: &RepoId) -> anyhow::Result<RepoView> {
        match self.store.repo_view(repo).await {
            Ok(v) => Ok(v),
            Err(refvote_cluster::Error::UnknownRepo(_)) => bail!(
                "repository {repo} is not registered in etcd; `votingctl repos list` shows those that are"
            ),
            Err(e) => Err(etcd_error(e)),
        }
    }

    /// A channel to `node`'s gRPC service (as registered in etcd), signed with the
    /// config's secret, and the node's storage name.
    pub fn node_channel(
        &self,
        view: &RepoView,
        node: &str,
    ) -> anyhow::Result<(Signed<Channel>, String)> {
        let Some((record, _)) = view.live_nodes.get(node) else {
            bail!("node {node} is down (it holds no etcd lease); start it and try again");
        };
        let storage = record
            .storages
            .first()
            .with_context(|| format!("node {node} registers no storage"))?;
        let (url, tls) = refvote_auth::tls::node_url(&record.address)
            .map_err(|e| anyhow::anyhow!("node {node}: {e}"))?;
        let mut endpoint = Channel::from_shared(url)?;
        if tls {
            let Some(config) = self.tls.clone() else {
                bail!(
                    "node {node} serves TLS ({}); pass --config with a votingd.toml whose [tls] ca_path trusts it",
                    record.address
                );
            };
            endpoint = endpoint.tls_config(config)?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok((Signed::new(channel, self.secret.clone()), storage.clone()))
    }

    /// `CalculateChecksum` of `node`'s replica of `repo`.
    pub async fn checksum(&self, view: &RepoView, node: &str) -> anyhow::Result<String> {
        let (channel, storage) = self.node_channel(view, node)?;
        let mut request = tonic::Request::new(CalculateChecksumRequest {
            repository: Some(Repository {
                storage_name: storage,
                relative_path: view.record.repo.relative_path.clone(),
                ..Default::default()
            }),
        });
        request.set_timeout(Duration::from_secs(120));
        match RepositoryServiceClient::new(channel)
            .calculate_checksum(request)
            .await
        {
            Ok(r) => Ok(r.into_inner().checksum),
            Err(s) => bail!(
                "node {node}: CalculateChecksum of {}: {:?}: {}",
                view.record.repo,
                s.code(),
                s.message()
            ),
        }
    }

    /// The router to call: `--router`, else the first registered router that accepts
    /// a connection.
    pub async fn router_channel(&self) -> anyhow::Result<Signed<Channel>> {
        let candidates = match &self.router {
            Some(r) => vec![r.clone()],
            None => {
                let (entries, _) = self
                    .store
                    .get_prefix(&format!("{}routers/", self.store.keys().prefix()))
                    .await
                    .map_err(etcd_error)?;
                let v: Vec<String> = entries
                    .iter()
                    .map(|e| String::from_utf8_lossy(&e.value).into_owned())
                    .collect();
                if v.is_empty() {
                    bail!(
                        "no router is registered in etcd; start refvote-router, or pass --router HOST:PORT"
                    );
                }
                v
            }
        };
        let mut errors = Vec::new();
        for addr in &candidates {
            // A bare host:port: over TLS first when the config trusts a CA, then plain.
            let urls = if addr.contains("://") {
                vec![addr.clone()]
            } else if self.tls.is_some() {
                vec![format!("https://{addr}"), format!("http://{addr}")]
            } else {
                vec![format!("http://{addr}")]
            };
            for url in urls {
                let mut endpoint = Endpoint::from_shared(url.clone())
                    .with_context(|| format!("router address {addr:?}"))?
                    .connect_timeout(Duration::from_secs(3))
                    .tcp_nodelay(true);
                if url.starts_with("https://") {
                    let Some(config) = self.tls.clone() else {
                        bail!(
                            "router {addr} is reached over TLS; pass --config with a votingd.toml whose [tls] ca_path trusts it"
                        );
                    };
                    endpoint = endpoint.tls_config(config)?;
                }
                match endpoint.connect().await {
                    Ok(c) => return Ok(Signed::new(c, self.secret.clone())),
                    Err(e) => errors.push(format!("{url}: {e}")),
                }
            }
        }
        bail!(
            "no router answers ({}); start one, or pass --router HOST:PORT",
            errors.join("; ")
        )
    }

    /// Prints `value` as JSON, or `table` for people.
    pub fn print(&self, value: &impl serde::Serialize, table: impl FnOnce() -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).expect("serializable")
            );
        } else {
            print!("{}", table());
        }
    }
}

async fn connect_store(config: &StoreConfig) -> anyhow::Result<Store> {
    let store = Store::connect(config).await.with_context(|| {
        format!(
            "cannot reach etcd at {}; check that it runs, or pass --etcd ENDPOINTS",
            config.endpoints.join(",")
        )
    })?;
    // Connecting is lazy: one read makes an unreachable etcd an error here.
    store.get(&store.keys().reaper()).await.with_context(|| {
        format!(
            "etcd at {} does not answer; check that a majority of its members run",
            config.endpoints.join(",")
        )
    })?;
    Ok(store)
}

pub fn etcd_error(e: refvote_cluster::Error) -> anyhow::Error {
    anyhow::anyhow!("etcd: {e}; check that a majority of etcd members run and retry")
}

/// Parses `<virtual storage>/<relative path>`.
pub fn parse_repo(s: &str) -> anyhow::Result<RepoId> {
    RepoId::parse(s).map_err(|e| {
        anyhow::anyhow!(
            "repository {s:?}: {e}; name it as <storage>/<relative path>, e.g. default/group/project.git"
        )
    })
}

/// A left-aligned text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_need_their_storage() {
        let r = parse_repo("default/group/p.git").unwrap();
        assert_eq!(
            (r.virtual_storage.as_str(), r.relative_path.as_str()),
            ("default", "group/p.git")
        );
        let e = parse_repo("p.git").unwrap_err().to_string();
        assert!(e.contains("<storage>/<relative path>"), "{e}");
        assert!(parse_repo("default/../x").is_err());
    }

    #[test]
    fn tables_align_their_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["wide cell".into(), "x".into()],
                vec!["b".into(), "y".into()],
            ],
        );
        assert_eq!(t, "A          LONGER\nwide cell  x\nb          y\n");
    }
}
