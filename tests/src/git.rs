//! Real git for tests: a work repository that makes commits, bare replicas wired to a
//! node's hooks, and pushes run with a refvote transaction in the hook's environment.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, bail};

/// Runs git in `dir` and returns stdout (trimmed); fails with stderr on a non-zero exit.
pub fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
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
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Creates a bare repository at `path` whose `core.hooksPath` is `hooks`, configured
/// as votingd runs git for mutators (fsync of refs and objects, no automatic gc).
pub fn init_bare(path: &Path, hooks: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path)?;
    git(
        path,
        &["init", "--bare", "--quiet", "--initial-branch=main"],
    )?;
    for (k, v) in [
        (
            "core.hooksPath",
            hooks.to_str().context("hooks path is UTF-8")?,
        ),
        ("core.fsync", "objects,reference,derived-metadata"),
        ("core.fsyncMethod", "fsync"),
        ("receive.autogc", "false"),
        ("gc.auto", "0"),
        ("maintenance.auto", "false"),
    ] {
        git(path, &["config", k, v])?;
    }
    Ok(())
}

/// The oid `refname` points to in `repo`, or `None`.
pub fn rev(repo: &Path, refname: &str) -> Option<String> {
    git(repo, &["rev-parse", "--verify", "--quiet", refname])
        .ok()
        .filter(|s| !s.is_empty())
}

/// Every ref of `repo` as `<oid> <name>` lines.
pub fn refs(repo: &Path) -> String {
    git(repo, &["for-each-ref", "--format=%(objectname) %(refname)"]).unwrap_or_default()
}

/// A non-bare repository that makes commits to push.
pub struct WorkRepo {
    pub path: PathBuf,
    counter: std::cell::Cell<u64>,
}

impl WorkRepo {
    pub fn new(path: &Path) -> anyhow::Result<WorkRepo> {
        std::fs::create_dir_all(path)?;
        git(path, &["init", "--quiet", "--initial-branch=main"])?;
        git(path, &["config", "user.name", "refvote test"])?;
        git(path, &["config", "user.email", "test@refvote.invalid"])?;
        git(path, &["config", "core.hooksPath", "/dev/null"])?;
        Ok(WorkRepo {
            path: path.to_owned(),
            counter: Default::default(),
        })
    }

    /// Commits a new file on `branch` (created from the current HEAD if missing);
    /// returns the new commit id.
    pub fn commit(&self, branch: &str, message: &str) -> anyhow::Result<String> {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        if rev(&self.path, &format!("refs/heads/{branch}")).is_some() {
            git(&self.path, &["checkout", "--quiet", branch])?;
        } else {
            git(&self.path, &["checkout", "--quiet", "-B", branch])?;
        }
        std::fs::write(
            self.path.join(format!("file-{n}.txt")),
            format!("{message}\n{n}\n"),
        )?;
        git(&self.path, &["add", "-A"])?;
        git(&self.path, &["commit", "--quiet", "-m", message])?;
        git(&self.path, &["rev-parse", "HEAD"])
    }
}

/// `git push` from `work` into the bare repository `target`, with `env` added (the
/// refvote transaction). Returns git's output; failure is a value, not an error.
pub async fn push(
    work: &Path,
    target: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<Output> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.current_dir(work)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .arg("push")
        .arg("--porcelain")
        .arg(target)
        .args(args)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output().await?)
}
