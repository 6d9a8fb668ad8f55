//! The common cluster fixture: a real etcd (1, 3 or 5 members), N real votingd nodes
//! each with a storage of bare repositories wired to its hook, a [`Store`] the test
//! uses to create and finalize transactions the way a router does, and, when asked,
//! real routers (serving git smart HTTP too) and a seeded repository. [`Fixture`]
//! builds the common shapes: `Fixture::nodes(3).seeded("p.git").router().start()`.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::Context;
use refvote_cluster::records::{TxOutcome, TxRecord};
use refvote_cluster::session::Session;
use refvote_cluster::tx::Begin;
use refvote_cluster::{RepoId, Store};
use refvote_proto::gitaly::CreateRepositoryRequest;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;

use crate::etcd::Etcd;
use crate::git::{self, WorkRepo};
use crate::node::{Node, NodeOptions};
use crate::router::{Router, RouterOptions};

/// What a test's cluster has. See the module docs.
#[derive(Debug, Clone)]
pub struct Fixture {
    nodes: usize,
    etcd_members: usize,
    node: NodeOptions,
    routers: Vec<RouterOptions>,
    seeded: Vec<String>,
}

impl Fixture {
    /// `n` nodes (`node1`…) on a one-member etcd, no router, no repository.
    pub fn nodes(n: usize) -> Fixture {
        Fixture {
            nodes: n,
            etcd_members: 1,
            node: NodeOptions::default(),
            routers: Vec::new(),
            seeded: Vec::new(),
        }
    }

    /// An etcd of `m` (1, 3 or 5) members.
    pub fn etcd_members(mut self, m: usize) -> Fixture {
        self.etcd_members = m;
        self
    }

    /// Every node started with `opts`.
    pub fn node_options(mut self, opts: NodeOptions) -> Fixture {
        self.node = opts;
        self
    }

    /// `relative` created on every node and registered with a replica on each, its
    /// `main` holding one commit (made in the work repository `w`, pushed to each
    /// replica directly), before any router starts.
    pub fn seeded(mut self, relative: &str) -> Fixture {
        self.seeded.push(relative.to_owned());
        self
    }

    /// One more router (`router1`, `router2`…), serving git smart HTTP too.
    pub fn router(self) -> Fixture {
        self.router_with(RouterOptions::default())
    }

    /// One more router started with `opts` (smart HTTP always on).
    pub fn router_with(mut self, opts: RouterOptions) -> Fixture {
        self.routers.push(RouterOptions { http: true, ..opts });
        self
    }

    pub async fn start(self) -> anyhow::Result<VoteCluster> {
        let dir = tempfile::Builder::new().prefix("refvote-test-").tempdir()?;
        let etcd = Etcd::start(self.etcd_members).await?;
        let mut nodes = Vec::new();
        for i in 1..=self.nodes {
            let name = format!("node{i}");
            nodes.push(Node::start(&name, dir.path(), &etcd.endpoints(), &self.node).await?);
        }
        let store = etcd.store().await?;
        let session = Session::start(store.clone(), Duration::from_secs(3), |_| async { Ok(()) });
        session
            .wait_for_lease(Duration::from_secs(10))
            .await
            .context("test lease")?;
        let mut c = VoteCluster {
            routers: Vec::new(),
            etcd,
            nodes,
            store,
            session,
            dir,
        };
        for relative in &self.seeded {
            c.seed(relative).await?;
        }
        let endpoints = c.etcd.endpoints();
        for (i, opts) in self.routers.iter().enumerate() {
            let name = format!("router{}", i + 1);
            let router = Router::start_with(&name, c.dir.path(), &endpoints, opts).await?;
            c.routers.push(router);
        }
        Ok(c)
    }
}

pub struct VoteCluster {
    /// Declared first, so they are stopped before the nodes and etcd.
    pub routers: Vec<Router>,
    pub etcd: Etcd,
    pub nodes: Vec<Node>,
    pub store: Store,
    /// The test's own lease, standing in for a router's.
    pub session: Session,
    pub dir: tempfile::TempDir,
}

impl VoteCluster {
    /// `nodes` nodes on an etcd of `etcd_members`: [`Fixture::nodes`] with no router.
    pub async fn start(nodes: usize, etcd_members: usize) -> anyhow::Result<VoteCluster> {
        Fixture::nodes(nodes)
            .etcd_members(etcd_members)
            .start()
            .await
    }

    pub async fn start_with(
        nodes: usize,
        etcd_members: usize,
        opts: NodeOptions,
    ) -> anyhow::Result<VoteCluster> {
        Fixture::nodes(nodes)
            .etcd_members(etcd_members)
            .node_options(opts)
            .start()
            .await
    }

    /// The repository id of `relative` in the `default` storage.
    pub fn repo_id(&self, relative: &str) -> RepoId {
        RepoId::new("default", relative).expect("a valid relative path")
    }

    /// [`VoteCluster::create_repo`], then one commit on `main` (work repository `w`)
    /// pushed to every replica directly.
    pub async fn seed(&self, relative: &str) -> anyhow::Result<RepoId> {
        let id = self.create_repo(relative).await?;
        let work = self.work("w")?;
        work.commit("main", "first")?;
        for n in &self.nodes {
            let out = git::push(&work.path, &n.repo(relative), &["main"], &[]).await?;
            anyhow::ensure!(out.status.success(), "{out:?}");
        }
        Ok(id)
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

    /// Creates `relative` through `router` (CreateRepository: placed on its replicas,
    /// default branch `main`), then pushes one commit on `main` to it with git over the
    /// router's HTTP port. Returns the work repository it pushed from and the commit.
    pub async fn create_and_push(
        &self,
        router: &Router,
        relative: &str,
    ) -> anyhow::Result<(WorkRepo, String)> {
        RepositoryServiceClient::new(router.channel().await?)
            .create_repository(CreateRepositoryRequest {
                repository: crate::grpc::repo(relative),
                default_branch: b"main".to_vec(),
                ..Default::default()
            })
            .await?;
        let work = self.work(&format!("w-{}", uuid::Uuid::new_v4().simple()))?;
        let head = work.commit("main", "first")?;
        let url = router.http_url(relative);
        let out = git::push(&work.path, std::path::Path::new(&url), &["main"], &[]).await?;
        anyhow::ensure!(out.status.success(), "{out:?}\n{}", router.log_tail(30));
        Ok((work, head))
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
