//! Which repositories a run covers: the config's exact paths and prefixes, matched
//! against what exists. On the producer, prefixes are resolved by the source's
//! registry (the refvote cluster's, through `votingctl`), or, for a source that is a
//! local directory, by looking for bare repositories under it. On the consumer, the
//! bucket's folders are the candidates.

use std::path::{Path, PathBuf};

use crate::config::RepositoriesConfig;

/// Whether the config's list selects `repository` (an empty list selects all).
pub fn selects(config: &RepositoriesConfig, repository: &str) -> bool {
    if config.paths.is_empty() && config.prefixes.is_empty() {
        return true;
    }
    config.paths.iter().any(|p| p == repository)
        || config
            .prefixes
            .iter()
            .any(|p| repository.starts_with(p.as_str()))
}

/// The config's exact paths plus the `found` repositories its prefixes select,
/// sorted, without duplicates.
pub fn resolve(config: &RepositoriesConfig, found: &[String]) -> Vec<String> {
    let mut out: Vec<String> = config.paths.clone();
    out.extend(
        found
            .iter()
            .filter(|r| config.prefixes.iter().any(|p| r.starts_with(p.as_str())))
            .cloned(),
    );
    out.sort();
    out.dedup();
    out
}

/// The directory a source or target URL names, if it is local (`/srv/git/` or
/// `file:///srv/git/`).
pub fn local_dir(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("file://").unwrap_or(url);
    path.starts_with('/').then(|| PathBuf::from(path))
}

/// `base` with `repository` appended.
pub fn join_url(base: &str, repository: &str) -> String {
    if base.ends_with('/') {
        format!("{base}{repository}")
    } else {
        format!("{base}/{repository}")
    }
}

/// The bare repositories under `base` whose relative paths start with one of
/// `prefixes` (directories holding `objects/` and `HEAD`; not descended into).
pub fn list_local(base: &Path, prefixes: &[String]) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut stack = vec![base.to_owned()];
    // A bound on the walk, so a wrong base (`/`) fails instead of scanning a disk.
    let mut visited = 0usize;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > 200_000 {
            return Err(std::io::Error::other(format!(
                "more than 200000 directories under {}; is source.url right?",
                base.display()
            )));
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let path = entry.path();
            let rel = path
                .strip_prefix(base)
                .expect("under base")
                .to_string_lossy()
                .into_owned();
            if path.join("objects").is_dir() && path.join("HEAD").is_file() {
                if prefixes.iter().any(|p| rel.starts_with(p.as_str())) {
                    found.push(rel);
                }
                continue;
            }
            // Descend only where a prefix can still match.
            let as_dir = format!("{rel}/");
            if prefixes
                .iter()
                .any(|p| p.starts_with(&as_dir) || as_dir.starts_with(p.as_str()))
            {
                stack.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(paths: &[&str], prefixes: &[&str]) -> RepositoriesConfig {
        RepositoriesConfig {
            paths: paths.iter().map(|s| s.to_string()).collect(),
            prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
            refs: vec!["refs/*".into()],
        }
    }

    #[test]
    fn lists_select_repositories() {
        let c = config(&["a/x.git"], &["b/"]);
        assert!(selects(&c, "a/x.git"));
        assert!(selects(&c, "b/y/z.git"));
        assert!(!selects(&c, "a/y.git"));
        assert!(selects(&config(&[], &[]), "anything.git"));
        let found = vec!["b/1.git".to_string(), "c/2.git".into(), "a/x.git".into()];
        assert_eq!(resolve(&c, &found), vec!["a/x.git", "b/1.git"]);
    }

    #[test]
    fn urls_join_and_local_dirs_are_recognised() {
        assert_eq!(
            join_url("http://r:8080/", "g/p.git"),
            "http://r:8080/g/p.git"
        );
        assert_eq!(
            join_url("http://r:8080", "g/p.git"),
            "http://r:8080/g/p.git"
        );
        assert_eq!(
            local_dir("file:///srv/git/"),
            Some(PathBuf::from("/srv/git/"))
        );
        assert_eq!(local_dir("/srv/git"), Some(PathBuf::from("/srv/git")));
        assert_eq!(local_dir("https://host/"), None);
    }

    #[test]
    fn local_repositories_are_found_under_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        for p in ["g/a.git", "g/sub/b.git", "h/c.git"] {
            let r = dir.path().join(p);
            std::fs::create_dir_all(r.join("objects")).unwrap();
            std::fs::write(r.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        }
        let found = list_local(dir.path(), &["g/".into()]).unwrap();
        assert_eq!(found, vec!["g/a.git", "g/sub/b.git"]);
        assert_eq!(
            list_local(dir.path(), &["g/sub/".into()]).unwrap(),
            vec!["g/sub/b.git"]
        );
    }
}
