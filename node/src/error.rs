//! The node service's errors and the one place they become `tonic::Status` codes.
//!
//! Codes follow what Gitaly returns for the same condition, so GitLab clients react
//! the same way; messages say what to do about it.

use tonic::{Code, Status};

use super::git::GitError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The request itself is wrong: missing fields, bad paths, bad ref names.
    #[error("{0}")]
    InvalidArgument(String),
    /// Gitaly answers a storage name it does not serve with NOT_FOUND.
    #[error("storage not found: {0:?} is not a storage of this node")]
    StorageNotFound(String),
    #[error("repository not found: {0}")]
    RepositoryNotFound(String),
    #[error("repository already exists: {0}")]
    RepositoryExists(String),
    /// Something the request names (a revision, a ref) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The repository is not in the state the request needs (e.g. nothing to bundle).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request lost a race (a ref moved or is locked) or its vote: retry.
    #[error("{0}")]
    Aborted(String),
    /// The repository on disk is damaged.
    #[error("{0}")]
    DataLoss(String),
    /// A write arrived without a refvote transaction on a node that requires one.
    #[error(
        "this node only accepts writes inside a refvote transaction (vote.require_transaction = true): send the call through a refvote router"
    )]
    TransactionRequired,
    /// The transaction named in the request metadata cannot be joined.
    #[error("cannot join refvote transaction {tx}")]
    Transaction {
        tx: String,
        #[source]
        source: refvote_cluster::Error,
    },
    /// The repository is held by maintenance or repair for longer than the caller
    /// waits.
    #[error("repository busy: {what}")]
    Busy { what: String },
    #[error(transparent)]
    Git(#[from] GitError),
    /// A local file-system step failed; `what` names the step.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl NodeError {
    pub fn invalid(message: impl Into<String>) -> NodeError {
        NodeError::InvalidArgument(message.into())
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> NodeError {
        NodeError::Io {
            what: what.into(),
            source,
        }
    }

    fn code(&self) -> Code {
        use refvote_cluster::Error as E;
        match self {
            NodeError::InvalidArgument(_) => Code::InvalidArgument,
            NodeError::StorageNotFound(_)
            | NodeError::RepositoryNotFound(_)
            | NodeError::NotFound(_) => Code::NotFound,
            NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
            NodeError::Aborted(_) => Code::Aborted,
            NodeError::DataLoss(_) => Code::DataLoss,
            NodeError::RepositoryExists(_) => Code::AlreadyExists,
            NodeError::TransactionRequired => Code::FailedPrecondition,
            NodeError::Transaction { source, .. } => match source {
                e if e.is_unavailable() => Code::Unavailable,
                // The creator's lease is gone: the transaction is being reaped.
                E::Abandoned(_) => Code::Aborted,
                _ => Code::FailedPrecondition,
            },
            NodeError::Busy { .. } => Code::Unavailable,
            NodeError::Git(e) => e.code(),
            NodeError::Io { .. } => Code::Internal,
        }
    }
}

/// A git failure answers as [`NodeError::Git`] does.
impl From<GitError> for Status {
    fn from(e: GitError) -> Status {
        NodeError::from(e).into()
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let code = e.code();
        // `{:#}`-style: the whole chain, so the operator sees the underlying cause.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        match code {
            Code::Internal | Code::Unavailable => tracing::warn!(%message, ?code, "rpc failed"),
            _ => tracing::debug!(%message, ?code, "rpc refused"),
        }
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_gitaly() {
        let s = Status::from(NodeError::StorageNotFound("x".into()));
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("\"x\""), "{}", s.message());
        let s = Status::from(NodeError::invalid("relative path escapes root directory"));
        assert_eq!(s.code(), Code::InvalidArgument);
        let s = Status::from(NodeError::TransactionRequired);
        assert_eq!(s.code(), Code::FailedPrecondition);
        let s = Status::from(NodeError::Transaction {
            tx: "t".into(),
            source: refvote_cluster::Error::Abandoned("t".into()),
        });
        assert_eq!(s.code(), Code::Aborted);
        assert!(s.message().contains("abandoned"), "{}", s.message());
    }
}
