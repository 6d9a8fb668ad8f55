//! A stand-in for `ssh` that fetches the way gitlab-shell does:
//! `GIT_SSH_COMMAND=ssh-sidechannel GIT_SSH_VARIANT=ssh git clone ssh://host/group/p.git`.
//! git runs it as `ssh-sidechannel [-o SendEnv=GIT_PROTOCOL] <host> "git-upload-pack
//! '<path>'"`; it dials with the backchannel handshake and calls
//! `SSHUploadPackWithSidechannel`, its stdin and stdout being git's (see
//! `refvote_tests::gitlab_client`).
//!
//! Environment:
//! - `REFVOTE_SSH_ADDR`: `host:port` of a router's or node's gRPC port (required).
//! - `REFVOTE_SSH_CA`: a CA certificate (PEM) to dial TLS with; unset: plaintext.
//! - `REFVOTE_SSH_TOKEN`: the shared secret to sign calls with (Gitaly's v2 token).
//! - `REFVOTE_SSH_STORAGE` (default `default`), `GIT_PROTOCOL` (as sshd passes it with
//!   `SendEnv`).
//! - `REFVOTE_SSH_STATS`: a file the negotiation statistics are written to as
//!   `key=value` lines.
//!
//! Exit status: 0 when the call succeeded; 128 with the call's status on stderr
//! otherwise (gitlab-shell exits non-zero and git reports the remote hung up).

use std::process::ExitCode;

use anyhow::Context;
use refvote_tests::gitlab_client::GitlabClient;

/// `git-upload-pack '/group/p.git'` → `group/p.git`.
fn repository(command: &str) -> anyhow::Result<String> {
    let (service, path) = command
        .split_once(' ')
        .with_context(|| format!("unexpected remote command {command:?}"))?;
    anyhow::ensure!(
        service == "git-upload-pack",
        "only git-upload-pack goes over a sidechannel, not {service}"
    );
    Ok(path
        .trim()
        .trim_matches('\'')
        .trim_start_matches('/')
        .to_owned())
}

async fn run() -> anyhow::Result<()> {
    let command = std::env::args()
        .next_back()
        .context("usage: ssh-sidechannel <host> <command>")?;
    let relative = repository(&command)?;
    let addr = std::env::var("REFVOTE_SSH_ADDR")
        .context("REFVOTE_SSH_ADDR is not set")?
        .parse()
        .context("REFVOTE_SSH_ADDR is not host:port")?;
    let ca = std::env::var_os("REFVOTE_SSH_CA").map(std::path::PathBuf::from);
    let token = std::env::var("REFVOTE_SSH_TOKEN").ok();
    let mut client = GitlabClient::dial(addr, ca.as_deref(), token.as_deref()).await?;
    if let Ok(storage) = std::env::var("REFVOTE_SSH_STORAGE") {
        client.storage = storage;
    }
    let protocol = std::env::var("GIT_PROTOCOL").unwrap_or_default();
    let stats = client
        .ssh_upload_pack(
            &relative,
            &protocol,
            tokio::io::stdin(),
            tokio::io::stdout(),
            tokio::io::stderr(),
        )
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
    if let Ok(path) = std::env::var("REFVOTE_SSH_STATS") {
        let text = format!(
            "wants={}\nhaves={}\nshallows={}\npackets={}\npayload_size={}\ncaps={}\ndeepen={}\nfilter={}\n",
            stats.wants,
            stats.haves,
            stats.shallows,
            stats.packets,
            stats.payload_size,
            stats.caps.join(" "),
            stats.deepen,
            stats.filter
        );
        std::fs::write(&path, text).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ssh-sidechannel: {e:#}");
            ExitCode::from(128)
        }
    }
}
