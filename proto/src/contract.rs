//! The wire contract between refvote's parts that is not a protobuf message, defined
//! once: the gRPC metadata key by which the router names a transaction to a node
//! ([`TX_METADATA`]), what a transaction id may look like ([`is_transaction_id`]),
//! and the environment through which the node hands a transaction to git's
//! `reference-transaction` hook ([`ENV_TX`], [`ENV_VOTER`], [`ENV_SOCKET`],
//! [`ENV_MAINTENANCE`]). Plain constants and functions: the hook uses them without a
//! gRPC stack.

use std::path::Path;

/// The request metadata key naming the refvote transaction a mutator runs in: the
/// router sets it on every call it forwards inside a transaction; the node joins that
/// transaction (value: the transaction id).
pub const TX_METADATA: &str = "refvote-transaction";

/// Longest transaction id a node or votingd accepts (the router's ids are far shorter).
pub const MAX_TRANSACTION_ID: usize = 128;

/// A well-formed transaction id: 1 to [`MAX_TRANSACTION_ID`] bytes of ASCII letters,
/// digits, `-` and `_`. Whatever creates transactions must create ids like this (the
/// router's are UUIDs as 32 hex digits); the node refuses other metadata values and
/// votingd other votes.
pub fn is_transaction_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TRANSACTION_ID
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_'))
}

/// The hook's environment: the transaction git's ref updates are voted in. Absent: the
/// update is outside refvote.
pub const ENV_TX: &str = "REFVOTE_TX";
/// The hook's environment: the node name this replica votes as.
pub const ENV_VOTER: &str = "REFVOTE_VOTER";
/// The hook's environment: votingd's vote socket.
pub const ENV_SOCKET: &str = "REFVOTE_SOCKET";
/// The hook's environment: set to [`MAINTENANCE_ON`] for runs votingd starts itself
/// (repair, maintenance), which the hook lets pass.
pub const ENV_MAINTENANCE: &str = "REFVOTE_MAINTENANCE";
/// The value of [`ENV_MAINTENANCE`] that marks a run.
pub const MAINTENANCE_ON: &str = "1";

/// The environment the node gives git so its hook votes in transaction `tx` as `voter`
/// through the vote socket `socket`.
pub fn transaction_env(tx: &str, voter: &str, socket: &Path) -> Vec<(String, String)> {
    vec![
        (ENV_TX.into(), tx.into()),
        (ENV_VOTER.into(), voter.into()),
        (ENV_SOCKET.into(), socket.display().to_string()),
    ]
}

/// The environment of a run votingd starts itself: the hook lets it pass.
pub fn maintenance_env() -> Vec<(String, String)> {
    vec![(ENV_MAINTENANCE.into(), MAINTENANCE_ON.into())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids() {
        assert!(is_transaction_id("0f3c2a9e4b7d41c8a6e5f0b1c2d3e4f5"));
        assert!(is_transaction_id("tx-1_a"));
        assert!(is_transaction_id(&"a".repeat(MAX_TRANSACTION_ID)));
        for bad in [
            "",
            "a b",
            "a/b",
            "é",
            "a\n",
            &"a".repeat(MAX_TRANSACTION_ID + 1),
        ] {
            assert!(!is_transaction_id(bad), "{bad:?}");
        }
    }
}
