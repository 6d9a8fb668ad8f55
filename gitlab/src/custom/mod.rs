//! Custom server hooks, laid out, found, fed and judged as Gitaly does it.
//!
//! For hook `<name>` (`pre-receive`, `update`, `post-receive`) these run, in order:
//! 1. `<repository>/custom_hooks/<name>`
//! 2. `<repository>/custom_hooks/<name>.d/*`, sorted by file name
//! 3. `<custom_hooks_dir>/<name>.d/*`, sorted by file name
//!
//! A file counts only if it is executable by us, is not a directory and does not end
//! in `~`. Each runs in the repository's directory with the push's changes on stdin
//! (`update`: none, the ref and its old and new value as arguments) and an environment
//! made from scratch ([`hook_env`]); its stdout and stderr go to the pusher as they
//! come. The first hook that fails stops the rest: its output and exit status are the
//! refusal. All hooks of one run share one deadline; at the deadline the running hook's
//! whole process group is killed, and dropping the run kills it too.
//!
//! [`mod@env`] builds the environment; the private `hook` module names a run's parts
//! (which hook, its input, where output goes, how it ended), `run` runs one hook
//! process.

pub mod env;
mod hook;
mod run;

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::settings::HooksSettings;

pub use env::hook_env;
pub use hook::{
    CAPTURE_LIMIT, Collect, CustomHookError, HookExit, HookKind, Invocation, OutputSink,
};

/// The custom hooks of this node.
#[derive(Debug, Clone)]
pub struct CustomHooks {
    global_dir: Option<PathBuf>,
    timeout: Duration,
}

/// `path` is a hook Gitaly would run.
fn is_valid_hook(path: &Path) -> bool {
    if path.as_os_str().as_bytes().ends_with(b"~") {
        return false;
    }
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok(),
        _ => false,
    }
}

fn hooks_in(dir: &Path) -> Result<Vec<PathBuf>, CustomHookError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CustomHookError::Find {
                dir: dir.to_owned(),
                source,
            });
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CustomHookError::Find {
            dir: dir.to_owned(),
            source,
        })?;
        names.push(entry.file_name());
    }
    names.sort();
    Ok(names
        .into_iter()
        .map(|n| dir.join(n))
        .filter(|p| is_valid_hook(p))
        .collect())
}

impl CustomHooks {
    pub fn new(settings: &HooksSettings) -> CustomHooks {
        CustomHooks {
            global_dir: settings.custom_hooks_dir.clone(),
            timeout: settings.timeout(),
        }
    }

    /// The hooks that would run for `kind` in the repository at `repo_path`, in order.
    pub fn find(&self, repo_path: &Path, kind: HookKind) -> Result<Vec<PathBuf>, CustomHookError> {
        let name = kind.name();
        let own = repo_path.join("custom_hooks");
        let mut hooks = Vec::new();
        let single = own.join(name);
        if is_valid_hook(&single) {
            hooks.push(single);
        }
        hooks.extend(hooks_in(&own.join(format!("{name}.d")))?);
        if let Some(global) = &self.global_dir {
            hooks.extend(hooks_in(&global.join(format!("{name}.d")))?);
        }
        Ok(hooks)
    }

    /// Runs every hook of `run.kind` in order, streaming output into `sink`; the first
    /// failure ends the run. No hooks: `Ok`.
    pub async fn run(
        &self,
        run: &Invocation<'_>,
        sink: &mut dyn OutputSink,
    ) -> Result<(), CustomHookError> {
        let hooks = self.find(run.repo_path, run.kind)?;
        let deadline = Instant::now() + self.timeout;
        for hook in hooks {
            run::run_one(&hook, run, deadline, self.timeout, sink).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn executable(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn finds_hooks_in_gitalys_order() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo.git");
        let global = dir.path().join("global");
        let own = repo.join("custom_hooks");
        executable(&own.join("pre-receive"), "#!/bin/sh\n");
        executable(&own.join("pre-receive.d/20-b"), "#!/bin/sh\n");
        executable(&own.join("pre-receive.d/10-a"), "#!/bin/sh\n");
        executable(&own.join("pre-receive.d/30-backup~"), "#!/bin/sh\n");
        std::fs::write(own.join("pre-receive.d/15-not-executable"), "").unwrap();
        std::fs::create_dir_all(own.join("pre-receive.d/12-dir")).unwrap();
        executable(&global.join("pre-receive.d/00-global"), "#!/bin/sh\n");
        executable(&global.join("update.d/x"), "#!/bin/sh\n");
        let hooks = CustomHooks::new(&HooksSettings {
            custom_hooks_dir: Some(global.clone()),
            ..Default::default()
        });
        assert_eq!(
            hooks.find(&repo, HookKind::PreReceive).unwrap(),
            vec![
                own.join("pre-receive"),
                own.join("pre-receive.d/10-a"),
                own.join("pre-receive.d/20-b"),
                global.join("pre-receive.d/00-global"),
            ]
        );
        assert_eq!(
            hooks.find(&repo, HookKind::Update).unwrap(),
            vec![global.join("update.d/x")]
        );
        assert!(hooks.find(&repo, HookKind::PostReceive).unwrap().is_empty());
        // Without a global directory, only the repository's own.
        let own_only = CustomHooks::new(&HooksSettings::default());
        assert_eq!(own_only.find(&repo, HookKind::PreReceive).unwrap().len(), 3);
        // A hooks "directory" that is a file is an error, as in Gitaly.
        std::fs::write(own.join("post-receive.d"), "").unwrap();
        assert!(matches!(
            hooks.find(&repo, HookKind::PostReceive),
            Err(CustomHookError::Find { .. })
        ));
    }

    #[test]
    fn refusal_messages_prefer_stderr() {
        let failed = |stdout: &[u8], stderr: &[u8]| CustomHookError::Failed {
            kind: HookKind::PreReceive,
            hook: "/h".into(),
            exit: HookExit::Code(3),
            stdout: stdout.to_vec(),
            stderr: stderr.to_vec(),
        };
        assert_eq!(
            failed(b"out", b"GL-HOOK-ERR: no\n").message(),
            "GL-HOOK-ERR: no\n"
        );
        assert_eq!(failed(b"out\n", b" \n").message(), "out\n");
        assert_eq!(
            failed(b"", b"").message(),
            "error executing \"/h\": exit status 3"
        );
        assert_eq!(failed(b"", b"").exit_code(), 3);
    }
}
