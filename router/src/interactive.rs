//! An interactive push through the router: SSHReceivePack, as gitlab-shell calls it (a
//! bidirectional stream: the user's stdin in, git's stdout and stderr out). The client
//! must see the ref advertisement before it sends its commands, so the router cannot
//! hold the whole answer until the transaction's outcome as it does for other writes.
//!
//! One voter's answer is passed on as it comes (the *live* voter: the designated voter
//! of a push GitLab's checks gate, whose output carries them, else the first voter; if
//! that one ends before it has advertised, the first other voter that has), but only
//! up to where receive-pack starts to say what it did: the advertisement (through its
//! flush), then progress-band packets (`remote:` lines: hooks, GitLab's messages) and
//! stderr. From the first other packet on (report-status, an error band, a flush, or
//! anything that does not parse) and for the exit status, everything is held back
//! until the outcome is settled. The client then hears the settled answer (the one
//! `outcome` picks, the live voter first among equals) with what it already got cut
//! off. So the client is never told `ok` or exit status 0 for a write that did not
//! commit on a majority, and a refused or failed write still ends with its own report,
//! exit status or error.
//!
//! Praefect passes its primary's whole answer through as it comes; it can, because its
//! primary's vote happens inside git's reference-transaction hook before git reports.
//! Here the outcome is settled after every voter answered, so only the part that says
//! nothing about the outcome goes early.
//!
//! The deciding parts ([`Cut`], [`Live`], [`remainder`]) do no I/O; [`relay`] runs them
//! beside the fan-out.

use std::future::Future;

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use prost::Message;
use refvote_pktline::decode::{self, Packet};
use refvote_pktline::sideband::Band;
use refvote_proto::gitaly::SshReceivePackResponse;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Response, Status};

use crate::fanout::{LegResult, LegSpec, Tap};
use crate::outcome::Frames;
use crate::respond::RouteError;

/// The interactive write RPC.
pub const SSH_RECEIVE_PACK: &str = "/gitaly.SSHService/SSHReceivePack";

/// Whether the write `path` is an interactive session whose client needs part of the
/// answer before it can send the rest of its request.
pub fn interactive(path: &str) -> bool {
    path == SSH_RECEIVE_PACK
}

/// How far a receive-pack session's stdout may go to the client before the outcome.
#[derive(Debug, Default)]
struct Cut {
    /// The stdout seen so far.
    seen: Vec<u8>,
    /// Where the next packet starts.
    scanned: usize,
    /// The end of the advertisement (its flush included), once it is complete.
    advertised: Option<usize>,
    /// How many bytes of `seen` may be passed on.
    passable: usize,
    /// Nothing more passes: receive-pack started reporting, or the stream is not
    /// pkt-lines.
    held: bool,
}

impl Cut {
    fn push(&mut self, data: &[u8]) {
        self.seen.extend_from_slice(data);
        while !self.held {
            let packet = match decode::packet(&self.seen[self.scanned..]) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => {
                    self.hold();
                    break;
                }
            };
            let (packet, len) = packet;
            if self.advertised.is_none() {
                self.scanned += len;
                if packet == Packet::Flush {
                    self.advertised = Some(self.scanned);
                    self.passable = self.scanned;
                }
                continue;
            }
            match packet {
                Packet::Data(d) if d.first() == Some(&(Band::Progress as u8)) => {
                    self.scanned += len;
                    self.passable = self.scanned;
                }
                _ => self.hold(),
            }
        }
    }

    fn hold(&mut self) {
        self.held = true;
    }
}

/// What one voter has said so far.
#[derive(Debug, Default)]
struct Seen {
    stdout: Cut,
    stderr: Vec<u8>,
    ended: bool,
}

/// What the client has been sent before the outcome.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sent {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The live part of an interactive push: fed every voter's answer frames as they come,
/// it says which frames go to the client now.
#[derive(Debug)]
pub struct Live {
    preferred: usize,
    legs: Vec<Seen>,
    source: Option<usize>,
    sent: Sent,
}

impl Live {
    /// For `legs` voters; `preferred` is the index of the one whose answer should be
    /// live (out of range: the first).
    pub fn new(legs: usize, preferred: usize) -> Live {
        Live {
            preferred: if preferred < legs { preferred } else { 0 },
            legs: (0..legs).map(|_| Seen::default()).collect(),
            source: None,
            sent: Sent::default(),
        }
    }

    /// The voter whose answer went live, if one did.
    pub fn source(&self) -> Option<usize> {
        self.source
    }

    /// What went to the client so far.
    pub fn sent(&self) -> &Sent {
        &self.sent
    }

    /// Voter `leg` answered the frame `frame`; returns the frames for the client now.
    pub fn frame(&mut self, leg: usize, frame: &[u8]) -> Vec<Bytes> {
        let Some(seen) = self.legs.get_mut(leg) else {
            return Vec::new();
        };
        if self.source.is_some_and(|s| s != leg) {
            return Vec::new();
        }
        match SshReceivePackResponse::decode(frame) {
            Ok(m) => {
                seen.stdout.push(&m.stdout);
                seen.stderr.extend_from_slice(&m.stderr);
                if m.exit_status.is_some() {
                    seen.stdout.hold();
                }
            }
            Err(_) => seen.stdout.hold(),
        }
        self.choose();
        self.pass()
    }

    /// Voter `leg`'s call ended (or was dropped); returns the frames for the client now.
    pub fn ended(&mut self, leg: usize) -> Vec<Bytes> {
        if let Some(seen) = self.legs.get_mut(leg) {
            seen.ended = true;
        }
        self.choose();
        self.pass()
    }

    fn choose(&mut self) {
        if self.source.is_some() {
            return;
        }
        let advertised = |s: &Seen| s.stdout.advertised.is_some();
        let preferred = &self.legs[self.preferred];
        // The preferred voter, unless it can no longer advertise.
        let gave_up = preferred.ended || (preferred.stdout.held && !advertised(preferred));
        self.source = if advertised(preferred) {
            Some(self.preferred)
        } else if gave_up {
            self.legs.iter().position(advertised)
        } else {
            None
        };
        if let Some(s) = self.source {
            // The others are no longer needed here: their answers are kept by the fan-out.
            for (i, seen) in self.legs.iter_mut().enumerate() {
                if i != s {
                    *seen = Seen::default();
                }
            }
        }
    }

    fn pass(&mut self) -> Vec<Bytes> {
        let Some(s) = self.source else {
            return Vec::new();
        };
        let seen = &self.legs[s];
        let mut out = Vec::new();
        if seen.stderr.len() > self.sent.stderr.len() {
            let stderr = seen.stderr[self.sent.stderr.len()..].to_vec();
            self.sent.stderr.extend_from_slice(&stderr);
            out.push(encode(SshReceivePackResponse {
                stderr,
                ..Default::default()
            }));
        }
        if seen.stdout.passable > self.sent.stdout.len() {
            let stdout = seen.stdout.seen[self.sent.stdout.len()..seen.stdout.passable].to_vec();
            self.sent.stdout.extend_from_slice(&stdout);
            out.push(encode(SshReceivePackResponse {
                stdout,
                ..Default::default()
            }));
        }
        out
    }
}

fn encode(m: SshReceivePackResponse) -> Bytes {
    Bytes::from(m.encode_to_vec())
}

/// The settled answer `answer` (frames of SSHReceivePackResponse, maybe ending with
/// an error) less what the client was already `sent`. When the answer is the live
/// voter's, its stdout and stderr begin with what was sent, which is cut off. When it
/// is another voter's, that voter's advertisement is left out (the client has one)
/// and the rest follows; its stderr goes whole. With nothing sent, the answer is
/// unchanged.
pub fn remainder(sent: &Sent, answer: Vec<Result<Bytes, Status>>) -> Vec<Result<Bytes, Status>> {
    if sent.stdout.is_empty() && sent.stderr.is_empty() {
        return answer;
    }
    let decoded: Vec<Option<SshReceivePackResponse>> = answer
        .iter()
        .map(|f| {
            f.as_ref()
                .ok()
                .and_then(|b| SshReceivePackResponse::decode(b.as_ref()).ok())
        })
        .collect();
    let stdout: Vec<u8> = decoded
        .iter()
        .flatten()
        .flat_map(|m| m.stdout.clone())
        .collect();
    let stderr: Vec<u8> = decoded
        .iter()
        .flatten()
        .flat_map(|m| m.stderr.clone())
        .collect();
    let mut skip_out = if stdout.starts_with(&sent.stdout) {
        sent.stdout.len()
    } else {
        let mut cut = Cut::default();
        cut.push(&stdout);
        // Without a whole advertisement of its own, none of it fits the client's session.
        cut.advertised.unwrap_or(stdout.len())
    };
    let mut skip_err = if stderr.starts_with(&sent.stderr) {
        sent.stderr.len()
    } else {
        0
    };
    let mut out = Vec::new();
    for (frame, message) in answer.into_iter().zip(decoded) {
        let Some(mut m) = message else {
            out.push(frame);
            continue;
        };
        let n = skip_out.min(m.stdout.len());
        m.stdout.drain(..n);
        skip_out -= n;
        let n = skip_err.min(m.stderr.len());
        m.stderr.drain(..n);
        skip_err -= n;
        if !m.stdout.is_empty() || !m.stderr.is_empty() || m.exit_status.is_some() {
            out.push(Ok(encode(m)));
        }
    }
    out
}

/// The live side of one interactive write.
pub struct Session {
    live: Live,
    taps: Option<mpsc::UnboundedReceiver<(usize, Option<Bytes>)>>,
    client: Option<mpsc::UnboundedSender<Bytes>>,
}

impl Session {
    /// Taps every one of `legs` and prefers `preferred`'s answer live (the first
    /// leg's if it is none of them). The receiver gets the frames that go to the
    /// client before the outcome; it ends when the live part is over.
    pub fn start(
        legs: &mut [LegSpec],
        preferred: Option<&str>,
    ) -> (Session, mpsc::UnboundedReceiver<Bytes>) {
        let (taps_tx, taps) = mpsc::unbounded_channel();
        for (i, leg) in legs.iter_mut().enumerate() {
            leg.tap = Some(Tap {
                leg: i,
                frames: taps_tx.clone(),
            });
        }
        let preferred = preferred
            .and_then(|p| legs.iter().position(|l| l.node == p))
            .unwrap_or(0);
        let (client, early) = mpsc::unbounded_channel();
        let session = Session {
            live: Live::new(legs.len(), preferred),
            taps: Some(taps),
            client: Some(client),
        };
        (session, early)
    }

    /// Runs the fan-out with the live part passed on beside it (see [`relay`]).
    pub async fn relay<R>(&mut self, fan_out: impl Future<Output = R>) -> R {
        let (Some(taps), Some(client)) = (self.taps.take(), self.client.take()) else {
            return fan_out.await;
        };
        relay(fan_out, &mut self.live, taps, &client).await
        // Dropping `client` ends the early frames.
    }

    /// Puts the live voter first among `results`, so the settled answer is its own
    /// where the outcome lets any of several answer (its live output then goes once).
    pub fn live_first(&self, results: &mut Vec<(String, LegResult)>) {
        if let Some(s) = self.live.source().filter(|&s| s < results.len()) {
            let r = results.remove(s);
            results.insert(0, r);
        }
    }

    /// The settled `answer` less what the client already got.
    pub async fn finish(
        self,
        answer: Result<Response<Frames>, RouteError>,
    ) -> Result<Response<Frames>, RouteError> {
        let sent = self.live.sent();
        if sent.stdout.is_empty() && sent.stderr.is_empty() {
            return answer;
        }
        let frames: Vec<Result<Bytes, Status>> = match answer {
            Ok(r) => r.into_inner().collect().await,
            Err(e) => vec![Err(Status::from(e))],
        };
        let rest = remainder(sent, frames);
        let rest: Frames = Box::pin(stream::iter(rest));
        Ok(Response::new(rest))
    }
}

/// The client's answer once the live part has begun with `first`: the rest of the live
/// part from `early`, then what the write's `task` settles.
pub fn respond(
    first: Bytes,
    early: mpsc::UnboundedReceiver<Bytes>,
    task: JoinHandle<Result<Response<Frames>, RouteError>>,
) -> Response<Frames> {
    let settled = async move {
        let frames: Frames = match task.await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) => Box::pin(stream::once(async move { Err(Status::from(e)) })),
            Err(e) => {
                let status = Status::internal(format!("the write's task failed: {e}"));
                Box::pin(stream::once(async move { Err(status) }))
            }
        };
        frames
    };
    let frames: Frames = Box::pin(
        stream::once(async move { Ok(first) })
            .chain(UnboundedReceiverStream::new(early).map(Ok))
            .chain(stream::once(settled).flatten()),
    );
    Response::new(frames)
}

/// Runs `fan_out` (the voters' calls, each copying its answer frames to `taps` as
/// they come: `Some(frame)`, then `None` when the call is over) while passing the live
/// part to `client`; returns the fan-out's result. The client going away changes
/// nothing: the write goes on to its outcome.
pub async fn relay<R>(
    fan_out: impl Future<Output = R>,
    live: &mut Live,
    mut taps: mpsc::UnboundedReceiver<(usize, Option<Bytes>)>,
    client: &mpsc::UnboundedSender<Bytes>,
) -> R {
    let on = |live: &mut Live, (leg, frame): (usize, Option<Bytes>)| {
        let out = match frame {
            Some(f) => live.frame(leg, &f),
            None => live.ended(leg),
        };
        for f in out {
            let _ = client.send(f);
        }
    };
    tokio::pin!(fan_out);
    let result = loop {
        tokio::select! {
            biased;
            event = taps.recv() => match event {
                Some(e) => on(live, e),
                None => break (&mut fan_out).await,
            },
            r = &mut fan_out => break r,
        }
    };
    // What the calls said before they ended is in the channel already.
    while let Ok(e) = taps.try_recv() {
        on(live, e);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use refvote_pktline::encode as pkt;
    use refvote_pktline::sideband::{self, SideBand};
    use refvote_proto::gitaly::ExitStatus;

    const OID: &str = "1111111111111111111111111111111111111111";

    fn advertisement() -> Vec<u8> {
        let mut out = Vec::new();
        pkt::data(
            &mut out,
            format!("{OID} refs/heads/main\0report-status side-band-64k\n").as_bytes(),
        )
        .unwrap();
        pkt::flush(&mut out);
        out
    }

    fn progress(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        sideband::write(&mut out, SideBand::Large, Band::Progress, text.as_bytes());
        out
    }

    fn report(refs: &str) -> Vec<u8> {
        let mut inner = Vec::new();
        pkt::text(&mut inner, "unpack ok\n").unwrap();
        pkt::text(&mut inner, &format!("{refs}\n")).unwrap();
        pkt::flush(&mut inner);
        let mut out = Vec::new();
        sideband::write(&mut out, SideBand::Large, Band::Data, &inner);
        pkt::flush(&mut out);
        out
    }

    fn stdout(data: &[u8]) -> Bytes {
        encode(SshReceivePackResponse {
            stdout: data.to_vec(),
            ..Default::default()
        })
    }

    fn stderr(data: &[u8]) -> Bytes {
        encode(SshReceivePackResponse {
            stderr: data.to_vec(),
            ..Default::default()
        })
    }

    fn exit(value: i32) -> Bytes {
        encode(SshReceivePackResponse {
            exit_status: Some(ExitStatus { value }),
            ..Default::default()
        })
    }

    fn all_stdout(frames: &[Bytes]) -> Vec<u8> {
        frames
            .iter()
            .flat_map(|f| SshReceivePackResponse::decode(f.as_ref()).unwrap().stdout)
            .collect()
    }

    #[test]
    fn the_advertisement_passes_once_whole_and_progress_after_it() {
        let mut cut = Cut::default();
        let ad = advertisement();
        cut.push(&ad[..10]);
        assert_eq!(cut.passable, 0, "half an advertisement waits");
        cut.push(&ad[10..]);
        assert_eq!(cut.passable, ad.len());
        let p = progress("GitLab: checking\n");
        cut.push(&p);
        assert_eq!(cut.passable, ad.len() + p.len());
        // The report-status holds everything from there on, progress included.
        cut.push(&report("ok refs/heads/main"));
        cut.push(&progress("late\n"));
        assert!(cut.held);
        assert_eq!(cut.passable, ad.len() + p.len());
    }

    #[test]
    fn without_side_band_the_report_is_held_at_once() {
        let mut cut = Cut::default();
        cut.push(&advertisement());
        let mut plain = Vec::new();
        pkt::text(&mut plain, "unpack ok\n").unwrap();
        cut.push(&plain);
        assert!(cut.held);
        assert_eq!(cut.passable, advertisement().len());
        // Not pkt-lines at all: nothing of it passes.
        let mut cut = Cut::default();
        cut.push(b"fatal: not a git repository\n");
        assert!(cut.held);
        assert_eq!(cut.passable, 0);
    }

    #[test]
    fn the_preferred_voter_goes_live_and_its_exit_status_is_held() {
        let mut live = Live::new(3, 1);
        // Another voter advertises first: the preferred one is still coming.
        assert!(live.frame(0, &stdout(&advertisement())).is_empty());
        assert!(live.frame(1, &stderr(b"warming up\n")).is_empty());
        let out = live.frame(1, &stdout(&advertisement()));
        assert_eq!(live.source(), Some(1));
        assert_eq!(out.len(), 2, "its stderr, then its advertisement");
        assert_eq!(all_stdout(&out), advertisement());
        let p = progress("remote hook says hi\n");
        assert_eq!(all_stdout(&live.frame(1, &stdout(&p))), p);
        assert!(
            live.frame(1, &stdout(&report("ok refs/heads/main")))
                .is_empty()
        );
        assert!(live.frame(1, &exit(0)).is_empty());
        assert!(live.frame(0, &stdout(&progress("not live\n"))).is_empty());
        let mut sent = advertisement();
        sent.extend_from_slice(&p);
        assert_eq!(live.sent().stdout, sent);
        assert_eq!(live.sent().stderr, b"warming up\n");
    }

    #[test]
    fn another_voter_goes_live_when_the_preferred_one_ends_unadvertised() {
        let mut live = Live::new(3, 0);
        assert!(live.frame(2, &stdout(&advertisement())).is_empty());
        assert!(live.frame(0, &stderr(b"fatal: cannot lock\n")).is_empty());
        let out = live.ended(0);
        assert_eq!(live.source(), Some(2));
        assert_eq!(all_stdout(&out), advertisement());
        // An exit status before any advertisement gives up as well.
        let mut live = Live::new(2, 0);
        assert!(live.frame(0, &exit(128)).is_empty());
        assert!(live.source().is_none());
        live.frame(1, &stdout(&advertisement()));
        assert_eq!(live.source(), Some(1));
    }

    #[test]
    fn the_settled_answer_of_the_live_voter_goes_without_what_was_sent() {
        let ad = advertisement();
        let p = progress("GitLab: ok\n");
        let sent = Sent {
            stdout: [ad.clone(), p.clone()].concat(),
            stderr: b"note\n".to_vec(),
        };
        let r = report("ok refs/heads/main");
        let answer = vec![
            Ok(stdout(&ad)),
            Ok(stderr(b"note\n")),
            Ok(stdout(&[p.clone(), r.clone()].concat())),
            Ok(exit(0)),
        ];
        let rest = remainder(&sent, answer);
        let rest: Vec<Bytes> = rest.into_iter().map(Result::unwrap).collect();
        assert_eq!(all_stdout(&rest), r);
        assert_eq!(rest.len(), 2, "the report and the exit status");
        let last = SshReceivePackResponse::decode(rest[1].as_ref()).unwrap();
        assert_eq!(last.exit_status, Some(ExitStatus { value: 0 }));
        assert!(rest.iter().all(|f| {
            SshReceivePackResponse::decode(f.as_ref())
                .unwrap()
                .stderr
                .is_empty()
        }));
    }

    #[test]
    fn another_voters_answer_goes_without_its_advertisement() {
        let sent = Sent {
            stdout: [advertisement(), progress("live voter\n")].concat(),
            stderr: Vec::new(),
        };
        let other = [
            advertisement(),
            progress("GitLab: refused\n"),
            report("ng refs/heads/main pre-receive hook declined"),
        ]
        .concat();
        let answer = vec![
            Ok(stdout(&other)),
            Ok(exit(1)),
            Err(Status::internal("git failed")),
        ];
        let rest = remainder(&sent, answer);
        assert_eq!(rest.len(), 3);
        let frames: Vec<Bytes> = rest[..2].iter().map(|f| f.clone().unwrap()).collect();
        assert_eq!(all_stdout(&frames), other[advertisement().len()..]);
        assert_eq!(rest[2].as_ref().unwrap_err().message(), "git failed");
        // An answer that is only an error stays that error.
        let rest = remainder(&sent, vec![Err(Status::unavailable("too few"))]);
        assert_eq!(rest.len(), 1);
        assert!(rest[0].is_err());
        // Nothing sent: unchanged.
        let answer = vec![Ok(stdout(b"0000")), Ok(exit(0))];
        assert_eq!(remainder(&Sent::default(), answer.clone()).len(), 2);
    }
}
