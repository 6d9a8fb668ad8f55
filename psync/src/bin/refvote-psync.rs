//! `refvote-psync`: partition sync on its own (`produce`, `consume`, `list`,
//! `keygen`), for hosts without the rest of refvote and for the crate's tests; the
//! same commands as `votingctl partition-sync`.
#![forbid(unsafe_code)]

use std::io::IsTerminal;

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Carry git repositories through object storage, encrypted and incremental"
)]
struct Args {
    #[command(subcommand)]
    command: refvote_psync::cli::Command,
}

fn main() {
    let args = Args::parse();
    // Warnings by default (a timer's journal); the TLS verifier's own error lines are
    // left out: the run's error says the same with what to do about it.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,rustls_platform_verifier=off")
            }),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(refvote_psync::cli::run(args.command));
}
