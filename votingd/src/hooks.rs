//! The hooks directory every repository's `core.hooksPath` points to: votingd links the
//! hook binary into it and writes the hook's config beside it at start-up.

use std::path::{Path, PathBuf};

/// File name git looks for.
pub const HOOK_NAME: &str = "reference-transaction";
/// The hook's config, read only for updates with no refvote context.
pub const HOOK_CONF: &str = "refvote-hook.conf";

/// Makes `dir/reference-transaction` point at `binary` and writes the hook config.
pub fn install(dir: &Path, binary: &Path, require_transaction: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if !binary.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "hook binary {} does not exist (set vote.hook_binary)",
                binary.display()
            ),
        ));
    }
    let link = dir.join(HOOK_NAME);
    let current = std::fs::read_link(&link).ok();
    if current.as_deref() != Some(binary) {
        // Replace atomically: a push running right now sees the old or the new hook.
        let tmp = dir.join(format!(".{HOOK_NAME}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(binary, &tmp)?;
        std::fs::rename(&tmp, &link)?;
    }
    let conf = format!(
        "# Written by votingd at start-up; edit votingd's config instead.\n\
         require_transaction = {require_transaction}\n"
    );
    let tmp = dir.join(format!(".{HOOK_CONF}.{}", std::process::id()));
    std::fs::write(&tmp, conf)?;
    std::fs::rename(&tmp, dir.join(HOOK_CONF))?;
    Ok(())
}

/// Whether the hook in `dir` is in place and executable.
pub fn installed(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(dir.join(HOOK_NAME))
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Repositories found under a storage, and how many point `core.hooksPath` at `hooks`.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct StorageHooks {
    pub repositories: usize,
    pub hooked: usize,
    /// A few repositories without the hook, for the operator to look at.
    pub missing: Vec<String>,
}

/// Walks `storage` (bounded depth) for bare repositories and reads each one's config.
pub fn check_storage(storage: &Path, hooks: &Path) -> StorageHooks {
    let mut out = StorageHooks::default();
    let mut stack: Vec<(PathBuf, usize)> = vec![(storage.to_owned(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        if dir.join("HEAD").is_file() && dir.join("objects").is_dir() {
            out.repositories += 1;
            if repo_hooks_path(&dir).as_deref() == Some(hooks) {
                out.hooked += 1;
            } else if out.missing.len() < 5 {
                let rel = dir.strip_prefix(storage).unwrap_or(&dir);
                out.missing.push(rel.display().to_string());
            }
            continue;
        }
        if depth >= 6 {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    out
}

/// `core.hooksPath` from a repository's own config file (no git process needed).
fn repo_hooks_path(repo: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(repo.join("config")).ok()?;
    let mut in_core = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_core = line.eq_ignore_ascii_case("[core]");
            continue;
        }
        if in_core
            && let Some((k, v)) = line.split_once('=')
            && k.trim().eq_ignore_ascii_case("hookspath")
        {
            return Some(PathBuf::from(v.trim().trim_matches('"')));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hooks_path_from_config() {
        let dir = std::env::temp_dir().join(format!("refvote-hooks-test-{}", std::process::id()));
        let repo = dir.join("g/p.git");
        std::fs::create_dir_all(repo.join("objects")).unwrap();
        std::fs::write(repo.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(
            repo.join("config"),
            "[core]\n\tbare = true\n\thooksPath = /h\n",
        )
        .unwrap();
        let other = dir.join("q.git");
        std::fs::create_dir_all(other.join("objects")).unwrap();
        std::fs::write(other.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(other.join("config"), "[core]\n\tbare = true\n").unwrap();
        let s = check_storage(&dir, Path::new("/h"));
        assert_eq!((s.repositories, s.hooked), (2, 1));
        assert_eq!(s.missing, vec!["q.git".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
