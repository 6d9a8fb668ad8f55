//! A stand-in for `ssh` that turns git's SSH transport into SSHService calls, the way
//! gitlab-shell does: `GIT_SSH_COMMAND=ssh-grpc GIT_SSH_VARIANT=simple git clone
//! ssh://node/group/project.git`. git runs it as `ssh-grpc <host> "<service> '<path>'"`.
//!
//! Environment:
//! - `REFVOTE_SSH_TARGETS`: comma-separated `http://host:port` of node gRPC services. A
//!   push goes to all of them with the same stdin (as the router tees it); the session
//!   the client sees is the first one's. Reads go to the first.
//! - `REFVOTE_SSH_STORAGE` (default `default`), `REFVOTE_SSH_TX` (sent as the
//!   `refvote-transaction` metadata on pushes), `GIT_PROTOCOL` (passed on as
//!   `git_protocol`, as sshd does with `SendEnv`).
//!
//! Exit status: git's exit status on the first target; 128 with a message on stderr if
//! any call fails.

use std::process::ExitCode;

use anyhow::{Context, bail};
use refvote_proto::gitaly::ssh_service_client::SshServiceClient;
use refvote_proto::gitaly::{
    Repository, SshReceivePackRequest, SshUploadArchiveRequest, SshUploadPackRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;

const CHUNK: usize = 32 * 1024;

/// One response, whatever the method.
struct Out {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<i32>,
}

type Responses =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Out, tonic::Status>> + Send>>;

struct Call {
    service: String,
    relative: String,
    storage: String,
    tx: Option<String>,
    protocol: String,
}

impl Call {
    fn repository(&self) -> Option<Repository> {
        Some(Repository {
            storage_name: self.storage.clone(),
            relative_path: self.relative.clone(),
            gl_repository: "project-1".into(),
            ..Default::default()
        })
    }

    /// Starts the call on `url`, its stdin taken from `input`.
    async fn start(&self, url: &str, input: mpsc::Receiver<Vec<u8>>) -> anyhow::Result<Responses> {
        let mut client = SshServiceClient::connect(url.to_owned())
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let input = ReceiverStream::new(input);
        Ok(match self.service.as_str() {
            "git-upload-pack" => {
                let first = SshUploadPackRequest {
                    repository: self.repository(),
                    git_protocol: self.protocol.clone(),
                    ..Default::default()
                };
                let rest = input.map(|stdin| SshUploadPackRequest {
                    stdin,
                    ..Default::default()
                });
                let stream = client
                    .ssh_upload_pack(tokio_stream::once(first).chain(rest))
                    .await?
                    .into_inner();
                Box::pin(stream.map(|r| {
                    r.map(|m| Out {
                        stdout: m.stdout,
                        stderr: m.stderr,
                        exit: m.exit_status.map(|e| e.value),
                    })
                }))
            }
            "git-receive-pack" => {
                let first = SshReceivePackRequest {
                    repository: self.repository(),
                    gl_id: "user-1".into(),
                    gl_username: "test".into(),
                    gl_repository: "project-1".into(),
                    git_protocol: self.protocol.clone(),
                    ..Default::default()
                };
                let rest = input.map(|stdin| SshReceivePackRequest {
                    stdin,
                    ..Default::default()
                });
                let mut request = tonic::Request::new(tokio_stream::once(first).chain(rest));
                if let Some(tx) = &self.tx {
                    request.metadata_mut().insert(
                        refvote_proto::contract::TX_METADATA,
                        MetadataValue::try_from(tx.as_str())?,
                    );
                }
                let stream = client.ssh_receive_pack(request).await?.into_inner();
                Box::pin(stream.map(|r| {
                    r.map(|m| Out {
                        stdout: m.stdout,
                        stderr: m.stderr,
                        exit: m.exit_status.map(|e| e.value),
                    })
                }))
            }
            "git-upload-archive" => {
                let first = SshUploadArchiveRequest {
                    repository: self.repository(),
                    ..Default::default()
                };
                let rest = input.map(|stdin| SshUploadArchiveRequest {
                    stdin,
                    ..Default::default()
                });
                let stream = client
                    .ssh_upload_archive(tokio_stream::once(first).chain(rest))
                    .await?
                    .into_inner();
                Box::pin(stream.map(|r| {
                    r.map(|m| Out {
                        stdout: m.stdout,
                        stderr: m.stderr,
                        exit: m.exit_status.map(|e| e.value),
                    })
                }))
            }
            other => bail!("unsupported service {other}"),
        })
    }
}

/// `git-upload-pack '/group/p.git'` → (`git-upload-pack`, `group/p.git`).
fn parse_command(command: &str) -> anyhow::Result<(String, String)> {
    let (service, path) = command
        .split_once(' ')
        .with_context(|| format!("unexpected remote command {command:?}"))?;
    let path = path.trim().trim_matches('\'').trim_start_matches('/');
    Ok((service.to_owned(), path.to_owned()))
}

async fn run() -> anyhow::Result<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.last().context("usage: ssh-grpc <host> <command>")?;
    let (service, relative) = parse_command(command)?;
    let targets: Vec<String> = std::env::var("REFVOTE_SSH_TARGETS")
        .context("REFVOTE_SSH_TARGETS is not set")?
        .split(',')
        .map(str::to_owned)
        .collect();
    let call = Call {
        tx: std::env::var("REFVOTE_SSH_TX")
            .ok()
            .filter(|t| !t.is_empty()),
        storage: std::env::var("REFVOTE_SSH_STORAGE").unwrap_or_else(|_| "default".into()),
        protocol: std::env::var("GIT_PROTOCOL").unwrap_or_default(),
        service,
        relative,
    };
    let targets = if call.service == "git-receive-pack" {
        targets
    } else {
        targets[..1].to_vec()
    };
    let mut inputs = Vec::new();
    let mut calls = Vec::new();
    for url in &targets {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
        inputs.push(tx);
        calls.push(call.start(url, rx).await?);
    }
    // stdin to every target, with backpressure from the slowest.
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        loop {
            let mut buf = vec![0u8; CHUNK];
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.truncate(n);
                    for i in &inputs {
                        let _ = i.send(buf.clone()).await;
                    }
                }
            }
        }
    });
    let mut calls = calls.into_iter();
    let mut first = calls.next().context("no target")?;
    // The others' output is read and dropped, so they never block on it.
    let others: Vec<_> = calls
        .zip(targets.iter().skip(1).cloned())
        .map(|(mut s, url)| {
            tokio::spawn(async move {
                while let Some(r) = s.next().await {
                    r.with_context(|| format!("call to {url}"))?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut exit = None;
    let mut failed = None;
    while let Some(r) = first.next().await {
        match r {
            Ok(m) => {
                if !m.stdout.is_empty() {
                    stdout.write_all(&m.stdout).await?;
                    stdout.flush().await?;
                }
                if !m.stderr.is_empty() {
                    stderr.write_all(&m.stderr).await?;
                }
                if m.exit.is_some() {
                    exit = m.exit;
                }
            }
            Err(status) => {
                failed = Some(format!("call to {}: {status}", targets[0]));
                break;
            }
        }
    }
    for o in others {
        if let Err(e) = o.await? {
            failed.get_or_insert(format!("{e:#}"));
        }
    }
    if let Some(message) = failed {
        stderr
            .write_all(format!("ssh-grpc: {message}\n").as_bytes())
            .await?;
        return Ok(128);
    }
    exit.context("the call ended without an exit status")
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(128)),
        Err(e) => {
            eprintln!("ssh-grpc: {e:#}");
            ExitCode::from(128)
        }
    }
}
