//! `votingctl`: inspect a storage node. `votingctl status` asks the local votingd over
//! its vote socket and prints a table, or JSON with `--json`; it exits 0 only when the
//! node is healthy.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use votingd::Config;

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

fn run(args: Args) -> anyhow::Result<i32> {
    match args.command {
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
