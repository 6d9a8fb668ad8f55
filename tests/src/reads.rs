//! The read fixture: a 3-node cluster with a router ([`Fixture`]) and the repository
//! `tests/fixtures/read-repo.sh` builds mirrored to every replica and registered in
//! etcd (plus an empty repository), and what the read tests compare their answers
//! with: git's own output on a replica, for the same question.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use refvote_cluster::RepoId;
use refvote_proto::gitaly::Repository;
use tonic::transport::Channel;

use crate::cluster::{Fixture, VoteCluster};
use crate::git;
use crate::router::Router;

/// The fixture's repository and an empty one, as clients name them.
pub const REPO: &str = "group/reads.git";
pub const EMPTY: &str = "group/empty.git";

pub struct ReadCluster {
    /// Its one router is `cluster.routers[0]` ([`ReadCluster::router`]).
    pub cluster: VoteCluster,
    pub id: RepoId,
    /// The work repository the script built.
    pub work: PathBuf,
}

impl ReadCluster {
    /// Starts 3 nodes, 1 etcd member and a router; builds the fixture (with `extra`
    /// run in the work repository after the script, if given) and mirrors every ref
    /// to each replica.
    pub async fn start(extra: Option<&str>) -> anyhow::Result<ReadCluster> {
        let cluster = Fixture::nodes(3).router().start().await?;
        let id = cluster.create_repo(REPO).await?;
        cluster.create_repo(EMPTY).await?;
        let work = cluster.path("fixture");
        build_fixture(&work)?;
        if let Some(script) = extra {
            run_script(&work, script)?;
        }
        for n in &cluster.nodes {
            let out = git::push(&work, &n.repo(REPO), &["--mirror"], &[]).await?;
            anyhow::ensure!(
                out.status.success(),
                "mirroring the fixture to {}: {}",
                n.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(ReadCluster { cluster, id, work })
    }

    pub fn router(&self) -> &Router {
        &self.cluster.routers[0]
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        self.router().channel().await
    }

    /// node1's replica, where the expected answers come from.
    pub fn replica(&self) -> PathBuf {
        self.cluster.nodes[0].repo(REPO)
    }

    /// git's stdout in the replica, bytes as they are.
    pub fn git(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        git_bytes(&self.replica(), args)
    }

    /// The object id `rev` names in the replica.
    pub fn rev(&self, rev: &str) -> anyhow::Result<String> {
        let out = self.git(&["rev-parse", "--verify", rev])?;
        Ok(String::from_utf8(out)?.trim().to_owned())
    }

    /// git's stdout in the replica as text, without the final newline.
    pub fn git_text(&self, args: &[&str]) -> anyhow::Result<String> {
        let text = String::from_utf8(self.git(args)?).context("git printed UTF-8")?;
        Ok(text.strip_suffix('\n').unwrap_or(&text).to_owned())
    }

    /// The non-empty lines git prints in the replica.
    pub fn git_lines(&self, args: &[&str]) -> anyhow::Result<Vec<String>> {
        Ok(self
            .git_text(args)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// The public half of the key the fixture's SSH signatures were made with.
    pub fn signing_key(&self) -> PathBuf {
        PathBuf::from(format!("{}.key.pub", self.work.display()))
    }
}

/// Runs `tests/fixtures/read-repo.sh DIR`.
pub fn build_fixture(dir: &Path) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/read-repo.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .context("running read-repo.sh")?;
    if !out.status.success() {
        bail!(
            "read-repo.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs a shell snippet in `dir` with the fixture's identity.
pub fn run_script(dir: &Path, script: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "Read Fixture")
        .env("GIT_AUTHOR_EMAIL", "reads@refvote.invalid")
        .env("GIT_COMMITTER_NAME", "Read Fixture")
        .env("GIT_COMMITTER_EMAIL", "reads@refvote.invalid")
        .output()?;
    if !out.status.success() {
        bail!("script failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// git's stdout in `dir`, unchanged; fails with stderr on a non-zero exit.
pub fn git_bytes(dir: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !out.status.success() {
        bail!(
            "git {args:?} in {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// A repository as clients name it.
pub fn repo(relative: &str) -> Option<Repository> {
    Some(Repository {
        storage_name: "default".into(),
        relative_path: relative.into(),
        ..Default::default()
    })
}

/// Every message of a server stream, or the status that ended it.
pub async fn collect<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>,
) -> Result<Vec<T>, tonic::Status> {
    let mut stream = call.await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m);
    }
    Ok(out)
}

/// Splits NUL-terminated fields.
pub fn nul_fields(data: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = data.split(|b| *b == 0).map(<[u8]>::to_vec).collect();
    if out.last().is_some_and(Vec::is_empty) {
        out.pop();
    }
    out
}
