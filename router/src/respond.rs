//! The one place where the router's own failures become gRPC statuses. A node's status
//! never passes through here: it reaches the client as the node sent it.

use refvote_cluster::RepoId;
use refvote_cluster::repo::InvalidRepo;
use tonic::{Code, Status};

use crate::frame::FrameError;

/// Why the router could not forward a call.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("unknown method {0}: refvote does not serve it (see proto/ for the methods it does)")]
    UnknownMethod(String),
    #[error("{method} is not served by refvote-router yet: {why}")]
    NotYet { method: String, why: &'static str },
    #[error("{0}: the request stream ended before its first message")]
    EmptyRequest(String),
    #[error("{method}: cannot read the target repository")]
    Frame {
        method: String,
        #[source]
        source: FrameError,
    },
    #[error("invalid repository")]
    Repo(#[from] InvalidRepo),
    #[error(
        "repository {0} is not registered in refvote; create it through the router (CreateRepository) first"
    )]
    NotRegistered(RepoId),
    #[error(
        "cannot read the replicas of {repo} from etcd; retry, and check the router's etcd connectivity"
    )]
    Etcd {
        repo: RepoId,
        #[source]
        source: refvote_cluster::Error,
    },
    /// A read could not confirm its replicas with etcd (DESIGN.md "Reads").
    #[error("{0}")]
    ReadUnconfirmed(String),
    #[error("no replica of {repo} can serve reads: {detail}")]
    NoReplica { repo: RepoId, detail: String },
    /// A storage-scoped call found no node to answer it.
    #[error("no storage node can answer: {0}")]
    NoNode(String),
    #[error(
        "this router holds no etcd lease (is etcd reachable?); writes are bound to one, retry shortly"
    )]
    NoLease,
    /// The transaction could not be created: too few replicas, or an admin lock.
    #[error("cannot write to {repo}")]
    NoVote {
        repo: RepoId,
        #[source]
        source: refvote_cluster::Error,
    },
    /// Fewer than a majority promoted, or the finalize itself did not land (etcd did
    /// not answer): the message must not claim which.
    #[error(
        "outcome unknown: the write could not be confirmed on a majority of replicas, so it may or may not have been applied; the replicas converge on their own ({detail})"
    )]
    OutcomeUnknown { detail: String },
    #[error(
        "the write to {repo} changed nothing: its replicas failed differently ({detail}); retry"
    )]
    NotWritten { repo: RepoId, detail: String },
    /// Too few voters could be reached to decide the write (a node died before its
    /// lease ran out): the same kind of reason as a transaction refused for want of
    /// up-to-date replicas, not a divergence.
    #[error(
        "cannot write to {repo}: not enough replicas answered: {answered} of {assigned} answered, {needed} needed; unreachable: {unreachable}"
    )]
    TooFewAnswered {
        repo: RepoId,
        answered: usize,
        assigned: usize,
        needed: usize,
        unreachable: String,
    },
    /// The write's time or a user's zone could not be settled (Gitaly refuses the same
    /// requests with INVALID_ARGUMENT).
    #[error("cannot date the write's new objects")]
    Stamp(#[source] crate::stamp::StampError),
    #[error("repository {0} already exists")]
    AlreadyExists(RepoId),
    #[error("cannot create {repo}")]
    NoPlacement {
        repo: RepoId,
        #[source]
        source: refvote_cluster::Error,
    },
    #[error("the router failed: {0}")]
    Internal(String),
    /// A write naming a push quarantine: only reads may.
    #[error(
        "{0}: git_object_directory names a push's quarantine, which only reads may use; leave it empty"
    )]
    QuarantinedWrite(String),
    /// A read of a quarantine no open push of the repository holds.
    #[error(
        "no open push of {repo} holds quarantine {dir}: quarantine directories are only valid while GitLab checks a push"
    )]
    NoQuarantine { repo: RepoId, dir: String },
    /// A write GitLab's checks gate cannot begin (the voters disagree on [gitlab]).
    #[error("cannot write to {repo}")]
    Gitlab {
        repo: RepoId,
        #[source]
        source: refvote_cluster::Error,
    },
    /// Reading the client's own request stream failed.
    #[error("reading the request failed")]
    Client(#[source] Status),
    /// SIGTERM's drain ran out of `drain_timeout_secs` with this call in flight.
    #[error(
        "refvote-router is shutting down: its drain_timeout_secs ({secs} s) ran out with this call in flight, so the call was cut; {}",
        cut_advice(*.write)
    )]
    DrainCut { secs: u64, write: bool },
    /// A concurrency limit shed the call (RESOURCE_EXHAUSTED with Gitaly's LimitError).
    #[error(transparent)]
    Limited(crate::limit::Limited),
}

/// What a client whose call the drain cut should do.
fn cut_advice(write: bool) -> &'static str {
    if write {
        "the write may or may not have been applied (the cluster's reaper finalizes its transaction within seconds): check the refs, then retry through another router"
    } else {
        "retry; another router serves it"
    }
}

/// `e` and every error below it, joined with ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(inner) = next {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        next = inner.source();
    }
    s
}

impl From<RouteError> for Status {
    fn from(e: RouteError) -> Status {
        let code = match &e {
            RouteError::UnknownMethod(_) | RouteError::NotYet { .. } => Code::Unimplemented,
            RouteError::EmptyRequest(_)
            | RouteError::Frame { .. }
            | RouteError::Repo(_)
            | RouteError::Stamp(_) => Code::InvalidArgument,
            RouteError::NotRegistered(_) => Code::NotFound,
            RouteError::AlreadyExists(_) => Code::AlreadyExists,
            RouteError::NoPlacement { .. } => Code::Unavailable,
            RouteError::Etcd { source, .. } if source.is_unavailable() => Code::Unavailable,
            RouteError::Etcd { .. } => Code::Internal,
            RouteError::NoReplica { .. }
            | RouteError::NoNode(_)
            | RouteError::ReadUnconfirmed(_)
            | RouteError::NoLease
            | RouteError::NoVote { .. }
            | RouteError::OutcomeUnknown { .. }
            | RouteError::NotWritten { .. }
            | RouteError::TooFewAnswered { .. }
            | RouteError::DrainCut { .. } => Code::Unavailable,
            RouteError::Internal(_) => Code::Internal,
            RouteError::QuarantinedWrite(_) => Code::InvalidArgument,
            RouteError::NoQuarantine { .. } | RouteError::Gitlab { .. } => Code::FailedPrecondition,
            RouteError::Client(s) => return s.clone(),
            RouteError::Limited(l) => return l.status(),
        };
        Status::new(code, chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_the_cause() {
        let repo = RepoId::new("default", "a.git").unwrap();
        let s = Status::from(RouteError::NotRegistered(repo));
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("default/a.git"), "{s:?}");
        let s = Status::from(RouteError::from(
            RepoId::new("default", "../x").unwrap_err(),
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("leaves the storage"), "{s:?}");
        let s = Status::from(RouteError::UnknownMethod("/gitaly.X/Y".into()));
        assert_eq!(s.code(), Code::Unimplemented);
        assert!(s.message().contains("/gitaly.X/Y"));
    }

    #[test]
    fn a_call_cut_by_the_drain_says_so_and_whether_it_may_have_written() {
        let s = Status::from(RouteError::DrainCut {
            secs: 2,
            write: true,
        });
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("shutting down"), "{s:?}");
        assert!(s.message().contains("drain_timeout_secs (2 s)"), "{s:?}");
        assert!(
            s.message().contains("may or may not have been applied"),
            "{s:?}"
        );
        let s = Status::from(RouteError::DrainCut {
            secs: 2,
            write: false,
        });
        assert!(s.message().contains("another router serves it"), "{s:?}");
    }
}
