//! `votingctl`: inspect a storage node, and run a local cluster. `votingctl status`
//! asks the local votingd over its vote socket and prints a table, or JSON with
//! `--json`; it exits 0 only when the node is healthy. `votingctl cluster up|down|
//! stop|start` runs a whole cluster on this machine ([`votingd::local_cluster`]).
#![forbid(unsafe_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use votingd::Config;
use votingd::local_cluster::{self, UpOptions};

#[derive(Parser)]
#[command(version, about = "Inspect and operate refvote")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// This node's health: etcd, lease, vote socket, hooks, transactions, counters.
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
    },
    /// A complete local cluster on loopback: etcd, votingd nodes and a router.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
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
        } => {
            local_cluster::up(
                &UpOptions {
                    dir,
                    nodes,
                    etcd_members,
                    host,
                    timeout: Duration::from_secs(timeout),
                },
                out,
            )?;
        }
        ClusterAction::Down { dir } => local_cluster::down(&dir, out)?,
        ClusterAction::Stop { dir, name } => local_cluster::stop(&dir, &name, out)?,
        ClusterAction::Start { dir, name, timeout } => {
            local_cluster::start(&dir, &name, Duration::from_secs(timeout), out)?
        }
    }
    Ok(0)
}

fn run(args: Args) -> anyhow::Result<i32> {
    match args.command {
        Command::Cluster { action } => cluster(action),
        Command::Status {
            config,
            socket,
            json,
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
            match votingd::client::status(&socket) {
                Ok(status) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&status)?);
                    } else {
                        print!("{}", status.render());
                    }
                    Ok(if status.healthy() { 0 } else { 1 })
                }
                Err(e) => {
                    let reason = format!(
                        "votingd is not answering on {}: {e:#}. Is it running? (systemctl status votingd)",
                        socket.display()
                    );
                    if json {
                        let doc = serde_json::json!({
                            "socket": { "path": socket.display().to_string(), "up": false },
                            "error": reason,
                        });
                        println!("{}", serde_json::to_string_pretty(&doc)?);
                    } else {
                        eprintln!("votingctl: {reason}");
                    }
                    Ok(1)
                }
            }
        }
    }
}
