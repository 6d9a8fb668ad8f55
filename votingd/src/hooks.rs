//! The hooks directory every repository's `core.hooksPath` points to: votingd links the
//! hook binary into it and writes the hook's config beside it at start-up. Below it,
//! [`GATED_DIR`] holds the same binary also as git's receive hooks, for the pushes
//! GitLab's checks gate (the node points those runs there; others never pay for a hook
//! they do not need).

use std::path::{Path, PathBuf};

/// File name git looks for.
pub const HOOK_NAME: &str = "reference-transaction";
/// The hook's config, read only for updates with no refvote context.
pub const HOOK_CONF: &str = "refvote-hook.conf";
/// The hooks directory of gated pushes, inside the hooks directory.
pub const GATED_DIR: &str = "gitlab";
/// git's receive hooks, which the binary also is in [`GATED_DIR`].
pub const RECEIVE_HOOKS: &[&str] = &["pre-receive", "update", "post-receive"];

/// The hooks directory of gated pushes for the hooks directory `dir`.
pub fn gated_dir(dir: &Path) -> PathBuf {
    dir.join(GATED_DIR)
}

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
    let gated = gated_dir(dir);
    std::fs::create_dir_all(&gated)?;
    link(dir, HOOK_NAME, binary)?;
    write_conf(dir, require_transaction)?;
    for name in std::iter::once(HOOK_NAME).chain(RECEIVE_HOOKS.iter().copied()) {
        link(&gated, name, binary)?;
    }
    write_conf(&gated, require_transaction)
}

/// Makes `dir/name` a symlink to `binary`.
fn link(dir: &Path, name: &str, binary: &Path) -> std::io::Result<()> {
    let link = dir.join(name);
    let current = std::fs::read_link(&link).ok();
    if current.as_deref() != Some(binary) {
        // Replace atomically: a push running right now sees the old or the new hook.
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(binary, &tmp)?;
        std::fs::rename(&tmp, &link)?;
    }
    Ok(())
}

fn write_conf(dir: &Path, require_transaction: bool) -> std::io::Result<()> {
    let conf = format!(
        "# Written by votingd at start-up; edit votingd's config instead.\n\
         require_transaction = {require_transaction}\n"
    );
    let tmp = dir.join(format!(".{HOOK_CONF}.{}", std::process::id()));
    std::fs::write(&tmp, conf)?;
    std::fs::rename(&tmp, dir.join(HOOK_CONF))
}

/// Whether the hook in `dir` is in place and executable, also as the receive hooks of
/// gated pushes.
pub fn installed(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: PathBuf| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    executable(dir.join(HOOK_NAME))
        && RECEIVE_HOOKS
            .iter()
            .all(|h| executable(gated_dir(dir).join(h)))
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
