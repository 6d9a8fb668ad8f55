//! SSHService: the RPCs gitlab-shell calls for git over SSH. Each is one interactive
//! git session: the client's `stdin` frames stream into git, git's stdout and stderr
//! stream back as they are written (with backpressure: a slow client makes git block
//! on its pipe), and the last response carries git's exit status, which the SSH
//! front hands to the user's `git` as the remote command's status.
//!
//! - SSHReceivePack is a push (mutator): it runs like PostReceivePack, inside the
//!   refvote transaction, its commands in canonical order ([`super::push`]). As in
//!   Gitaly, a non-zero exit is sent as the exit status and then also fails the call,
//!   so the router knows this replica's write failed.
//! - SSHUploadPack (clone, fetch) and SSHUploadArchive (`git archive --remote`) are
//!   reads: a non-zero exit is only the exit status; the call itself succeeds, as
//!   Gitaly answers it.

use std::sync::Arc;

use refvote_proto::gitaly::ssh_service_server::SshService;
use refvote_proto::gitaly::{
    ExitStatus, SshReceivePackRequest, SshReceivePackResponse, SshUploadArchiveRequest,
    SshUploadArchiveResponse, SshUploadPackRequest, SshUploadPackResponse,
};
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::error::NodeError;
use super::git::{Exit, Output, Run};
use super::push::{self, canonical_input_lazy};
use crate::state::NodeState;
use crate::stream::{first_message, stream_input};

pub struct SshSvc {
    node: Arc<NodeState>,
}

impl SshSvc {
    pub fn new(node: Arc<NodeState>) -> SshSvc {
        SshSvc { node }
    }
}

/// One response of a session, before it is put into the method's message type.
enum Frame {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
}

/// The value a shell would report for how git ended: its exit code, or 128 + the
/// signal that stopped it.
fn exit_value(exit: &Exit) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    exit.code()
        .or_else(|| exit.status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Streams a session's output to the client, then its exit status. With
/// `fail_on_error`, a non-zero exit also ends the call with an error after the status.
fn session<T, F>(run: Run, fail_on_error: bool, wrap: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: Fn(Frame) -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(1);
    tokio::spawn(async move {
        let mut run = run;
        loop {
            let next = tokio::select! {
                // The client went away: dropping `run` stops git (a write in a
                // transaction is left to finish; see the git module).
                _ = tx.closed() => return,
                next = run.next_output() => next,
            };
            let frame = match next {
                Some(Ok(Output::Stdout(data))) => Frame::Stdout(data),
                Some(Ok(Output::Stderr(data))) => Frame::Stderr(data),
                Some(Err(e)) => {
                    let _ = tx.send(Err(NodeError::from(e).into())).await;
                    return;
                }
                None => break,
            };
            if tx.send(Ok(wrap(frame))).await.is_err() {
                return;
            }
        }
        match run.wait().await {
            Ok(exit) => {
                if tx
                    .send(Ok(wrap(Frame::Exit(exit_value(&exit)))))
                    .await
                    .is_err()
                {
                    return;
                }
                if fail_on_error && !exit.success() {
                    let _ = tx
                        .send(Err(NodeError::from(exit.into_error()).into()))
                        .await;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(NodeError::from(e).into())).await;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn split(frame: Frame) -> (Vec<u8>, Vec<u8>, Option<ExitStatus>) {
    match frame {
        Frame::Stdout(d) => (d, Vec::new(), None),
        Frame::Stderr(d) => (Vec::new(), d, None),
        Frame::Exit(value) => (Vec::new(), Vec::new(), Some(ExitStatus { value })),
    }
}

#[tonic::async_trait]
impl SshService for SshSvc {
    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn ssh_upload_pack(
        &self,
        request: Request<Streaming<SshUploadPackRequest>>,
    ) -> Result<Response<BoxStream<SshUploadPackResponse>>, Status> {
        let mut stream = request.into_inner();
        let first = first_message(&mut stream).await?;
        let repo = self.node.storages.existing(first.repository.as_ref())?;
        let run = self
            .node
            .git
            .command(["upload-pack"])
            .request_config(&first.git_config_options)?
            .protocol(&first.git_protocol)?
            .arg(&repo.path)
            .stdin(stream_input(first.stdin, stream, |m| m.stdin))
            .stream_stderr()
            .spawn()
            .map_err(NodeError::from)?;
        Ok(Response::new(session(run, false, |f| {
            let (stdout, stderr, exit_status) = split(f);
            SshUploadPackResponse {
                stdout,
                stderr,
                exit_status,
            }
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn ssh_receive_pack(
        &self,
        request: Request<Streaming<SshReceivePackRequest>>,
    ) -> Result<Response<BoxStream<SshReceivePackResponse>>, Status> {
        let (metadata, _, mut stream) = request.into_parts();
        let first = first_message(&mut stream).await?;
        let repo = self.node.storages.existing(first.repository.as_ref())?;
        // Gitaly refuses a push that names no GitLab user: its hooks need one.
        if first.gl_id.is_empty() {
            return Err(NodeError::invalid(
                "empty gl_id: the first SSHReceivePack message must name the pushing user",
            )
            .into());
        }
        // Everything that can be refused is checked before joining the transaction.
        let cmd = self
            .node
            .git
            .command(["receive-pack"])
            .request_config(&first.git_config_options)?
            .protocol(&first.git_protocol)?
            .arg(&repo.path);
        let run = push::join(&self.node, &metadata, cmd, &repo.path)
            .await?
            .stdin(canonical_input_lazy(stream_input(
                first.stdin,
                stream,
                |m| m.stdin,
            )))
            .stream_stderr()
            .spawn()
            .map_err(NodeError::from)?;
        Ok(Response::new(session(run, true, |f| {
            let (stdout, stderr, exit_status) = split(f);
            SshReceivePackResponse {
                stdout,
                stderr,
                exit_status,
            }
        })))
    }

    #[tracing::instrument(skip_all, fields(node = %self.node.name))]
    async fn ssh_upload_archive(
        &self,
        request: Request<Streaming<SshUploadArchiveRequest>>,
    ) -> Result<Response<BoxStream<SshUploadArchiveResponse>>, Status> {
        let mut stream = request.into_inner();
        let first = first_message(&mut stream).await?;
        let repo = self.node.storages.existing(first.repository.as_ref())?;
        let run = self
            .node
            .git
            .command(["upload-archive"])
            .arg(&repo.path)
            .stdin(stream_input(first.stdin, stream, |m| m.stdin))
            .stream_stderr()
            .spawn()
            .map_err(NodeError::from)?;
        Ok(Response::new(session(run, false, |f| {
            let (stdout, stderr, exit_status) = split(f);
            SshUploadArchiveResponse {
                stdout,
                stderr,
                exit_status,
            }
        })))
    }
}
