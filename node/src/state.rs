//! What every RPC handler shares: the node's name, storages, git, transaction settings,
//! repository locks, the credentials for calling another node and the fetch deadline.

use std::sync::Arc;
use std::time::Duration;

use refvote_auth::Secret;

use crate::engine::ReadEngine;
use crate::git::Git;
use crate::gitlab::GitlabSide;
use crate::repolock::RepoLocks;
use crate::storage::Storages;
use crate::tx::TxSettings;

/// What every RPC handler shares.
pub struct NodeState {
    pub name: String,
    pub storages: Storages,
    pub git: Git,
    /// Object lookups through pooled `git cat-file` processes.
    pub reads: ReadEngine,
    pub tx: TxSettings,
    /// Orders ref-writing git runs against maintenance and repair.
    pub locks: RepoLocks,
    /// The `[auth]` secret: checked on every call (see [`crate::serve`]) and used to sign
    /// calls to another node (repair's source).
    pub secret: Option<Arc<Secret>>,
    /// How a `tls://` node is reached (repair's source), from `[tls] ca_path`.
    pub client_tls: Option<tonic::transport::ClientTlsConfig>,
    /// How long a fetching client has to end its negotiation with `done` before
    /// upload-pack is stopped (`[timeout] upload_pack_negotiation_secs`).
    pub upload_pack_negotiation: Duration,
    /// GitLab's checks and post-receive for calls by a GitLab user.
    pub gitlab: Arc<GitlabSide>,
}
