//! The environment a custom hook runs with, as Gitaly builds it. Pure.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use crate::context::HookContext;

/// Variables a custom hook inherits from the node's environment (Gitaly's list).
const INHERITED: &[&str] = &[
    "HOME",
    "PATH",
    "LD_LIBRARY_PATH",
    "TZ",
    "GIT_TRACE",
    "GIT_TRACE_PACK_ACCESS",
    "GIT_TRACE_PACKET",
    "GIT_TRACE_PERFORMANCE",
    "GIT_TRACE_SETUP",
    "GIT_EXEC_PATH",
    "all_proxy",
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "no_proxy",
    "NO_PROXY",
];

/// The environment of a custom hook, as Gitaly builds it (later entries win):
/// the inherited variables above, the push options (`GIT_PUSH_OPTION_COUNT`,
/// `GIT_PUSH_OPTION_<n>`), the quarantine (`GIT_OBJECT_DIRECTORY`,
/// `GIT_ALTERNATE_OBJECT_DIRECTORIES`, absolute), `PATH` with the directory of the git
/// the node runs in front, then `GIT_DIR`, `GL_REPOSITORY`, `GL_PROJECT_PATH`, `GL_ID`,
/// `GL_USERNAME`, `GL_PROTOCOL`.
///
/// One addition of ours: with a quarantine, `GIT_QUARANTINE_PATH` too, as git itself
/// sets it for hooks, so git refuses ref updates a hook would make while the vote on
/// this one is open (they would land on one replica only).
pub fn hook_env(
    context: &HookContext,
    repo_path: &Path,
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    git_binary: &Path,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = inherited
        .into_iter()
        .filter(|(k, _)| INHERITED.iter().any(|name| OsStr::new(name) == k))
        .collect();
    let mut set = |k: &str, v: OsString| env.push((k.into(), v));
    if !context.push_options.is_empty() {
        set(
            "GIT_PUSH_OPTION_COUNT",
            context.push_options.len().to_string().into(),
        );
        for (i, option) in context.push_options.iter().enumerate() {
            set(&format!("GIT_PUSH_OPTION_{i}"), option.into());
        }
    }
    if let Some(dirs) = &context.object_directories {
        let (objects, alternates) = dirs.absolute(repo_path);
        set("GIT_OBJECT_DIRECTORY", objects.clone().into());
        set("GIT_ALTERNATE_OBJECT_DIRECTORIES", alternates.into());
        set("GIT_QUARANTINE_PATH", objects.into());
    }
    let git_dir = git_binary.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = git_dir {
        let current = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let mut path = dir.as_os_str().to_owned();
        path.push(":");
        path.push(current);
        env.push(("PATH".into(), path));
    }
    let mut set = |k: &str, v: &str| env.push((k.into(), v.into()));
    set("GIT_DIR", &repo_path.to_string_lossy());
    set("GL_REPOSITORY", &context.gl_repository);
    set("GL_PROJECT_PATH", &context.gl_project_path);
    set("GL_ID", &context.gl_id);
    set("GL_USERNAME", &context.gl_username);
    set("GL_PROTOCOL", context.protocol.as_str());
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{GlId, ObjectDirectories, Protocol};

    fn context() -> HookContext {
        HookContext {
            gl_id: "user-3".into(),
            identity: GlId::User("3".into()),
            gl_username: "jane".into(),
            gl_repository: "project-3".into(),
            gl_project_path: "g/p".into(),
            relative_path: "g/p.git".into(),
            protocol: Protocol::Ssh,
            git_protocol: String::new(),
            git_config_options: Vec::new(),
            push_options: Vec::new(),
            request_id: "r".into(),
            object_directories: None,
            user: None,
        }
    }

    #[test]
    fn environment_as_gitaly_builds_it() {
        let mut c = context();
        c.push_options = vec!["ci.skip".into(), "mr.create".into()];
        c.object_directories = Some(ObjectDirectories {
            object_directory: "objects/incoming-x".into(),
            alternate_object_directories: vec!["objects".into()],
        });
        let inherited = [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/git"),
            ("SECRET_TOKEN", "leak"),
            ("GIT_TRACE", "1"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = hook_env(
            &c,
            Path::new("/srv/g/p.git"),
            inherited,
            Path::new("/opt/git/bin/git"),
        );
        let pairs: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string_lossy().into(), v.to_string_lossy().into()))
            .collect();
        let get = |k: &str| {
            pairs
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("SECRET_TOKEN"), None);
        assert_eq!(get("HOME"), Some("/home/git"));
        assert_eq!(get("GIT_TRACE"), Some("1"));
        assert_eq!(get("PATH"), Some("/opt/git/bin:/usr/bin"));
        assert_eq!(get("GIT_PUSH_OPTION_COUNT"), Some("2"));
        assert_eq!(get("GIT_PUSH_OPTION_0"), Some("ci.skip"));
        assert_eq!(get("GIT_PUSH_OPTION_1"), Some("mr.create"));
        assert_eq!(
            get("GIT_OBJECT_DIRECTORY"),
            Some("/srv/g/p.git/objects/incoming-x")
        );
        assert_eq!(
            get("GIT_ALTERNATE_OBJECT_DIRECTORIES"),
            Some("/srv/g/p.git/objects")
        );
        assert_eq!(
            get("GIT_QUARANTINE_PATH"),
            Some("/srv/g/p.git/objects/incoming-x")
        );
        assert_eq!(get("GIT_DIR"), Some("/srv/g/p.git"));
        assert_eq!(get("GL_REPOSITORY"), Some("project-3"));
        assert_eq!(get("GL_PROJECT_PATH"), Some("g/p"));
        assert_eq!(get("GL_ID"), Some("user-3"));
        assert_eq!(get("GL_USERNAME"), Some("jane"));
        assert_eq!(get("GL_PROTOCOL"), Some("ssh"));
        // A bare `git` adds nothing to PATH; no push options, no quarantine: none set.
        let env = hook_env(&context(), Path::new("/r"), [], Path::new("git"));
        assert!(env.iter().all(|(k, _)| k != "PATH"
            && k != "GIT_PUSH_OPTION_COUNT"
            && k != "GIT_OBJECT_DIRECTORY"));
    }
}
