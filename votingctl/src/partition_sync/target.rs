//! The refvote cluster as a partition-sync target. Every sequence reaches the
//! cluster through its router, so it is voted on by the repository's replicas like
//! any write and lands on at least a majority of them (a replica that is down is
//! repaired afterwards, as after any write):
//!
//! - a repository the cluster does not have yet is created from the first bundle
//!   with `CreateRepositoryFromBundle` (placed on `replication_factor` live nodes,
//!   registered, created as one voted write);
//! - every later sequence is fetched from its bundle into a local mirror of the
//!   target and pushed to the router's git HTTP in one atomic, forced push that also
//!   deletes the refs the source deleted: one ref transaction, one vote. (Gitaly's
//!   `FetchBundle` never prunes, so it could not follow a deleted branch in the same
//!   write.)
//!
//! - where the source's HEAD points is followed: when the sequence's HEAD names one of
//!   its refs and the cluster's HEAD points elsewhere, a `WriteRef` of `HEAD` (voted
//!   like any write) moves it, after the refs landed.
//!
//! The record of what was applied lives in the target cluster's etcd
//! (`psync/applied/<repo>`), written only after the write was acknowledged and only
//! while this consumer still holds its claim on the storage ([`super::claim`]).

use std::path::Path;
use std::time::Duration;

use etcd_client::{Compare, Txn, TxnOp};
use futures_util::stream;
use refvote_cluster::RepoId;
use refvote_cluster::store::encode;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{
    CreateRepositoryFromBundleRequest, CreateRepositoryRequest, FindDefaultBranchNameRequest,
    ObjectFormat, Repository, WriteRefRequest,
};
use refvote_psync::consume::Target;
use refvote_psync::context::now;
use refvote_psync::error::SyncError;
use refvote_psync::fault;
use refvote_psync::git_target::GitTarget;
use refvote_psync::manifest::Manifest;
use refvote_psync::plan::Applied;
use refvote_psync::refs::RefSet;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::connect::Ctl;

/// Bundle bytes per `CreateRepositoryFromBundle` message (Gitaly streams 128 KiB).
const CHUNK: usize = 128 * 1024;

/// What etcd holds per repository: the last sequence applied and the target's
/// fingerprint right after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRecord {
    pub sequence: u64,
    pub fingerprint: String,
    /// Unix seconds.
    pub applied_at: u64,
}

pub struct ClusterTarget {
    ctl: Ctl,
    virtual_storage: String,
    url: String,
    remote: GitTarget,
    timeout: Duration,
    /// Records are written only while this holds ([`super::claim::Claim::still_held`]).
    claimed: Compare,
    claim_key: String,
}

impl ClusterTarget {
    pub fn new(
        ctl: Ctl,
        virtual_storage: &str,
        url: &str,
        remote: GitTarget,
        timeout: Duration,
        claim: &super::claim::Claim,
    ) -> ClusterTarget {
        ClusterTarget {
            ctl,
            virtual_storage: virtual_storage.to_owned(),
            url: url.to_owned(),
            remote,
            timeout,
            claimed: claim.still_held(),
            claim_key: claim.key().to_owned(),
        }
    }

    fn id(&self, repository: &str) -> Result<RepoId, SyncError> {
        RepoId::new(&self.virtual_storage, repository)
            .map_err(|e| SyncError::Target(format!("{repository}: {e}")))
    }

    fn etcd(&self, e: refvote_cluster::Error) -> SyncError {
        SyncError::TargetUnavailable(format!(
            "the target cluster's etcd: {e}; check that a majority of its members run"
        ))
    }

    async fn registered(&self, id: &RepoId) -> Result<bool, SyncError> {
        let key = self.ctl.store.keys().repo(id);
        Ok(self
            .ctl
            .store
            .get(&key)
            .await
            .map_err(|e| self.etcd(e))?
            .is_some())
    }

    fn repository(&self, repository: &str) -> Repository {
        Repository {
            storage_name: self.virtual_storage.clone(),
            relative_path: repository.to_owned(),
            ..Default::default()
        }
    }

    async fn client(
        &self,
    ) -> Result<RepositoryServiceClient<refvote_auth::Signed<tonic::transport::Channel>>, SyncError>
    {
        let channel = self
            .ctl
            .router_channel()
            .await
            .map_err(|e| SyncError::TargetUnavailable(format!("{e:#}")))?;
        Ok(RepositoryServiceClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20))
    }

    /// Creates `repository` on the cluster from the first sequence's bundle, streamed
    /// from disk to the router (or, for a source with no refs, empty).
    async fn create(
        &self,
        repository: &str,
        manifest: &Manifest,
        bundle: &Path,
    ) -> Result<(), SyncError> {
        let mut client = self.client().await?;
        fault::point(fault::BEFORE_APPLY);
        let result = if manifest.refs.refs.is_empty() {
            let branch = manifest
                .refs
                .head
                .as_deref()
                .and_then(|h| h.strip_prefix("refs/heads/"))
                .unwrap_or("main");
            let mut request = tonic::Request::new(CreateRepositoryRequest {
                repository: Some(self.repository(repository)),
                default_branch: branch.as_bytes().to_vec(),
                object_format: if manifest.object_format == "sha256" {
                    ObjectFormat::Sha256 as i32
                } else {
                    ObjectFormat::Sha1 as i32
                },
            });
            request.set_timeout(self.timeout);
            client.create_repository(request).await.map(|_| ())
        } else {
            let file = tokio::fs::File::open(bundle)
                .await
                .map_err(|e| SyncError::io(bundle, e))?;
            let first = Some(self.repository(repository));
            // A read error ends the stream early: the node then refuses the truncated
            // bundle (its pack checksum fails) and nothing is created.
            let messages = stream::unfold((file, first), |(mut file, first)| async move {
                let mut data = vec![0u8; CHUNK];
                match file.read(&mut data).await {
                    Ok(0) => None,
                    Ok(n) => {
                        data.truncate(n);
                        let m = CreateRepositoryFromBundleRequest {
                            repository: first,
                            data,
                        };
                        Some((m, (file, None)))
                    }
                    Err(e) => {
                        tracing::warn!("reading the bundle: {e}");
                        None
                    }
                }
            });
            let mut request = tonic::Request::new(messages);
            request.set_timeout(self.timeout);
            client
                .create_repository_from_bundle(request)
                .await
                .map(|_| ())
        };
        result.map_err(|s| self.refused("creating", repository, s))?;
        if !manifest.refs.refs.is_empty() {
            self.remote
                .keep_locally(repository, manifest, bundle)
                .await?;
        }
        Ok(())
    }

    /// Points the cluster's HEAD where the source's pointed at this sequence's tip, if
    /// that is one of the refs carried and HEAD points elsewhere now. A source HEAD
    /// that is detached, or names a ref not carried, leaves the target's alone.
    async fn point_head(&self, repository: &str, manifest: &Manifest) -> Result<(), SyncError> {
        let Some(head) = manifest.refs.head.as_deref() else {
            return Ok(());
        };
        if !manifest.refs.refs.contains_key(head) {
            return Ok(());
        }
        let channel = self
            .ctl
            .router_channel()
            .await
            .map_err(|e| SyncError::TargetUnavailable(format!("{e:#}")))?;
        let mut request = tonic::Request::new(FindDefaultBranchNameRequest {
            repository: Some(self.repository(repository)),
            head_only: true,
        });
        request.set_timeout(self.timeout);
        let now = RefServiceClient::new(channel)
            .find_default_branch_name(request)
            .await
            .map_err(|s| self.refused("reading HEAD of", repository, s))?
            .into_inner()
            .name;
        if now == head.as_bytes() {
            return Ok(());
        }
        let mut request = tonic::Request::new(WriteRefRequest {
            repository: Some(self.repository(repository)),
            r#ref: b"HEAD".to_vec(),
            revision: head.as_bytes().to_vec(),
            ..Default::default()
        });
        request.set_timeout(self.timeout);
        self.client()
            .await?
            .write_ref(request)
            .await
            .map_err(|s| self.refused("pointing HEAD of", repository, s))?;
        tracing::info!(%repository, %head, "HEAD follows the source");
        Ok(())
    }

    fn refused(&self, what: &str, repository: &str, s: tonic::Status) -> SyncError {
        let message = format!(
            "{what} {repository} through the router: {:?}: {}",
            s.code(),
            s.message()
        );
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                SyncError::TargetUnavailable(message)
            }
            _ => SyncError::Target(message),
        }
    }
}

impl Target for ClusterTarget {
    fn describe(&self) -> String {
        format!("refvote cluster (router {})", self.url)
    }

    async fn applied(&self, repository: &str) -> Result<Option<Applied>, SyncError> {
        let key = self.ctl.store.keys().psync_applied(&self.id(repository)?);
        let Some(entry) = self.ctl.store.get(&key).await.map_err(|e| self.etcd(e))? else {
            return Ok(None);
        };
        let r: AppliedRecord = entry.decode().map_err(|e| self.etcd(e))?;
        Ok(Some(Applied {
            sequence: r.sequence,
            fingerprint: r.fingerprint,
        }))
    }

    async fn current(&self, repository: &str) -> Result<Option<String>, SyncError> {
        if !self.registered(&self.id(repository)?).await? {
            return Ok(None);
        }
        self.remote.current(repository).await
    }

    fn fingerprint(&self, refs: &RefSet) -> String {
        self.remote.fingerprint(refs)
    }

    async fn apply(
        &self,
        repository: &str,
        manifest: &Manifest,
        bundle: &Path,
    ) -> Result<(), SyncError> {
        if self.registered(&self.id(repository)?).await? {
            self.remote.apply(repository, manifest, bundle).await?;
        } else {
            self.create(repository, manifest, bundle).await?;
        }
        Ok(())
    }

    async fn follow_head(&self, repository: &str, manifest: &Manifest) -> Result<(), SyncError> {
        self.point_head(repository, manifest).await
    }

    async fn record(&self, repository: &str, applied: &Applied) -> Result<(), SyncError> {
        let key = self.ctl.store.keys().psync_applied(&self.id(repository)?);
        let value = encode(&AppliedRecord {
            sequence: applied.sequence,
            fingerprint: applied.fingerprint.clone(),
            applied_at: now(),
        });
        let resp = self
            .ctl
            .store
            .txn(
                Txn::new()
                    .when([self.claimed.clone()])
                    .and_then([TxnOp::put(key, value, None)]),
            )
            .await
            .map_err(|e| self.etcd(e))?;
        if !resp.succeeded() {
            return Err(SyncError::Target(format!(
                "this consumer lost its claim {} (its etcd lease ran out: paused or cut off from etcd) after applying sequence {}; not recorded, the next run finds the target at that sequence's tip and records it",
                self.claim_key, applied.sequence
            )));
        }
        Ok(())
    }
}
