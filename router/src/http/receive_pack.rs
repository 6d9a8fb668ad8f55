//! A push (`POST …/git-receive-pack`): a voted write. Its command section is read
//! ahead to name the refs a refusal must answer for; the answer is held until the
//! write is settled, so a refusal can still become a report git shows.

use bytes::{Bytes, BytesMut};
use refvote_proto::gitaly::{PostReceivePackRequest, PostReceivePackResponse};
use tonic::Status;

use super::body::request_stream;
use super::push_refusal::{Commands, commands_end};
use super::respond::{Refusal, full, git_response, refusal_from};
use super::serve::DRAIN;
use super::{GitHttp, Request, Response, repository};

/// Largest command section of a push read ahead (to name its refs in a refusal).
/// Beyond it the refs are not named; the push itself is unaffected.
pub(super) const MAX_COMMANDS: usize = 4 * 1024 * 1024;
/// Largest answer to a push kept in memory (the router holds a push's answer until
/// finalize anyway; report-status and progress are small).
pub(super) const MAX_PUSH_ANSWER: usize = 8 * 1024 * 1024;

impl GitHttp {
    pub(super) async fn receive_pack(
        &self,
        relative: &str,
        request: Request,
    ) -> Result<Response, Refusal> {
        // The command section comes first; reading it ahead names the refs a refusal
        // must answer for, and whether git wants a side-band.
        let head = {
            let mut reader = request.body.lock().await;
            let mut head = BytesMut::new();
            while head.len() < MAX_COMMANDS && commands_end(&head).is_none() {
                match reader.next().await {
                    Ok(Some(chunk)) => head.extend_from_slice(&chunk),
                    Ok(None) => break,
                    Err(e) => return Err(Refusal::new(reader.status, e)),
                }
            }
            head.freeze()
        };
        let push = Commands::parse(&head);
        let first = PostReceivePackRequest {
            repository: Some(repository(relative)),
            git_protocol: request.git_protocol.clone(),
            ..Default::default()
        };
        let data = |data: Bytes| PostReceivePackRequest {
            data: data.to_vec(),
            ..Default::default()
        };
        let body = request_stream(first, head, request.body.clone(), data);
        let answer = self
            .call_stream::<PostReceivePackResponse>(
                "/gitaly.SmartHTTPService/PostReceivePack",
                body,
                Some(request.broken.clone()),
            )
            .await;
        // The router answers a push only after finalize, so the whole answer is here
        // at once; collecting it lets a late failure still become a refusal.
        let collected = match answer {
            Ok(mut answer) => {
                let mut out = BytesMut::new();
                loop {
                    match answer.message().await {
                        Ok(Some(m)) if out.len() + m.data.len() <= MAX_PUSH_ANSWER => {
                            out.extend_from_slice(&m.data)
                        }
                        Ok(Some(_)) => {
                            break Err(Status::internal(format!(
                                "the push's answer is over {MAX_PUSH_ANSWER} bytes"
                            )));
                        }
                        Ok(None) => break Ok(out.freeze()),
                        // Some output followed by an error: git's own output says more
                        // than the status, so it goes out as it is.
                        Err(_) if !out.is_empty() => break Ok(out.freeze()),
                        Err(s) => break Err(s),
                    }
                }
            }
            Err(s) => Err(s),
        };
        match collected {
            Ok(out) => Ok(git_response(
                "application/x-git-receive-pack-result",
                full(out),
            )),
            Err(status) => {
                // A body that could not be read (over the size limit, stalled, broken)
                // cut the call off: its own reason is the one git must show.
                let broke = *request.broken.borrow();
                let status = match broke {
                    true => body_failure(&request).await.unwrap_or(status),
                    false => status,
                };
                tracing::info!(relative, code = ?status.code(), message = status.message(), "push refused");
                // A shed push is a 429 with Retry-After, for the client to come back.
                let rejection = match status.code() {
                    tonic::Code::ResourceExhausted => None,
                    _ => push.rejection(&status),
                };
                match rejection {
                    // Drain first: the answer goes out once the client has sent it all.
                    Some(report) => {
                        let drained = tokio::time::timeout(DRAIN, async {
                            let mut reader = request.body.lock().await;
                            while let Ok(Some(_)) = reader.next().await {}
                        })
                        .await;
                        if drained.is_err() {
                            tracing::debug!(relative, "the refused push's body kept coming");
                        }
                        Ok(git_response(
                            "application/x-git-receive-pack-result",
                            full(report),
                        ))
                    }
                    None => Err(refusal_from(&status)),
                }
            }
        }
    }
}

/// Why reading the push's body failed, as the status a report-status names.
async fn body_failure(request: &Request) -> Option<Status> {
    let reader = request.body.lock().await;
    reader.error.clone().map(Status::invalid_argument)
}
