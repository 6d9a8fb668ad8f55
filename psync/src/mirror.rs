//! The local bare repositories partition sync works in: on the producer, a mirror of
//! each source repository (kept between runs in the cache, refreshed with one fetch);
//! on a git-target consumer, a mirror of each target repository that bundles are
//! fetched into before they are pushed on. Each method is one or two git runs.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::git::{Git, GitError, Running};
use crate::refs::{RefPatterns, RefSet};

/// A local bare repository.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub path: PathBuf,
    git: Git,
}

/// What an incremental bundle must say about its base, computed from a rev walk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// Commits the bundle builds on (`-<oid>` lines): boundary commits, and ref tips the
    /// bundle carries no objects for.
    pub prerequisites: Vec<String>,
    /// Whether the bundle carries any new commit at all.
    pub new_commits: u64,
}

impl Mirror {
    /// Opens the bare repository at `path`, creating an empty one of `object_format`
    /// (`sha1`, `sha256`) if missing.
    pub async fn open_or_init(
        git: &Git,
        path: &Path,
        object_format: &str,
    ) -> Result<Mirror, GitError> {
        if !path.join("objects").is_dir() {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| GitError::Io {
                    command: "init".into(),
                    source,
                })?;
            }
            let format = format!("--object-format={object_format}");
            git.run(
                None,
                [
                    "init".as_ref(),
                    "--bare".as_ref(),
                    "--quiet".as_ref(),
                    format.as_ref(),
                    path.as_os_str(),
                ],
            )
            .await?;
        }
        Ok(Mirror {
            path: path.to_owned(),
            git: git.clone(),
        })
    }

    /// Opens the mirror of `url` at `path`, cloning it (`git clone --mirror`, which
    /// takes the source's object format) if missing. The clone goes to a temporary
    /// name first, so a run cut short leaves no half mirror behind.
    pub async fn open_or_clone(git: &Git, url: &str, path: &Path) -> Result<Mirror, GitError> {
        if !path.join("objects").is_dir() {
            let io = |source| GitError::Io {
                command: "clone".into(),
                source,
            };
            let parent = path.parent().expect("a mirror path has a parent");
            std::fs::create_dir_all(parent).map_err(io)?;
            let tmp = parent.join(format!(
                ".{}.cloning",
                path.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("mirror")
            ));
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io)?;
            }
            git.run(
                None,
                [
                    "clone".as_ref(),
                    "--mirror".as_ref(),
                    "--quiet".as_ref(),
                    url.as_ref(),
                    tmp.as_os_str(),
                ],
            )
            .await?;
            std::fs::rename(&tmp, path).map_err(io)?;
        }
        Ok(Mirror {
            path: path.to_owned(),
            git: git.clone(),
        })
    }

    async fn output(&self, args: &[&str], stdin: Option<Vec<u8>>) -> Result<String, GitError> {
        self.git.output(Some(&self.path), args, stdin).await
    }

    /// Makes the mirror's refs (those `patterns` select) exactly `url`'s: one fetch
    /// with prune; with `follow_head`, one `ls-remote` more to point HEAD where
    /// `url`'s points.
    pub async fn fetch_from(
        &self,
        url: &str,
        patterns: &RefPatterns,
        follow_head: bool,
    ) -> Result<(), GitError> {
        let mut args: Vec<String> = vec![
            "fetch".into(),
            "--prune".into(),
            "--no-tags".into(),
            "--no-write-fetch-head".into(),
            "--quiet".into(),
            url.into(),
        ];
        args.extend(patterns.refspecs());
        self.git.run(Some(&self.path), &args).await?;
        if !follow_head {
            return Ok(());
        }
        let head = self
            .git
            .output(
                Some(&self.path),
                ["ls-remote", "--symref", url, "HEAD"],
                None,
            )
            .await?;
        if let Some(target) = parse_symref(&head) {
            self.set_head(&target).await?;
        }
        Ok(())
    }

    /// The refs `patterns` select, and HEAD's target.
    pub async fn refs(&self, patterns: &RefPatterns) -> Result<RefSet, GitError> {
        let list = self
            .output(&["for-each-ref", "--format=%(objectname) %(refname)"], None)
            .await?;
        let head = self
            .output(&["symbolic-ref", "-q", "HEAD"], None)
            .await
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        let all = RefSet::parse(&list, head).map_err(|e| GitError::Failed {
            command: "for-each-ref".into(),
            status: "unexpected output".into(),
            stderr: e,
        })?;
        Ok(all.filtered(patterns))
    }

    pub async fn set_head(&self, target: &str) -> Result<(), GitError> {
        self.git
            .run(Some(&self.path), ["symbolic-ref", "HEAD", target])
            .await
    }

    /// `sha1` or `sha256`.
    pub async fn object_format(&self) -> Result<String, GitError> {
        Ok(self
            .output(&["rev-parse", "--show-object-format"], None)
            .await?
            .trim()
            .to_owned())
    }

    /// Which of `oids` this repository has.
    pub async fn present(&self, oids: &[String]) -> Result<Vec<String>, GitError> {
        if oids.is_empty() {
            return Ok(Vec::new());
        }
        let input: String = oids.iter().map(|o| format!("{o}\n")).collect();
        let out = self
            .output(
                &["cat-file", "--batch-check=%(objectname)"],
                Some(input.into_bytes()),
            )
            .await?;
        let have: HashSet<&str> = out.lines().filter(|l| !l.ends_with(" missing")).collect();
        Ok(oids
            .iter()
            .filter(|o| have.contains(o.as_str()))
            .cloned()
            .collect())
    }

    /// The commit each of `tips` peels to (tags followed); tips that are not commits
    /// (a tag of a tree) are left out.
    pub async fn peeled_commits(&self, tips: &[String]) -> Result<BTreeSet<String>, GitError> {
        if tips.is_empty() {
            return Ok(BTreeSet::new());
        }
        let input: String = tips.iter().map(|o| format!("{o}^{{commit}}\n")).collect();
        let out = self
            .output(
                &["cat-file", "--batch-check=%(objectname) %(objecttype)"],
                Some(input.into_bytes()),
            )
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.strip_suffix(" commit"))
            .map(str::to_owned)
            .collect())
    }

    /// Walks from `tips` down to `exclude` and works out the bundle's prerequisites.
    pub async fn walk(&self, tips: &[String], exclude: &[String]) -> Result<Walk, GitError> {
        let tip_commits = self.peeled_commits(tips).await?;
        let mut input = String::new();
        for t in tips {
            input.push_str(t);
            input.push('\n');
        }
        for e in exclude {
            input.push('^');
            input.push_str(e);
            input.push('\n');
        }
        let mut run = self.git.spawn(
            Some(&self.path),
            ["rev-list", "--boundary", "--stdin"],
            Some(input.into_bytes()),
        )?;
        let mut lines = BufReader::new(&mut run.stdout).lines();
        let mut prerequisites = BTreeSet::new();
        let mut new_tips = HashSet::new();
        let mut new_commits = 0u64;
        while let Some(line) = lines.next_line().await.map_err(|source| GitError::Io {
            command: "rev-list".into(),
            source,
        })? {
            if let Some(b) = line.strip_prefix('-') {
                prerequisites.insert(b.to_owned());
            } else {
                new_commits += 1;
                if tip_commits.contains(&line) {
                    new_tips.insert(line);
                }
            }
        }
        drop(lines);
        run.wait().await?;
        // A ref whose commit the bundle does not carry must already be on the target:
        // say so, so `git bundle verify` checks it there.
        for c in &tip_commits {
            if !new_tips.contains(c) {
                prerequisites.insert(c.clone());
            }
        }
        Ok(Walk {
            prerequisites: prerequisites.into_iter().collect(),
            new_commits,
        })
    }

    /// Starts `git pack-objects` for the objects reachable from `tips` and not from
    /// `exclude`; the pack is read from [`Running::stdout`]. Thin (deltas against
    /// excluded objects) when there is something to exclude, as `git bundle` does.
    pub fn pack(&self, tips: &[String], exclude: &[String]) -> Result<Running, GitError> {
        let mut input = String::new();
        for t in tips {
            input.push_str(t);
            input.push('\n');
        }
        for e in exclude {
            input.push('^');
            input.push_str(e);
            input.push('\n');
        }
        let mut args = vec![
            "pack-objects",
            "--stdout",
            "--revs",
            "--delta-base-offset",
            "--quiet",
        ];
        if !exclude.is_empty() {
            args.push("--thin");
        }
        self.git
            .spawn(Some(&self.path), args, Some(input.into_bytes()))
    }

    /// `git bundle verify`: the bundle is well-formed and its prerequisites are here.
    pub async fn verify_bundle(&self, bundle: &Path) -> Result<(), GitError> {
        self.git
            .run(
                Some(&self.path),
                [
                    "bundle".as_ref(),
                    "verify".as_ref(),
                    "--quiet".as_ref(),
                    bundle.as_os_str(),
                ],
            )
            .await
    }

    /// Makes the refs `patterns` select exactly the bundle's (`--prune`), in one
    /// atomic ref transaction.
    pub async fn fetch_bundle(
        &self,
        bundle: &Path,
        patterns: &RefPatterns,
    ) -> Result<(), GitError> {
        let mut args: Vec<std::ffi::OsString> = [
            "fetch",
            "--prune",
            "--atomic",
            "--no-tags",
            "--no-write-fetch-head",
            "--quiet",
        ]
        .iter()
        .map(Into::into)
        .collect();
        args.push(bundle.as_os_str().to_owned());
        args.extend(patterns.refspecs().into_iter().map(Into::into));
        self.git.run(Some(&self.path), args).await
    }

    /// Deletes every ref `patterns` select, in one transaction.
    pub async fn clear_refs(&self, patterns: &RefPatterns) -> Result<(), GitError> {
        let refs = self.refs(patterns).await?;
        if refs.refs.is_empty() {
            return Ok(());
        }
        let input: String = refs
            .refs
            .iter()
            .map(|(name, oid)| format!("delete {name} {oid}\n"))
            .collect();
        self.output(&["update-ref", "--stdin"], Some(input.into_bytes()))
            .await
            .map(|_| ())
    }

    /// Pushes the refs `patterns` select to `url` in one atomic push, forced, deleting
    /// the remote's refs that are not here.
    pub async fn push_to(&self, url: &str, patterns: &RefPatterns) -> Result<(), GitError> {
        let mut args: Vec<String> = vec![
            "push".into(),
            "--atomic".into(),
            "--prune".into(),
            "--no-verify".into(),
            "--quiet".into(),
            url.into(),
        ];
        args.extend(patterns.refspecs());
        self.git.run(Some(&self.path), &args).await
    }
}

/// HEAD's target from `git ls-remote --symref URL HEAD` (`ref: refs/heads/main\tHEAD`).
pub fn parse_symref(ls_remote: &str) -> Option<String> {
    ls_remote.lines().find_map(|l| {
        let rest = l.strip_prefix("ref: ")?;
        let (target, name) = rest.split_once('\t')?;
        (name == "HEAD").then(|| target.to_owned())
    })
}

/// Parses `git ls-remote URL` output into refs (peeled `^{}` lines and HEAD left out).
pub fn parse_ls_remote(out: &str) -> Result<RefSet, String> {
    let mut lines = String::new();
    for l in out.lines().filter(|l| !l.is_empty()) {
        let (oid, name) = l
            .split_once('\t')
            .ok_or_else(|| format!("unexpected ls-remote line {l:?}"))?;
        if name == "HEAD" || name.ends_with("^{}") || !name.starts_with("refs/") {
            continue;
        }
        lines.push_str(&format!("{oid} {name}\n"));
    }
    RefSet::parse(&lines, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ls_remote() {
        assert_eq!(
            parse_symref(
                "ref: refs/heads/main\tHEAD\n1111111111111111111111111111111111111111\tHEAD\n"
            ),
            Some("refs/heads/main".into())
        );
        assert_eq!(parse_symref(""), None);
        let a = "1111111111111111111111111111111111111111";
        let r = parse_ls_remote(&format!(
            "{a}\tHEAD\n{a}\trefs/heads/main\n{a}\trefs/tags/v1\n{a}\trefs/tags/v1^{{}}\n"
        ))
        .unwrap();
        assert_eq!(r.refs.len(), 2);
    }
}
