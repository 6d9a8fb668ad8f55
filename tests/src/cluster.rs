//! The voting-core fixture: a real etcd (1, 3 or 5 members), N real votingd nodes each
//! with a storage of bare repositories wired to its hook, and a [`Store`] the test
//! uses to create and finalize transactions the way the router will.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::Context;
use refvote_cluster::records::{TxOutcome, TxRecord};
use refvote_cluster::session::Session;
use refvote_cluster::tx::Begin;
use refvote_cluster::{RepoId, Store, StoreConfig};

use crate::etcd::Etcd;
use crate::git::{self, WorkRepo};
use crate::node::{Node, NodeOptions};

pub struct VoteCluster {
    pub etcd: Etcd,
    pub nodes: Vec<Node>,
    pub store: Store,
    /// The test's own lease, standing in for a router's.
    pub session: Session,
    pub dir: tempfile::TempDir,
}

impl VoteCluster {
    pub async fn start(nodes: usize, etcd_members: usize) -> anyhow::Result<VoteCluster> {
        Self::start_with(nodes, etcd_members, NodeOptions::default()).await
    }

    pub async fn start_with(
        nodes: usize,
        etcd_members: usize,
        opts: NodeOptions,
    ) -> anyhow::Result<VoteCluster> {
        let dir = tempfile::Builder::new().prefix("refvote-test-").tempdir()?;
        let etcd = Etcd::start(etcd_members).await?;
        let mut started = Vec::new();
        for i in 1..=nodes {
            started.push(
                Node::start(&format!("node{i}"), dir.path(), &etcd.endpoints(), &opts).await?,
            );
        }
        let store = Store::connect(&StoreConfig {
            endpoints: etcd.endpoints(),
            prefix: "/refvote/".into(),
            request_timeout: Duration::from_secs(2),
            tls: None,
        })
        .await?;
        let session = Session::start(store.clone(), Duration::from_secs(3), |_| async { Ok(()) });
        session
            .wait_for_lease(Duration::from_secs(10))
            .await
            .context("test lease")?;
        Ok(VoteCluster {
            etcd,
            nodes: started,
            store,
            session,
            dir,
        })
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("known node")
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// A bare repository on every node, registered in etcd with a replica on each.
    pub async fn create_repo(&self, relative: &str) -> anyhow::Result<RepoId> {
        for n in &self.nodes {
            git::init_bare(&n.repo(relative), &n.hooks)?;
        }
        let repo = RepoId::new("default", relative)?;
        self.store
            .create_repository(&repo, &self.node_names(), "")
            .await?;
        Ok(repo)
    }

    /// A work repository to make commits in.
    pub fn work(&self, name: &str) -> anyhow::Result<WorkRepo> {
        WorkRepo::new(&self.dir.path().join("work").join(name))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub async fn begin(&self, repo: &RepoId) -> anyhow::Result<TxRecord> {
        let lease = self.session.lease().context("the test holds no lease")?;
        Ok(self
            .store
            .begin(
                repo,
                &Begin {
                    creator: "test".into(),
                    lease,
                },
            )
            .await?)
    }

    /// Pushes from `work` to `node`'s replica inside `tx`, then records the voter done
    /// with git's exit status, as votingd's node service will.
    pub async fn push_as(
        &self,
        tx: &TxRecord,
        node: &str,
        work: &WorkRepo,
        args: &[&str],
    ) -> anyhow::Result<Output> {
        let n = self.node(node);
        self.store.start_voter(&tx.id, node).await?;
        let out = git::push(
            &work.path,
            &n.repo(&tx.repo.relative_path),
            args,
            &n.tx_env(&tx.id),
        )
        .await?;
        self.store
            .done(&tx.id, node, out.status.success(), "")
            .await?;
        Ok(out)
    }

    /// The same push on every voter of `tx`, concurrently.
    pub async fn push_all(
        &self,
        tx: &TxRecord,
        work: &WorkRepo,
        args: &[&str],
    ) -> anyhow::Result<Vec<(String, Output)>> {
        let pushes = tx
            .voters
            .iter()
            .map(|v| async move { (v.clone(), self.push_as(tx, v, work, args).await) });
        let results = futures::future::join_all(pushes).await;
        results
            .into_iter()
            .map(|(v, r)| r.map(|o| (v, o)))
            .collect()
    }

    pub async fn finalize(&self, tx: &TxRecord) -> anyhow::Result<TxOutcome> {
        let lease = self.session.lease().unwrap_or(0);
        Ok(self
            .store
            .finalize(&tx.id, "test", lease, Duration::from_secs(20))
            .await?)
    }
}
