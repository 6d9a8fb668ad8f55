//! `refvote-psync`: partition sync on its own (`produce`, `consume`, `list`,
//! `keygen`), for hosts without the rest of refvote and for the crate's tests; the
//! same commands as `votingctl partition-sync`.
#![forbid(unsafe_code)]

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
    refvote_psync::cli::init_logging();
    std::process::exit(refvote_psync::cli::run(args.command));
}
