//! What the client of a write hears once its transaction is finalized (DESIGN.md §2
//! step 7): a promoted replica's answer when the write is acknowledged; the replicas'
//! common refusal when every one that answered refused it alike; "not enough replicas
//! answered" when too few could be reached to decide anything, naming the unreachable
//! ones (a dead node is not a disagreement); "failed differently" only when replicas
//! answered with different refusals; otherwise "outcome unknown". Nothing here does I/O.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, stream};
use refvote_cluster::records::{TxOutcome, TxRecord};
use tonic::{Extensions, Response, Status};

use crate::fanout::LegResult;
use crate::respond::RouteError;

/// Frames back to the client: the node's, unchanged, ending with its status.
pub type Frames = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// What the client hears for the write `tx`: `results` are the voters' calls, in
/// voter order; `absent` the assigned replicas that were never called, with why (not
/// voters, or not callable).
pub(crate) fn answer(
    tx: &TxRecord,
    outcome: Result<TxOutcome, refvote_cluster::Error>,
    results: Vec<(String, LegResult)>,
    absent: &[(String, String)],
    path: &str,
    output: &[u8],
) -> Result<Response<Frames>, RouteError> {
    let summary = || summary(&results);
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(tx = %tx.id, error = %e, "finalize failed");
            return Err(RouteError::OutcomeUnknown {
                detail: format!("finalize failed: {e}; {}", summary()),
            });
        }
    };
    tracing::debug!(tx = %tx.id, ?outcome, "finalized");
    if outcome.acknowledged {
        // The answer comes from the winning side: a promoted replica when something
        // committed, else any voter (nothing changed, e.g. git refused every ref).
        let winner = |n: &String| !outcome.committed || outcome.promoted.contains(n);
        let pick = results
            .iter()
            .position(|(n, r)| winner(n) && r.succeeded())
            .or_else(|| {
                results
                    .iter()
                    .position(|(n, r)| winner(n) && matches!(r, LegResult::Answered { .. }))
            });
        if let Some(i) = pick {
            let (_, mut result) = results.into_iter().nth(i).expect("picked");
            if let LegResult::Answered { frames, .. } = &mut result {
                *frames = crate::gitlab::insert_output(path, std::mem::take(frames), output);
            }
            return respond_with(result);
        }
        return Err(RouteError::OutcomeUnknown {
            detail: format!("no promoted replica's answer was kept; {}", summary()),
        });
    }
    if !outcome.committed {
        // Nothing changed anywhere: say why.
        return match refusal(tx.threshold, &results, absent) {
            Refusal::Alike(i) => {
                let (_, result) = results.into_iter().nth(i).expect("an answer");
                respond_with(result)
            }
            Refusal::TooFewAnswered {
                answered,
                unreachable,
            } => Err(RouteError::TooFewAnswered {
                repo: tx.repo.clone(),
                answered,
                assigned: tx.assigned,
                needed: tx.threshold,
                unreachable: unreachable
                    .iter()
                    .map(|(n, why)| format!("{n} ({why})"))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            Refusal::Differently => Err(RouteError::NotWritten {
                repo: tx.repo.clone(),
                detail: summary(),
            }),
        };
    }
    Err(RouteError::OutcomeUnknown {
        detail: format!(
            "{} of {} needed replicas promoted; {}",
            outcome.promoted.len(),
            outcome.threshold,
            summary()
        ),
    })
}

/// Why a write that changed nothing anywhere was refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Every replica that answered refused it the same way, and enough answered for
    /// that to be the write's answer: the answer at this index of the results.
    Alike(usize),
    /// Fewer replicas answered than a decision needs, some of them unreachable (node,
    /// why): the write could not be voted, whatever the ones that answered said.
    TooFewAnswered {
        answered: usize,
        unreachable: Vec<(String, String)>,
    },
    /// Replicas answered with different refusals.
    Differently,
}

fn refusal(
    threshold: usize,
    results: &[(String, LegResult)],
    absent: &[(String, String)],
) -> Refusal {
    let answered: Vec<usize> = (0..results.len())
        .filter(|&i| results[i].1.reached())
        .collect();
    let unreachable: Vec<(String, String)> = results
        .iter()
        .filter(|(_, r)| !r.reached())
        .map(|(n, r)| (n.clone(), r.status_message()))
        .chain(absent.iter().cloned())
        .collect();
    if answered.len() < threshold && !unreachable.is_empty() {
        return Refusal::TooFewAnswered {
            answered: answered.len(),
            unreachable,
        };
    }
    let mut texts = answered.iter().map(|&i| results[i].1.status_text());
    match texts.next() {
        Some(first) if texts.all(|t| t == first) => Refusal::Alike(answered[0]),
        _ => Refusal::Differently,
    }
}

/// The assigned replicas of a repository that are not among `voters`, with why: the
/// ones a write's refusal names beside the voters that could not be reached.
pub(crate) fn non_voters(
    assigned: &[String],
    voters: &[String],
    live: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    assigned
        .iter()
        .filter(|n| !voters.contains(n))
        .map(|n| {
            let why = if live(n) {
                "not up to date; repair brings it back"
            } else {
                "its node holds no lease: down or cut off from etcd"
            };
            (n.clone(), why.to_owned())
        })
        .collect()
}

fn summary(results: &[(String, LegResult)]) -> String {
    results
        .iter()
        .map(|(n, r)| format!("{n}: {}", r.status_text()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One replica's held-back answer, replayed to the client as the node sent it.
pub(crate) fn respond_with(result: LegResult) -> Result<Response<Frames>, RouteError> {
    match result {
        LegResult::Answered {
            metadata,
            frames,
            status,
        } => {
            let frames: Frames = Box::pin(stream::iter(
                frames.into_iter().map(Ok).chain(status.map(Err)),
            ));
            Ok(Response::from_parts(metadata, frames, Extensions::new()))
        }
        LegResult::Failed(status) | LegResult::Unreached(status) => Err(RouteError::Client(status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    fn answered(status: Option<Status>) -> LegResult {
        LegResult::Answered {
            metadata: MetadataMap::new(),
            frames: Vec::new(),
            status,
        }
    }

    fn unreached(why: &str) -> LegResult {
        LegResult::Unreached(Status::unavailable(why))
    }

    fn leg(node: &str, r: LegResult) -> (String, LegResult) {
        (node.to_owned(), r)
    }

    #[test]
    fn a_dead_voter_and_a_stopped_replica_are_too_few_not_a_divergence() {
        let results = [
            leg(
                "node1",
                unreached("cannot reach node node1: connection refused"),
            ),
            leg(
                "node3",
                answered(Some(Status::internal("git receive-pack failed"))),
            ),
        ];
        let absent = non_voters(
            &["node1".into(), "node2".into(), "node3".into()],
            &["node1".into(), "node3".into()],
            |_| false,
        );
        match refusal(2, &results, &absent) {
            Refusal::TooFewAnswered {
                answered,
                unreachable,
            } => {
                assert_eq!(answered, 1);
                let names: Vec<&str> = unreachable.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(names, ["node1", "node2"]);
                assert!(
                    unreachable[0].1.contains("connection refused"),
                    "{unreachable:?}"
                );
                assert!(
                    unreachable[1].1.contains("holds no lease"),
                    "{unreachable:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replicas_that_answered_differently_failed_differently() {
        let results = [
            leg("node1", answered(Some(Status::aborted("stale")))),
            leg("node2", answered(Some(Status::internal("disk full")))),
            leg("node3", unreached("dropped")),
        ];
        assert_eq!(refusal(2, &results, &[]), Refusal::Differently);
    }

    #[test]
    fn a_refusal_every_replica_that_answered_gave_is_the_answer() {
        let same = || answered(Some(Status::failed_precondition("branch is protected")));
        let results = [
            leg("node1", same()),
            leg("node2", same()),
            leg("node3", same()),
        ];
        assert_eq!(refusal(2, &results, &[]), Refusal::Alike(0));
        // A majority refused alike; the unreachable one does not change their answer.
        let results = [
            leg("node1", unreached("gone")),
            leg("node2", same()),
            leg("node3", same()),
        ];
        assert_eq!(refusal(2, &results, &[]), Refusal::Alike(1));
        // A node's own refusal before any frame is an answer too.
        let refused = || LegResult::Failed(Status::invalid_argument("bad ref"));
        let results = [leg("node1", refused()), leg("node2", refused())];
        assert_eq!(
            refusal(2, &results, &[("node3".into(), "x".into())]),
            Refusal::Alike(0)
        );
    }

    #[test]
    fn the_refusal_says_how_many_answered_and_who_was_unreachable() {
        let tx = TxRecord {
            id: "t1".into(),
            repo: refvote_cluster::RepoId::new("default", "p.git").unwrap(),
            voters: vec!["node1".into(), "node3".into()],
            threshold: 2,
            assigned: 3,
            base_generation: 1,
            creator: "r1".into(),
            voter_leases: Default::default(),
            repo_create_revision: 1,
            designated: None,
        };
        let outcome = TxOutcome {
            id: "t1".into(),
            repo: tx.repo.clone(),
            committed: false,
            generation: 1,
            promoted: Vec::new(),
            outdated: Vec::new(),
            threshold: 2,
            acknowledged: false,
            reaped: false,
        };
        let results = vec![
            leg(
                "node1",
                unreached("cannot reach node node1: connection refused"),
            ),
            leg("node3", answered(None)),
        ];
        let absent = [("node2".to_owned(), "its node holds no lease".to_owned())];
        let Err(err) = answer(
            &tx,
            Ok(outcome),
            results,
            &absent,
            "/gitaly.SmartHTTPService/PostReceivePack",
            &[],
        ) else {
            panic!("a refused write answered")
        };
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.message(),
            "cannot write to default/p.git: not enough replicas answered: 1 of 3 answered, 2 needed; \
             unreachable: node1 (cannot reach node node1: connection refused), node2 (its node holds no lease)"
        );
    }
}
