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
    let code = if server.drain(grace, timeout).await {
        0
    } else {
        EXIT_DRAIN_CUT
    };
    exit_within(EXIT_GRACE, code);
    std::process::ExitCode::from(code)
}

/// How long the runtime's shutdown after the drain may take before the process exits
/// regardless.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Exits with `code` after `grace` even if the runtime's shutdown (which waits for
/// blocking tasks) has not finished by then: the drain is over, nothing may hold the
/// exit past what `drain_timeout_secs` promised.
fn exit_within(grace: std::time::Duration, code: u8) {
    std::thread::spawn(move || {
        std::thread::sleep(grace);
        std::process::exit(code.into());
    });
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
