//! Incremental repair (DESIGN.md §4): a replica that still has a usable base (refs whose
//! objects are all here) fetches only what it lacks from its source with git's own
//! negotiation, instead of copying the source's whole repository as a bundle.
//!
//! `git fetch` runs here against the source's `SSHUploadPack` over this node's signed
//! (and, for a `tls://` source, TLS) gRPC channel: git's `--upload-pack` is this
//! daemon's own executable in its bridge mode ([`BRIDGE_ARG`]), which copies git's
//! pipes to a Unix socket in the storage's private area; the node relays that socket
//! to the source's RPC and counts the bytes each way. The fetch is the bundle repair's
//! fetch with another transport: `+refs/*:refs/*`, `--prune`, `--atomic` (one ref
//! transaction: every ref the source advertised, and the deletion of every ref it
//! lacks, or nothing), so the all-refs-or-nothing rule and the fencing are the same:
//! the router read the generation before this advertisement, and records the replica
//! only if it has not moved since.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use refvote_auth::Signed;
use refvote_proto::gitaly::ssh_service_client::SshServiceClient;
use refvote_proto::gitaly::{Repository, SshUploadPackRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tonic::Status;
use tonic::transport::Channel;

use crate::error::NodeError;
use crate::git::Git;
use crate::storage::{RepoPath, Storages, TempDir};
use crate::tx::{WriteContext, WriteIn};

/// The first argument that makes the daemon's executable the upload-pack bridge:
/// `<exe> repair-upload-pack-bridge <socket> [<path git adds>]`.
pub const BRIDGE_ARG: &str = "repair-upload-pack-bridge";

/// How much one read of git's side of the bridge takes.
const CHUNK: usize = 64 * 1024;

/// What an incremental fetch moved, for the log and the tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// Bytes the source sent (its ref advertisement and the pack).
    pub from_source: u64,
    /// Bytes sent to the source (wants, haves, done).
    pub to_source: u64,
}

/// Whether the replica at `repo` is a base worth negotiating from: it has refs, and
/// every ref's object is here (`for-each-ref` fails on a missing one). Objects lost
/// under the refs, or no refs at all: `false`, and the whole copy is taken.
pub async fn usable_base(git: &Git, repo: &Path) -> Result<bool, NodeError> {
    let (out, exit) = git
        .command(["for-each-ref", "--format=%(objecttype)"])
        .git_dir(repo)
        .output(64 << 20)
        .await?;
    if !exit.success() {
        tracing::info!(error = %exit.stderr.trim(), "refs point at missing objects: no base to fetch onto");
        return Ok(false);
    }
    let types = String::from_utf8_lossy(&out);
    Ok(types.lines().next().is_some() && types.lines().all(|t| !t.trim().is_empty()))
}

/// The executable git runs as the bridge: this process's own (`votingd`).
fn bridge_exe() -> Result<PathBuf, NodeError> {
    std::env::current_exe().map_err(|e| NodeError::io("finding this executable", e))
}

/// Single-quotes `s` for the shell git runs `--upload-pack` with.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Fetches what `target` lacks from `source` over `channel` and sets every ref to the
/// source's (see the module's text). Nothing is changed unless git's one ref
/// transaction commits.
pub async fn fetch(
    git: &Git,
    channel: &Signed<Channel>,
    source: Repository,
    target: &RepoPath,
) -> Result<Moved, Status> {
    let exe = bridge_exe()?;
    let dir = TempDir(Storages::tmp_dir(&target.root).join(format!(
        "fetch-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )));
    std::fs::create_dir_all(&dir.0)
        .map_err(|e| NodeError::io(format!("creating {}", dir.0.display()), e))?;
    let socket = dir.0.join("s");
    let listener = UnixListener::bind(&socket)
        .map_err(|e| NodeError::io(format!("listening on {}", socket.display()), e))?;
    let upload_pack = format!(
        "{} {} {}",
        shell_quote(&exe.to_string_lossy()),
        BRIDGE_ARG,
        shell_quote(&socket.to_string_lossy())
    );
    let from_source = Arc::new(AtomicU64::new(0));
    let to_source = Arc::new(AtomicU64::new(0));
    let relay = tokio::spawn(relay(
        listener,
        channel.clone(),
        source,
        from_source.clone(),
        to_source.clone(),
    ));
    let mut upload_pack_flag = std::ffi::OsString::from("--upload-pack=");
    upload_pack_flag.push(&upload_pack);
    let fetched = git
        .command([
            "fetch",
            "--quiet",
            "--atomic",
            "--prune",
            "--no-tags",
            "--no-write-fetch-head",
        ])
        // The bridge speaks to upload-pack as git's v0 transport does (the source's
        // RPC gets no GIT_PROTOCOL): the whole ref advertisement, which is what
        // setting every ref needs anyway.
        .internal_config("protocol.version=0")
        .git_dir(&target.path)
        .write_in(&WriteContext::Maintenance)
        .arg(upload_pack_flag)
        .arg(&dir.0)
        .arg("+refs/*:refs/*")
        .status()
        .await;
    // git has exited: whatever the relay still does is of no use.
    let relayed = if relay.is_finished() {
        relay.await.ok()
    } else {
        relay.abort();
        None
    };
    let moved = Moved {
        from_source: from_source.load(Ordering::Relaxed),
        to_source: to_source.load(Ordering::Relaxed),
    };
    match fetched {
        Ok(exit) if exit.success() => Ok(moved),
        Ok(exit) => {
            let relay_error = match relayed {
                Some(Err(e)) => format!(" (relay to the source: {e})"),
                _ => String::new(),
            };
            Err(Status::unavailable(format!(
                "fetching from the source failed: {}{relay_error}",
                exit.stderr.trim()
            )))
        }
        Err(e) => Err(NodeError::from(e).into()),
    }
}

/// Takes git's one connection on `listener` and relays it to the source's
/// SSHUploadPack until the source's answer ends.
async fn relay(
    listener: UnixListener,
    channel: Signed<Channel>,
    source: Repository,
    from_source: Arc<AtomicU64>,
    to_source: Arc<AtomicU64>,
) -> Result<(), String> {
    let (conn, _) = listener
        .accept()
        .await
        .map_err(|e| format!("accepting git's bridge: {e}"))?;
    let (mut reader, mut writer) = conn.into_split();
    let (tx, rx) = tokio::sync::mpsc::channel::<SshUploadPackRequest>(8);
    tx.send(SshUploadPackRequest {
        repository: Some(source),
        ..Default::default()
    })
    .await
    .map_err(|_| "the request stream closed".to_owned())?;
    // git's side to the source: ends (half-closing the request stream) when git
    // closes its pipe.
    let feed = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    to_source.fetch_add(n as u64, Ordering::Relaxed);
                    let msg = SshUploadPackRequest {
                        stdin: buf[..n].to_vec(),
                        ..Default::default()
                    };
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let result = async {
        let mut answer = SshServiceClient::new(channel)
            .ssh_upload_pack(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("SSHUploadPack: {}", s.message()))?
            .into_inner();
        let mut stderr = Vec::new();
        while let Some(m) = answer
            .message()
            .await
            .map_err(|s| format!("SSHUploadPack: {}", s.message()))?
        {
            if !m.stdout.is_empty() {
                from_source.fetch_add(m.stdout.len() as u64, Ordering::Relaxed);
                writer
                    .write_all(&m.stdout)
                    .await
                    .map_err(|e| format!("writing to git: {e}"))?;
            }
            stderr.extend_from_slice(&m.stderr);
            if let Some(exit) = m.exit_status
                && exit.value != 0
            {
                return Err(format!(
                    "the source's upload-pack exited with {}: {}",
                    exit.value,
                    String::from_utf8_lossy(&stderr).trim()
                ));
            }
        }
        let _ = writer.shutdown().await;
        Ok(())
    }
    .await;
    feed.abort();
    result
}

/// The bridge's body, in the process git started as `--upload-pack`: copies stdin to
/// the node's socket and the socket to stdout until both ends are done. Returns the
/// exit code.
pub fn run_bridge(args: &[String]) -> i32 {
    use std::io::{Read, Write};
    let Some(socket) = args.first() else {
        eprintln!("{BRIDGE_ARG}: the socket path is missing");
        return 64;
    };
    let conn = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{BRIDGE_ARG}: connecting to {socket}: {e}");
            return 69;
        }
    };
    let Ok(mut up) = conn.try_clone() else {
        eprintln!("{BRIDGE_ARG}: cloning the socket");
        return 71;
    };
    let feed = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut down = conn;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match down.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    return 74;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return 74,
        }
    }
    // The source is done: git has what it needs; its pipe to us may stay open.
    drop(feed);
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_gets_paths_as_one_word() {
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
