//! `votingctl`: inspect and operate refvote, and run a local cluster. `votingctl
//! status` asks the local votingd over its vote socket and prints a table, or JSON
//! with `--json`, then the cluster as etcd sees it; it exits 0 only when the node is
//! healthy. `votingctl cluster up|down|
//! stop|start` runs a whole cluster on this machine ([`refvote_launcher`]). The
//! operator commands (`repos list`, `replicas`, `verify`, `dataloss`,
//! `accept-dataloss`, `track`) talk to etcd, routers and nodes (this crate's library);
//! `partition-sync produce|consume|list|keygen` carries repositories between clusters.
#![forbid(unsafe_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use refvote_launcher::UpOptions;
use votingctl::{Ctl, Target};
use votingd::Config;

#[derive(Parser)]
#[command(version, about = "Inspect and operate refvote")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// This node's health (etcd, lease, vote socket, hooks, transactions, counters;
    /// the exit status), then the cluster as etcd sees it.
    Status {
        /// votingd's configuration file (to find the socket).
        #[arg(long, short, default_value = "/etc/refvote/votingd.toml")]
        config: PathBuf,
        /// The vote socket, instead of reading it from the config.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Leave out the cluster view read from etcd (members, nodes, routers,
        /// repositories with a replica outdated or down).
        #[arg(long)]
        no_cluster: bool,
    },
    /// Every registered repository: replicas, generation, outdated/repairing counts.
    Repos {
        #[command(subcommand)]
        action: ReposAction,
        #[command(flatten)]
        target: Target,
    },
    /// A repository's replicas, through a router's admin service.
    Replicas {
        #[command(subcommand)]
        action: ReplicasAction,
        #[command(flatten)]
        target: Target,
    },
    /// Compare the up-to-date replicas' checksums (all repositories, or one); mark the
    /// ones that differ from the majority outdated so repair copies them again. Exits 1
    /// when some differed or could not be checked.
    Verify {
        /// `<storage>/<relative path>`; all repositories when omitted.
        repo: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Repositories whose up-to-date replicas are all on nodes that are down. Exits 1
    /// when there are some.
    Dataloss {
        #[command(flatten)]
        target: Target,
    },
    /// Make one live replica of a repository that lost its up-to-date replicas the
    /// up-to-date one, at a new generation; the others are repaired from it. Writes the
    /// lost replicas had and it lacks are gone for good.
    AcceptDataloss {
        repo: String,
        /// The node whose copy is kept.
        #[arg(long)]
        authoritative: String,
        #[command(flatten)]
        target: Target,
    },
    /// Adopt a repository that already exists on disk on some nodes: register it with
    /// replicas there. The first node's copy is kept; others that differ are repaired.
    Track {
        repo: String,
        /// The nodes holding it, comma-separated; the first one's copy is authoritative.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Partition sync: carry chosen repositories through S3-compatible object
    /// storage, encrypted and incremental, from this cluster to another refvote
    /// cluster (voted in through its router) or any git remote.
    #[command(name = "partition-sync")]
    PartitionSync {
        #[command(subcommand)]
        command: refvote_psync::cli::Command,
    },
    /// A complete local cluster on loopback: etcd, votingd nodes and a router.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
}

#[derive(Subcommand)]
enum ReposAction {
    /// One line per repository.
    List,
}

#[derive(Subcommand)]
enum ReplicasAction {
    /// Every replica: state, generation, checksum, whether its node is up.
    Get { repo: String },
    /// Add replicas: N more on the least loaded live nodes, or on the named nodes.
    Add {
        repo: String,
        #[arg(long)]
        count: Option<u32>,
        /// A node that must get a replica (repeatable).
        #[arg(long = "node")]
        nodes: Vec<String>,
    },
    /// Remove the replicas on the named nodes (records, then the copies on disk).
    Remove {
        repo: String,
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
    },
    /// Lock writes and level every live replica with the majority's copy.
    Sync { repo: String },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Start etcd (from PATH), N nodes and a router on free loopback ports, each with
    /// its config and data under DIR; write DIR/cluster.env and DIR/<name>.pid. On a
    /// DIR that already holds a cluster, start its stopped members.
    Up {
        /// The cluster's directory (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Storage nodes (votingd), named node1..nodeN.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// etcd members: 1 (named etcd), 3 or 5 (etcd1..etcdM).
        #[arg(long, default_value_t = 1)]
        etcd_members: usize,
        /// The loopback address every process binds.
        #[arg(long, default_value = "127.0.0.1")]
        host: Ipv4Addr,
        /// Seconds each stage (etcd, nodes, router) may take to become healthy.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// GitLab's URL (its internal API is below it): written into every node's
        /// `[gitlab] url`, so pushes and operations by a GitLab user are checked there.
        #[arg(long, requires = "gitlab_secret_file")]
        gitlab_url: Option<String>,
        /// The file holding GitLab's shared secret (`[gitlab] secret_file`).
        #[arg(long, requires = "gitlab_url")]
        gitlab_secret_file: Option<PathBuf>,
    },
    /// Stop every process of the cluster in DIR (SIGTERM, then SIGKILL after 10 s).
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop one member (node2, router, etcd, etcd1...).
    Stop {
        #[arg(long)]
        dir: PathBuf,
        name: String,
    },
    /// Start one stopped member again with its same config and data.
    Start {
        #[arg(long)]
        dir: PathBuf,
        name: String,
        /// Seconds it may take to become healthy.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("votingctl: {e:#}");
            std::process::exit(1);
        }
    }
}

fn cluster(action: ClusterAction) -> anyhow::Result<i32> {
    let out = &mut std::io::stdout();
    match action {
        ClusterAction::Up {
            dir,
            nodes,
            etcd_members,
            host,
            timeout,
            gitlab_url,
            gitlab_secret_file,
        } => {
            let gitlab = gitlab_url
                .zip(gitlab_secret_file)
                .map(|(url, secret_file)| refvote_launcher::GitlabOptions {
                    url,
                    // Absolute, since the nodes do not run in this directory.
                    secret_file: std::path::absolute(&secret_file).unwrap_or(secret_file),
                });
            refvote_launcher::up(
                &UpOptions {
                    dir,
                    nodes,
                    etcd_members,
                    host,
                    timeout: Duration::from_secs(timeout),
                    gitlab,
                },
                out,
            )?;
        }
        ClusterAction::Down { dir } => refvote_launcher::down(&dir, out)?,
        ClusterAction::Stop { dir, name } => refvote_launcher::stop(&dir, &name, out)?,
        ClusterAction::Start { dir, name, timeout } => {
            refvote_launcher::start(&dir, &name, Duration::from_secs(timeout), out)?
        }
    }
    Ok(0)
}

/// The operator commands: one tokio runtime, one etcd connection.
fn operate(
    target: &Target,
    work: impl AsyncFnOnce(&Ctl) -> anyhow::Result<i32>,
) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ctl = Ctl::connect(target).await?;
        work(&ctl).await
    })
}

fn run(args: Args) -> anyhow::Result<i32> {
    match args.command {
        Command::Cluster { action } => cluster(action),
        Command::PartitionSync { command } => {
            refvote_psync::cli::init_logging();
            Ok(refvote_psync::cli::run_with(
                command,
                &votingctl::partition_sync::Clusters,
            ))
        }
        Command::Repos { action, target } => match action {
            ReposAction::List => operate(&target, async |c| votingctl::repos::list(c).await),
        },
        Command::Replicas { action, target } => match action {
            ReplicasAction::Get { repo } => {
                let repo = votingctl::parse_repo(&repo)?;
                operate(&target, async |c| votingctl::replicas::get(c, &repo).await)
            }
            ReplicasAction::Add { repo, count, nodes } => {
                let repo = votingctl::parse_repo(&repo)?;
                operate(&target, async |c| {
                    votingctl::replicas::add(c, &repo, count, nodes).await
                })
            }
            ReplicasAction::Remove { repo, nodes } => {
                let repo = votingctl::parse_repo(&repo)?;
                operate(&target, async |c| {
                    votingctl::replicas::remove(c, &repo, nodes).await
                })
            }
            ReplicasAction::Sync { repo } => {
                let repo = votingctl::parse_repo(&repo)?;
                operate(&target, async |c| votingctl::replicas::sync(c, &repo).await)
            }
        },
        Command::Verify { repo, target } => {
            let repo = repo.as_deref().map(votingctl::parse_repo).transpose()?;
            operate(&target, async |c| votingctl::data::verify(c, repo).await)
        }
        Command::Dataloss { target } => {
            operate(&target, async |c| votingctl::repos::dataloss(c).await)
        }
        Command::AcceptDataloss {
            repo,
            authoritative,
            target,
        } => {
            let repo = votingctl::parse_repo(&repo)?;
            operate(&target, async |c| {
                votingctl::data::accept_dataloss(c, &repo, &authoritative).await
            })
        }
        Command::Track {
            repo,
            nodes,
            target,
        } => {
            let repo = votingctl::parse_repo(&repo)?;
            operate(&target, async |c| {
                votingctl::data::track(c, &repo, &nodes).await
            })
        }
        Command::Status {
            config,
            socket,
            json,
            no_cluster,
        } => {
            let socket = match socket {
                Some(s) => s,
                None => {
                    Config::load(&config)
                        .context("pass --socket, or --config with votingd's configuration")?
                        .vote
                        .socket_path
                }
            };
            // The cluster as etcd sees it, read by votingctl itself when the config is
            // readable; it does not change the exit status (that is the node's health).
            let view = config.is_file().then(|| cluster_view(&config, no_cluster));
            let view = view.flatten();
            match votingd::client::status(&socket) {
                Ok(status) => {
                    if json {
                        let mut doc = serde_json::to_value(&status)?;
                        add_view(&mut doc, view);
                        println!("{}", serde_json::to_string_pretty(&doc)?);
                    } else {
                        print!("{}", status.render());
                        print_view(view);
                    }
                    Ok(if status.healthy() { 0 } else { 1 })
                }
                Err(e) => {
                    let reason = format!(
                        "votingd is not answering on {}: {e:#}. Is it running? (systemctl status votingd)",
                        socket.display()
                    );
                    if json {
                        let mut doc = serde_json::json!({
                            "socket": { "path": socket.display().to_string(), "up": false },
                            "error": reason,
                        });
                        add_view(&mut doc, view);
                        println!("{}", serde_json::to_string_pretty(&doc)?);
                    } else {
                        eprintln!("votingctl: {reason}");
                        print_view(view);
                    }
                    Ok(1)
                }
            }
        }
    }
}

type View = anyhow::Result<votingctl::view::ClusterView>;

/// The cluster view for `status`, bounded in time; `None` with `--no-cluster`.
fn cluster_view(config: &std::path::Path, skip: bool) -> Option<View> {
    if skip {
        return None;
    }
    let target = Target::from_config(config);
    Some(operate_value(async || {
        tokio::time::timeout(Duration::from_secs(10), async {
            let c = Ctl::connect(&target).await?;
            votingctl::view::read(&c).await
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("etcd did not answer within 10 s")))
    }))
}

fn operate_value<T>(work: impl AsyncFnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(work())
}

fn add_view(doc: &mut serde_json::Value, view: Option<View>) {
    if let (Some(v), Some(map)) = (view, doc.as_object_mut()) {
        let value = match v {
            Ok(v) => serde_json::to_value(v).unwrap_or_default(),
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
        };
        map.insert("cluster_view".into(), value);
    }
}

fn print_view(view: Option<View>) {
    match view {
        Some(Ok(v)) => print!("{}", v.render()),
        Some(Err(e)) => println!("cluster (from etcd): unknown: {e:#}"),
        None => {}
    }
}
