//! The read tests' fixture: a cluster of three real votingd nodes and a real router,
//! with the repository `tests/fixtures/read-repo.sh` builds pushed (mirrored) to every
//! replica and registered in etcd, an empty repository beside it, and git itself to
//! ask the same questions of a replica on disk, so a test compares the router's answer
//! with git's.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tonic::transport::Channel;

use crate::cluster::VoteCluster;
use crate::git::push;
use crate::router::Router;

/// The repository the fixture script builds, as clients name it.
pub const REPO: &str = "group/reads.git";
/// A repository without a commit.
pub const EMPTY: &str = "group/empty.git";

pub struct ReadFixture {
    pub cluster: VoteCluster,
    pub router: Router,
    pub channel: Channel,
    /// The work repository the script built (its `.key.pub` beside it).
    pub work: PathBuf,
}

impl ReadFixture {
    pub async fn start() -> anyhow::Result<ReadFixture> {
        let cluster = VoteCluster::start(3, 1).await?;
        cluster.create_repo(REPO).await?;
        cluster.create_repo(EMPTY).await?;
        let work = cluster.path("reads-work");
        build(&work)?;
        for n in &cluster.nodes {
            let out = push(&work, &n.repo(REPO), &["--mirror"], &[]).await?;
            if !out.status.success() {
                bail!(
                    "mirroring the fixture to {}: {}",
                    n.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let router = Router::start("router1", cluster.dir.path(), &cluster.etcd.endpoints()).await?;
        let channel = router.channel().await?;
        Ok(ReadFixture {
            cluster,
            router,
            channel,
            work,
        })
    }

    /// A replica on disk, to ask git the same questions (all replicas are equal).
    pub fn replica(&self) -> PathBuf {
        self.cluster.nodes[0].repo(REPO)
    }

    /// git's stdout in the replica, exactly (fails on a non-zero exit).
    pub fn git(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        git_raw(&self.replica(), args)
    }

    /// git's stdout in the replica as text, without the final newline.
    pub fn git_text(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.git(args)?;
        let text = String::from_utf8(out).context("git printed UTF-8")?;
        Ok(text.strip_suffix('\n').unwrap_or(&text).to_owned())
    }

    /// The lines git prints.
    pub fn git_lines(&self, args: &[&str]) -> anyhow::Result<Vec<String>> {
        Ok(self
            .git_text(args)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    pub fn rev(&self, rev: &str) -> anyhow::Result<String> {
        self.git_text(&["rev-parse", "--verify", rev])
    }

    /// The public half of the key the fixture's signatures were made with.
    pub fn signing_key(&self) -> PathBuf {
        PathBuf::from(format!("{}.key.pub", self.work.display()))
    }
}

/// Runs the fixture script into `work`.
pub fn build(work: &Path) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/read-repo.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(work)
        .output()
        .context("running the fixture script")?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// git's stdout in `dir`, exactly.
pub fn git_raw(dir: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", dir)
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

/// Every message of a server stream, or the status that ended it.
pub async fn collect<T>(
    call: impl Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>,
) -> Result<Vec<T>, tonic::Status> {
    let mut stream = call.await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m);
    }
    Ok(out)
}
