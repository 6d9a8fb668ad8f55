use std::time::Duration;

use crate::repo::RepoId;

/// What can go wrong talking to etcd about refvote's state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd request failed: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?} (no quorum, or unreachable)")]
    Timeout(Duration),
    #[error("malformed record at {key}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("repository {0} is not registered")]
    UnknownRepo(RepoId),
    #[error("repository {0} already exists")]
    RepoExists(RepoId),
    #[error("unknown transaction {0} (never created, or already finished)")]
    UnknownTx(String),
    #[error("{voter:?} is not a voter of transaction {tx}")]
    NotAVoter { tx: String, voter: String },
    #[error(
        "{voter:?} was not started in transaction {tx} (its node service never began the call)"
    )]
    NotStarted { tx: String, voter: String },
    #[error(
        "{voter:?} takes no further part in transaction {tx}: it was reported done (its call failed or was given up)"
    )]
    VoterDone { tx: String, voter: String },
    #[error("not enough replicas are up to date: {up} of {assigned} up, {needed} needed")]
    NoQuorum {
        up: usize,
        assigned: usize,
        needed: usize,
    },
    #[error("{0}")]
    Locked(Box<LockedBy>),
    #[error("repository {repo} still has {open} open transactions after {wait:?}")]
    NotDrained {
        /// The repository, as `<storage>/<path>`.
        repo: String,
        open: usize,
        wait: Duration,
    },
    #[error("transaction {0} was abandoned: its creator's lease expired")]
    Abandoned(String),
    #[error("no decision on the vote within {0:?}")]
    NoDecision(Duration),
    #[error("transaction {tx} is not finished: {waiting}")]
    NotFinished { tx: String, waiting: String },
    #[error("gave up after {0} attempts against concurrent changes")]
    Contention(u32),
    #[error(
        "cannot place a new repository: {live} live nodes, {needed} needed (one replica per node)"
    )]
    TooFewNodes { live: usize, needed: usize },
    #[error("{0}")]
    Invalid(String),
    /// A call gated by GitLab's checks found voters that disagree on calling GitLab, or
    /// on running custom hooks.
    #[error(
        "GitLab's {what} is configured on {with:?} but not on {without:?}: configure [gitlab] alike on every storage node, and [hooks] custom_hooks_dir too"
    )]
    MixedGitlab {
        /// What differs: "internal API" or "custom hooks directory".
        what: &'static str,
        with: Vec<String>,
        without: Vec<String>,
    },
}

/// Who holds a repository's administrative lock, for the writer it turns away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("repository {repo} is locked by {operation} ({holder}) since {since}; retry later")]
pub struct LockedBy {
    pub repo: RepoId,
    pub operation: String,
    pub holder: String,
    pub since: String,
}

impl Error {
    /// etcd could not be reached or did not answer: the caller should fail closed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Etcd(_) | Error::Timeout(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
