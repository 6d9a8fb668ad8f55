//! `git upload-pack` over a sidechannel, for `SSHUploadPackWithSidechannel` and
//! `PostUploadPackWithSidechannel` (Gitaly's `internal/gitaly/service/ssh/upload_pack.go`
//! and `smarthttp/upload_pack.go`).
//!
//! The sidechannel's read half is git's stdin; on its way the bytes are counted for
//! the negotiation statistics (refvote-pktline's `negotiation`) and watched for the
//! client's `done`. git's stdout goes back raw over HTTP (`--stateless-rpc`) and, over
//! SSH, with stderr beside it as side-band-64k pkt-lines (band 1 stdout, band 2
//! stderr), as Gitaly's side-band writer sends them. The session ends when git has
//! exited and its output is passed on: the sidechannel is then closed, which ends the
//! client's data.
//!
//! A client that has not sent `done` within the negotiation deadline
//! (`[timeout] upload_pack_negotiation_secs`, Gitaly's `upload_pack_negotiation`)
//! gets DEADLINE_EXCEEDED and git is stopped. Gitaly bounds only SSH negotiations
//! this way; refvote bounds both (an HTTP round that is still running without
//! `done` after the deadline is a stalled client either way). A client that goes away
//! or sends something that is not sidechannel framing stops git at once (SIGKILL to
//! its process group); its status comes from `refvote_sidechannel::status`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use refvote_pktline::negotiation::{Negotiation, NegotiationStats};
use refvote_pktline::sideband::{self, Band, SideBand};
use refvote_proto::gitaly::PackfileNegotiationStatistics;
use refvote_sidechannel::{FetchRpc, ServerSidechannel, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf};
use tokio::sync::watch;
use tonic::Status;

use crate::git::{self, GitError, Output};

/// One read of the client's data (and so one piece of git's stdin).
const READ_CHUNK: usize = 32 * 1024;

/// What the client's data told about the negotiation, shared between the stdin feed
/// and the session.
struct Seen {
    negotiation: Mutex<Negotiation>,
    /// Set once the negotiation deadline no longer applies.
    over: watch::Sender<bool>,
}

/// git's stdin: the sidechannel's read half, counted on the way. A read failure
/// becomes the stream's error, which makes the git runner stop git and report it.
fn stdin_of(rpc: FetchRpc, reader: ReadHalf<ServerSidechannel>, seen: Arc<Seen>) -> git::Input {
    let stream = futures_util::stream::unfold(Some(reader), move |reader| {
        let seen = seen.clone();
        async move {
            let mut reader = reader?;
            let mut buf = vec![0u8; READ_CHUNK];
            match reader.read(&mut buf).await {
                Ok(0) => {
                    seen.negotiation
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .end();
                    None
                }
                Ok(n) => {
                    buf.truncate(n);
                    let over = {
                        let mut negotiation = seen
                            .negotiation
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        negotiation.feed(&buf);
                        negotiation.negotiation_over()
                    };
                    if over {
                        seen.over.send_replace(true);
                    }
                    Some((Ok(buf), Some(reader)))
                }
                Err(e) => Some((Err(status::transfer_failed(rpc, &e)), None)),
            }
        }
    });
    Box::pin(stream)
}

/// Runs `cmd` (git upload-pack with its arguments, not yet given stdin) with the
/// client's data on `sidechannel`; the negotiation statistics when it succeeded.
pub(crate) async fn serve(
    rpc: FetchRpc,
    sidechannel: ServerSidechannel,
    cmd: git::Command,
    negotiation_deadline: Duration,
) -> Result<PackfileNegotiationStatistics, Status> {
    let (reader, mut writer) = tokio::io::split(sidechannel);
    let (over, mut negotiated) = watch::channel(false);
    let seen = Arc::new(Seen {
        negotiation: Mutex::new(Negotiation::new()),
        over,
    });
    let mut cmd = cmd.stdin(stdin_of(rpc, reader, seen.clone()));
    if rpc == FetchRpc::SshUploadPack {
        cmd = cmd.stream_stderr();
    }
    let mut run = cmd.spawn()?;
    let deadline = tokio::time::sleep(negotiation_deadline);
    tokio::pin!(deadline);
    let mut frame = Vec::new();
    loop {
        let output = tokio::select! {
            o = run.next_output() => o,
            // Dropping `run` below stops git.
            _ = &mut deadline, if !*negotiated.borrow() => {
                return Err(Status::deadline_exceeded(format!(
                    "waiting for negotiation: the client did not send `done` within {negotiation_deadline:?} ([timeout] upload_pack_negotiation_secs)"
                )));
            }
            // Wakes the loop when `done` passes, so the deadline is disarmed.
            _ = negotiated.changed(), if !*negotiated.borrow() => continue,
        };
        let bytes: &[u8] = match output {
            None => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Output::Stdout(data))) if rpc == FetchRpc::PostUploadPack => {
                frame = data;
                &frame
            }
            Some(Ok(out)) => {
                let (band, data) = match out {
                    Output::Stdout(d) => (Band::Data, d),
                    Output::Stderr(d) => (Band::Progress, d),
                };
                frame.clear();
                sideband::write(&mut frame, SideBand::Large, band, &data);
                &frame
            }
        };
        if let Err(e) = writer.write_all(bytes).await {
            return Err(status::write_failed(rpc, &e));
        }
    }
    let exit = match run.wait().await {
        Ok(exit) => exit,
        // The client's data failed: its status was made by the stdin feed.
        Err(GitError::Input { source, .. }) => return Err(source),
        Err(e) => return Err(e.into()),
    };
    let (stats, parse_error) = {
        let n = seen
            .negotiation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (n.stats().clone(), n.error().map(str::to_owned))
    };
    if let Some(why) = &parse_error {
        tracing::debug!(why, "failed parsing packfile negotiation");
    }
    outcome(rpc, exit.success(), &exit.stderr, &stats)?;
    writer
        .shutdown()
        .await
        .map_err(|e| Status::internal(format!("close sidechannel: {e}")))?;
    // Gitaly's HTTP handler keeps nothing of a negotiation it could not parse; its
    // SSH handler keeps what it counted.
    let stats = match (rpc, parse_error) {
        (FetchRpc::PostUploadPack, Some(_)) => NegotiationStats::default(),
        _ => stats,
    };
    Ok(to_proto(stats))
}

/// What a finished git upload-pack means for the call (Gitaly's codes).
fn outcome(
    rpc: FetchRpc,
    success: bool,
    stderr: &str,
    stats: &NegotiationStats,
) -> Result<(), Status> {
    if success {
        return Ok(());
    }
    match rpc {
        // A client that hung up mid-fetch (killed its git), or whose data git could not
        // read as pkt-lines (cut off or garbled: git may see the bytes before the feed
        // sees the stream end), is no server failure.
        FetchRpc::SshUploadPack if client_side_failure(stderr) => {
            Err(Status::cancelled("user canceled the request"))
        }
        FetchRpc::SshUploadPack => Err(Status::internal(format!(
            "running upload-pack: git upload-pack failed, stderr: {:?}",
            stderr.trim()
        ))),
        // A shallow fetch makes upload-pack exit non-zero by design.
        FetchRpc::PostUploadPack if !stats.deepen.is_empty() => Ok(()),
        FetchRpc::PostUploadPack => Err(Status::failed_precondition(format!(
            "running upload-pack: waiting for upload-pack: git upload-pack failed, stderr: {:?}",
            stderr.trim()
        ))),
    }
}

/// Whether git upload-pack's `stderr` says the client's data ended or broke, rather
/// than the repository or git failing.
fn client_side_failure(stderr: &str) -> bool {
    let last = stderr.trim_end().lines().last().unwrap_or("");
    last == "fatal: the remote end hung up unexpectedly"
        || last.starts_with("fatal: protocol error: bad line length")
}

fn to_proto(s: NegotiationStats) -> PackfileNegotiationStatistics {
    PackfileNegotiationStatistics {
        payload_size: s.payload_size,
        packets: s.packets,
        caps: s.caps,
        wants: s.wants,
        haves: s.haves,
        shallows: s.shallows,
        deepen: s.deepen,
        filter: s.filter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_failed_upload_pack_answers_as_gitaly_does() {
        let none = NegotiationStats::default();
        let shallow = NegotiationStats {
            deepen: "deepen 1".into(),
            ..Default::default()
        };
        let hung_up = "fatal: the remote end hung up unexpectedly\n";
        assert!(outcome(FetchRpc::SshUploadPack, true, "", &none).is_ok());
        let e = outcome(FetchRpc::SshUploadPack, false, hung_up, &none).unwrap_err();
        assert_eq!(e.code(), Code::Cancelled);
        let cut = "fatal: protocol error: bad line length character: want\n";
        let e = outcome(FetchRpc::SshUploadPack, false, cut, &none).unwrap_err();
        assert_eq!(e.code(), Code::Cancelled);
        let e = outcome(FetchRpc::SshUploadPack, false, "fatal: bad object", &none).unwrap_err();
        assert_eq!(e.code(), Code::Internal);
        assert!(e.message().contains("bad object"), "{e:?}");
        assert!(outcome(FetchRpc::PostUploadPack, false, "x", &shallow).is_ok());
        let e = outcome(FetchRpc::PostUploadPack, false, hung_up, &none).unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
    }

    #[test]
    fn statistics_keep_every_field() {
        let s = NegotiationStats {
            payload_size: 1,
            packets: 2,
            caps: vec!["thin-pack".into()],
            wants: 3,
            haves: 4,
            shallows: 5,
            deepen: "deepen 2".into(),
            filter: "blob:none".into(),
            command: "fetch".into(),
            user_agent: "git/2.47.0".into(),
        };
        let p = to_proto(s);
        assert_eq!(
            (p.payload_size, p.packets, p.wants, p.haves, p.shallows),
            (1, 2, 3, 4, 5)
        );
        assert_eq!(p.caps, ["thin-pack"]);
        assert_eq!(
            (p.deepen.as_str(), p.filter.as_str()),
            ("deepen 2", "blob:none")
        );
    }
}
