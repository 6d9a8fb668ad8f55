//! The etcd key schema. Every key refvote reads or writes is built here, so the router,
//! votingd and votingctl can never disagree on one.
//!
//! Layout under the prefix (default `/refvote/`):
//!
//! | key | value |
//! | --- | --- |
//! | `nodes/<node>` | [`NodeRecord`](crate::records::NodeRecord), on the node's lease |
//! | `repos/<repo>` | [`RepoRecord`](crate::records::RepoRecord) |
//! | `replicas/<repo>/<node>` | [`ReplicaRecord`](crate::records::ReplicaRecord) |
//! | `tx/<id>/record` | [`TxRecord`](crate::records::TxRecord); its presence means "open" |
//! | `tx/<id>/alive` | empty, on the creator's lease |
//! | `tx/<id>/voters/<voter>` | empty: marks the voter set, for compares |
//! | `tx/<id>/started/<voter>` | empty: the voter's node began the RPC |
//! | `tx/<id>/votes/<key>/<voter>` | [`VoteRecord`](crate::records::VoteRecord) |
//! | `tx/<id>/decided/<key>` | [`Decision`](crate::records::Decision), created once |
//! | `tx/<id>/confirmed/<key>/<voter>` | empty |
//! | `tx/<id>/done/<voter>` | [`DoneRecord`](crate::records::DoneRecord) |
//! | `tx/<id>/verdict` | [`VerdictRecord`](crate::records::VerdictRecord), created once (gated transactions) |
//! | `postreceive/<id>` | who runs GitLab's post-receive of a committed transaction, on the asking router's lease |
//! | `postreceive-pending/<id>` | [`PendingPostReceive`](crate::records::PendingPostReceive): that post-receive is owed, written when the transaction ends |
//! | `txrepo/<repo>/<id>` | empty: index of a repository's open transactions |
//! | `outcomes/<id>` | [`TxOutcome`](crate::records::TxOutcome), on the finalizer's lease |
//! | `jobs/repair/<repo>/<node>` | [`JobRecord`](crate::records::JobRecord) |
//! | `claims/repair/<repo>/<node>` | the repair worker working on that job, on its lease |
//! | `locks/<repo>` | [`LockRecord`](crate::records::LockRecord), on the holder's lease |
//! | `reaper` | the reaper's id, on its lease |
//! | `verifier/claims/<shard>` | the router verifying that shard of the repositories, on its lease |
//! | `verifier/status/<router>` | [`VerifierStatus`](crate::verifier::VerifierStatus) of that router's verifier, on its lease |
//! | `psync/applied/<repo>` | the last partition-sync sequence applied to the repository (votingctl's record) |
//! | `psync/consumer/<virtual storage>` | the partition-sync consumer applying to that storage, on its lease |
//!
//! `<repo>` is `<virtual storage>/<relative path>` with `%` and `/` of the relative path
//! percent-encoded, so a repository's key never contains another one's as a prefix.

use crate::repo::RepoId;

/// Builds keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` is used as given, plus a trailing `/` if it lacks one.
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }

    /// `routers/<id>`: a router's registration, bound to its lease, so the routers
    /// alive (and the leases their transactions hang on) can be seen in etcd.
    pub fn router(&self, id: &str) -> String {
        format!("{}routers/{id}", self.prefix)
    }

    pub fn repos(&self) -> String {
        format!("{}repos/", self.prefix)
    }

    pub fn repo(&self, repo: &RepoId) -> String {
        format!("{}repos/{}", self.prefix, repo.key_segment())
    }

    /// `psync/applied/<repo>`: which partition-sync sequence a consumer last applied
    /// to the repository (`votingctl partition-sync consume`).
    pub fn psync_applied(&self, repo: &RepoId) -> String {
        format!("{}psync/applied/{}", self.prefix, repo.key_segment())
    }

    /// `psync/consumer/<virtual storage>`: the one partition-sync consumer applying to
    /// `virtual_storage` now (who and since when), bound to that consumer's lease.
    pub fn psync_consumer(&self, virtual_storage: &str) -> String {
        format!("{}psync/consumer/{virtual_storage}", self.prefix)
    }

    pub fn replicas(&self, repo: &RepoId) -> String {
        format!("{}replicas/{}/", self.prefix, repo.key_segment())
    }

    pub fn replica(&self, repo: &RepoId, node: &str) -> String {
        format!("{}{node}", self.replicas(repo))
    }

    pub fn tx(&self, tx: &str) -> String {
        format!("{}tx/{tx}/", self.prefix)
    }

    pub fn tx_record(&self, tx: &str) -> String {
        format!("{}record", self.tx(tx))
    }

    pub fn tx_alive(&self, tx: &str) -> String {
        format!("{}alive", self.tx(tx))
    }

    pub fn votes(&self, tx: &str, key: &str) -> String {
        format!("{}votes/{key}/", self.tx(tx))
    }

    pub fn vote(&self, tx: &str, key: &str, voter: &str) -> String {
        format!("{}{voter}", self.votes(tx, key))
    }

    pub fn all_votes(&self, tx: &str) -> String {
        format!("{}votes/", self.tx(tx))
    }

    pub fn decided(&self, tx: &str, key: &str) -> String {
        format!("{}decided/{key}", self.tx(tx))
    }

    pub fn all_decided(&self, tx: &str) -> String {
        format!("{}decided/", self.tx(tx))
    }

    pub fn confirmed(&self, tx: &str, key: &str, voter: &str) -> String {
        format!("{}confirmed/{key}/{voter}", self.tx(tx))
    }

    pub fn all_confirmed(&self, tx: &str) -> String {
        format!("{}confirmed/", self.tx(tx))
    }

    pub fn voter(&self, tx: &str, voter: &str) -> String {
        format!("{}voters/{voter}", self.tx(tx))
    }

    pub fn started(&self, tx: &str, voter: &str) -> String {
        format!("{}{voter}", self.all_started(tx))
    }

    pub fn all_started(&self, tx: &str) -> String {
        format!("{}started/", self.tx(tx))
    }

    pub fn done(&self, tx: &str, voter: &str) -> String {
        format!("{}{voter}", self.all_done(tx))
    }

    pub fn all_done(&self, tx: &str) -> String {
        format!("{}done/", self.tx(tx))
    }

    /// GitLab's verdict in a gated transaction.
    pub fn verdict(&self, tx: &str) -> String {
        format!("{}verdict", self.tx(tx))
    }

    /// The claim on running GitLab's post-receive for a transaction: outside its
    /// prefix, so it outlives the transaction's end.
    pub fn post_receive(&self, tx: &str) -> String {
        format!("{}postreceive/{tx}", self.prefix)
    }

    /// Post-receive owed for an acknowledged gated transaction: written in the txn
    /// that ends it, deleted once it ran.
    pub fn post_receive_pending(&self, tx: &str) -> String {
        format!("{}{tx}", self.post_receive_pending_all())
    }

    pub fn post_receive_pending_all(&self) -> String {
        format!("{}postreceive-pending/", self.prefix)
    }

    pub fn txrepo_all(&self) -> String {
        format!("{}txrepo/", self.prefix)
    }

    pub fn txrepo(&self, repo: &RepoId) -> String {
        format!("{}txrepo/{}/", self.prefix, repo.key_segment())
    }

    pub fn txrepo_entry(&self, repo: &RepoId, tx: &str) -> String {
        format!("{}{tx}", self.txrepo(repo))
    }

    pub fn outcome(&self, tx: &str) -> String {
        format!("{}outcomes/{tx}", self.prefix)
    }

    pub fn jobs(&self) -> String {
        format!("{}jobs/", self.prefix)
    }

    pub fn repair_job(&self, repo: &RepoId, node: &str) -> String {
        format!("{}jobs/repair/{}/{node}", self.prefix, repo.key_segment())
    }

    pub fn repair_jobs(&self) -> String {
        format!("{}jobs/repair/", self.prefix)
    }

    /// Who is repairing `node`'s replica of `repo` (bound to the worker's lease, so a
    /// dead worker's claim lapses).
    pub fn repair_claim(&self, repo: &RepoId, node: &str) -> String {
        format!("{}claims/repair/{}/{node}", self.prefix, repo.key_segment())
    }

    /// The repair jobs of one repository.
    pub fn repair_jobs_of(&self, repo: &RepoId) -> String {
        format!("{}jobs/repair/{}/", self.prefix, repo.key_segment())
    }

    pub fn repair_claims_of(&self, repo: &RepoId) -> String {
        format!("{}claims/repair/{}/", self.prefix, repo.key_segment())
    }

    pub fn repair_claims(&self) -> String {
        format!("{}claims/repair/", self.prefix)
    }

    pub fn lock(&self, repo: &RepoId) -> String {
        format!("{}locks/{}", self.prefix, repo.key_segment())
    }

    pub fn reaper(&self) -> String {
        format!("{}reaper", self.prefix)
    }

    pub fn verifier_claims(&self) -> String {
        format!("{}verifier/claims/", self.prefix)
    }

    /// Who verifies the repositories of `shard` (bound to that router's lease).
    pub fn verifier_claim(&self, shard: u32) -> String {
        format!("{}{shard}", self.verifier_claims())
    }

    pub fn verifier_statuses(&self) -> String {
        format!("{}verifier/status/", self.prefix)
    }

    pub fn verifier_status(&self, router: &str) -> String {
        format!("{}{router}", self.verifier_statuses())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_keys_do_not_nest() {
        let keys = Keys::new("/refvote");
        let a = RepoId::new("default", "a.git").unwrap();
        let nested = RepoId::new("default", "a.git/b.git").unwrap();
        assert_eq!(keys.replicas(&a), "/refvote/replicas/default/a.git/");
        assert!(!keys.replica(&nested, "n1").starts_with(&keys.replicas(&a)));
        assert_eq!(
            keys.replica(&nested, "n1"),
            "/refvote/replicas/default/a.git%2Fb.git/n1"
        );
    }

    #[test]
    fn transaction_keys() {
        let keys = Keys::new("/p/");
        assert_eq!(keys.vote("t", "k.0", "n2"), "/p/tx/t/votes/k.0/n2");
        assert_eq!(keys.decided("t", "k.0"), "/p/tx/t/decided/k.0");
        assert!(keys.done("t", "n1").starts_with(&keys.tx("t")));
        assert!(!keys.outcome("t").starts_with(&keys.tx("t")));
        // The claim and the pending marker never share a prefix.
        assert!(
            !keys
                .post_receive_pending("t")
                .starts_with(&keys.post_receive("t"))
        );
        assert_eq!(keys.post_receive_pending("t"), "/p/postreceive-pending/t");
    }
}
