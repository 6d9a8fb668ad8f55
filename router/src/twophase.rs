//! Gitaly's two-phase writes (`UserMergeBranch`, `UserRebaseConfirmable`): the node
//! answers a proposal first (the merge or rebase commit's id) and moves the branch
//! only once the client's next message confirms it. Holding every answer back until
//! finalize (DESIGN.md §2 step 3) would deadlock such a call, so the proposal is the
//! one answer passed on early, and only once a threshold of voters proposed the very
//! same bytes: the client confirms what a majority will write. Then the client's
//! confirmation is teed to every voter like any later frame, and the rest of the
//! answer is held back until finalize as for every write.
//!
//! When no threshold of voters agrees on a proposal (they all refused, e.g. a merge
//! conflict, or differ), nothing is passed on early: every voter's request stream is
//! ended, which a node reads as "not confirmed" and so moves nothing, and the client
//! hears the refusal as for any write.

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{StreamExt, stream};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::codegen::http;
use tonic::{Response, Streaming};

use crate::fanout::{self, LegResult, LegSpec};
use crate::outcome::Frames;
use crate::respond::RouteError;

/// How long the voters may take to propose, counted from the start of the call.
const PROPOSAL_LIMIT: Duration = Duration::from_secs(60);

/// Whether `path` is a two-phase write.
pub fn is_two_phase(path: &str) -> bool {
    matches!(
        path,
        "/gitaly.OperationService/UserMergeBranch"
            | "/gitaly.OperationService/UserRebaseConfirmable"
    )
}

/// The proposal at least `threshold` of `proposals` made byte for byte, if any.
pub fn agreed(proposals: &[Bytes], threshold: usize) -> Option<Bytes> {
    proposals
        .iter()
        .find(|p| proposals.iter().filter(|q| q == p).count() >= threshold)
        .cloned()
}

/// Runs the two-phase call `path` on every voter in `legs`: waits for `threshold` of
/// them to propose the same first answer, tells `early` that answer (dropping it when
/// there is none), then tees the client's confirmation (from `rest`) to every voter, and
/// returns how each call ended, as [`fanout::fan_out`] does.
pub async fn fan_out(
    path: http::uri::PathAndQuery,
    legs: Vec<LegSpec>,
    rest: Option<Streaming<Bytes>>,
    threshold: usize,
    early: oneshot::Sender<Bytes>,
    gone: &(dyn Fn(&str) -> bool + Sync),
    unreached: &(dyn Fn(&str, &str) + Sync),
) -> Vec<(String, LegResult)> {
    let started = Instant::now();
    let mut told = Vec::new();
    let mut running: Vec<fanout::Leg> = legs
        .into_iter()
        .map(|spec| {
            let (tx, rx) = oneshot::channel();
            told.push(rx);
            fanout::start_leg_watched(path.clone(), spec, true, Some(tx))
        })
        .collect();
    let mut waiting: FuturesUnordered<_> =
        told.into_iter().map(|rx| async { rx.await.ok() }).collect();
    let mut proposals = Vec::new();
    let deadline = started + PROPOSAL_LIMIT;
    let proposal = loop {
        tokio::select! {
            next = waiting.next() => match next {
                // Every voter proposed or ended without a proposal.
                None => break None,
                Some(None) => {}
                Some(Some(p)) => {
                    proposals.push(p);
                    if let Some(p) = agreed(&proposals, threshold) {
                        break Some(p);
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(?PROPOSAL_LIMIT, "the voters did not agree on a proposal in time");
                break None;
            }
        }
    };
    drop(waiting);
    let passed_on = match (proposal, rest) {
        (Some(p), Some(rest)) => early.send(p).is_ok().then_some(rest),
        _ => None,
    };
    match passed_on {
        Some(rest) => confirm(&mut running, rest).await,
        None => tracing::debug!("no proposal passed on: ending every voter's stream unconfirmed"),
    }
    fanout::end_streams(&mut running);
    fanout::collect(running, started, gone, unreached).await
}

/// Tees the client's confirmation, its one frame after the first, to every voter. The
/// client reads the answer before it ends its stream (Rails closes it only after), so
/// nothing more is awaited; a broken stream cancels every call, so nothing moves.
async fn confirm(running: &mut [fanout::Leg], mut rest: Streaming<Bytes>) {
    match rest.message().await {
        Ok(Some(frame)) => {
            let sends = running
                .iter_mut()
                .map(|leg| fanout::tee(leg, frame.clone()));
            futures_util::future::join_all(sends).await;
        }
        Ok(None) => tracing::debug!("the client ended its stream without confirming"),
        Err(status) => {
            tracing::info!(%status, "the client's stream broke before it confirmed; cancelling every voter's call");
            for leg in running.iter() {
                leg.task.abort();
            }
        }
    }
}

/// The answer of a two-phase write whose proposal `sent` already reached the client:
/// the settled answer `settled` without that first frame.
pub fn rest_of_answer(sent: Bytes, settled: Result<Response<Frames>, RouteError>) -> Frames {
    match settled {
        Ok(response) => {
            let mut frames = response.into_inner();
            Box::pin(
                stream::once(async move {
                    let first = match frames.next().await {
                        // The proposal the client has: not again.
                        Some(Ok(first)) if first == sent => None,
                        other => other,
                    };
                    stream::iter(first).chain(frames)
                })
                .flatten(),
            )
        }
        Err(e) => Box::pin(stream::once(async move { Err(tonic::Status::from(e)) })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proposal_needs_a_threshold_of_identical_bytes() {
        let a = Bytes::from_static(b"\x0a\x28aaaa");
        let b = Bytes::from_static(b"\x0a\x28bbbb");
        assert_eq!(agreed(std::slice::from_ref(&a), 2), None);
        assert_eq!(agreed(&[a.clone(), b.clone()], 2), None);
        assert_eq!(
            agreed(&[a.clone(), b.clone(), a.clone()], 2),
            Some(a.clone())
        );
        assert_eq!(agreed(std::slice::from_ref(&b), 1), Some(b));
        assert_eq!(agreed(&[], 1), None);
    }

    #[test]
    fn only_merges_and_confirmable_rebases_are_two_phase() {
        assert!(is_two_phase("/gitaly.OperationService/UserMergeBranch"));
        assert!(is_two_phase(
            "/gitaly.OperationService/UserRebaseConfirmable"
        ));
        assert!(!is_two_phase("/gitaly.OperationService/UserMergeToRef"));
        assert!(!is_two_phase("/gitaly.OperationService/UserFFBranch"));
    }
}
