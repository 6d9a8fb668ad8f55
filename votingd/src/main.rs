//! `votingd --config FILE`: runs the storage-node daemon until SIGTERM or SIGINT, then
//! drains (`drain_grace_secs`, `drain_timeout_secs`; see [`Daemon::drain`]) and exits 0,
//! or 75 ([`EXIT_DRAIN_CUT`]) when `drain_timeout_secs` ran out and calls in flight
//! were cut.
//! (`votingd repair-upload-pack-bridge SOCKET` is the pipe git runs as a repair
//! fetch's upload-pack; not for people.)
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;
use votingd::daemon::EXIT_DRAIN_CUT;
use votingd::{Config, Daemon};

#[derive(Parser)]
#[command(
    version,
    about = "refvote's storage-node daemon: votes ref updates through etcd"
)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short, default_value = "/etc/refvote/votingd.toml")]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // git runs this executable as the `--upload-pack` of a repair's fetch (see
    // refvote-node's incremental repair): a byte pipe to the node, nothing else.
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some(refvote_node::REPAIR_BRIDGE_ARG) {
        std::process::exit(refvote_node::run_repair_bridge(&raw[1..]));
    }
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("votingd: {e}");
            std::process::exit(64);
        }
    };
    if args.check_config {
        println!("{}: ok", args.config.display());
        return std::process::ExitCode::SUCCESS;
    }
    refvote_telemetry::logging::init();
    let (grace, timeout) = config.drain();
    let daemon = match Daemon::start(config).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("votingd: {:#}", anyhow::Error::from(e));
            std::process::exit(1);
        }
    };
    wait_for_signal().await;
    tracing::info!("SIGTERM: draining");
    // Returned, not exit(): the runtime is dropped first, so git children still
    // running under a cut call are killed rather than left behind.
    let code = if daemon.drain(grace, timeout).await {
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
