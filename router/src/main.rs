//! `refvote-router --config FILE`: serves the Gitaly-compatible gRPC front until
//! SIGTERM or SIGINT, then drains (`drain_grace_secs`, `drain_timeout_secs`; see
//! [`RouterServer::drain`]) and exits 0, or 75 ([`EXIT_DRAIN_CUT`]) when
//! `drain_timeout_secs` ran out and calls in flight were cut.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;
use refvote_router::server::EXIT_DRAIN_CUT;
use refvote_router::{Config, RouterServer};

#[derive(Parser)]
#[command(
    version,
    about = "refvote's gRPC front: routes Gitaly calls to the replicas of each repository"
)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short, default_value = "/etc/refvote/router.toml")]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("refvote-router: {e}");
            // EX_USAGE: the configuration, not the environment, is wrong.
            std::process::exit(64);
        }
    };
    if args.check_config {
        println!("{}: ok", args.config.display());
        return std::process::ExitCode::SUCCESS;
    }
    refvote_telemetry::logging::init();
    let server = match RouterServer::start(&config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("refvote-router: {:#}", anyhow::Error::from(e));
            std::process::exit(1);
        }
    };
    wait_for_signal().await;
    let (grace, timeout) = config.drain();
    tracing::info!("SIGTERM: draining");
    if server.drain(grace, timeout).await {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(EXIT_DRAIN_CUT)
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
