//! What a node needs to run GitLab's side of one call: who pushes (`gl_id`,
//! `gl_username`), into which GitLab project (`gl_repository`, `gl_project_path`), how
//! (`ssh`, `http`, `web`), with which push options, under which correlation id, and —
//! while the objects are still in quarantine — where they are. Built from the first
//! request of `SSHReceivePack` / `PostReceivePack`, or from the `User` of an
//! `OperationService` call, with Gitaly's checks and messages. Pure: no I/O except
//! [`ObjectDirectories::from_git_env`], which resolves the repository path.

use std::path::{Component, Path, PathBuf};

use refvote_proto::gitaly::{PostReceivePackRequest, Repository, SshReceivePackRequest, User};

/// A call whose context cannot be built. Messages are Gitaly's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("empty GlId")]
    EmptyGlId,
    #[error("gl_id={0:?} is invalid")]
    InvalidGlId(String),
    #[error("empty Repository")]
    NoRepository,
    #[error("repository not set")]
    NoGlRepository,
    #[error("empty User")]
    NoUser,
    #[error("cannot convert invalid config key: {0:?}")]
    InvalidConfigOption(String),
    #[error("quarantine directory {0:?} is not inside the repository's quarantine area")]
    QuarantineOutside(String),
}

/// GitLab's identity of the pusher, as gitlab-shell, workhorse and Rails send it: what
/// `/allowed` is told (`user_id`, `key_id` or `username`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlId {
    /// `user-<id>`: a user (HTTP, web, SSH certificates).
    User(String),
    /// `key-<id>`: an SSH key (deploy keys included).
    Key(String),
    /// `username-<name>`: a user by name (keyless SSH certificates).
    Username(String),
}

impl GlId {
    /// Parses as Gitaly does: `user-` and `key-` need a decimal id, `username-` any
    /// name.
    pub fn parse(gl_id: &str) -> Result<GlId, ContextError> {
        if gl_id.is_empty() {
            return Err(ContextError::EmptyGlId);
        }
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if let Some(name) = gl_id.strip_prefix("username-") {
            return Ok(GlId::Username(name.to_owned()));
        }
        if let Some(id) = gl_id.strip_prefix("key-").filter(|s| digits(s)) {
            return Ok(GlId::Key(id.to_owned()));
        }
        if let Some(id) = gl_id.strip_prefix("user-").filter(|s| digits(s)) {
            return Ok(GlId::User(id.to_owned()));
        }
        Err(ContextError::InvalidGlId(gl_id.to_owned()))
    }
}

/// How the change reached GitLab, as `/allowed` and `GL_PROTOCOL` say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `SSHReceivePack` (gitlab-shell).
    Ssh,
    /// `PostReceivePack` (workhorse).
    Http,
    /// An `OperationService` call (Rails: the web UI and API).
    Web,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Ssh => "ssh",
            Protocol::Http => "http",
            Protocol::Web => "web",
        }
    }
}

/// Where a push's new objects are while they are checked, relative to the
/// repository's directory, as GitLab is told them (and as Rails' callbacks carry them
/// back in `Repository.git_object_directory` / `git_alternate_object_directories`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectDirectories {
    /// The quarantine, e.g. `objects/incoming-AbC123`.
    pub object_directory: String,
    /// The repository's own object directories, e.g. `["objects"]`.
    pub alternate_object_directories: Vec<String>,
}

impl ObjectDirectories {
    /// From what git exports to `pre-receive` and `update` while objects are in
    /// quarantine (`GIT_OBJECT_DIRECTORY`, `GIT_ALTERNATE_OBJECT_DIRECTORIES`,
    /// absolute), made relative to `repo_path` with its symlinks resolved, as Gitaly
    /// does. `None` unless both are set (no quarantine).
    pub fn from_git_env(
        repo_path: &Path,
        object_directory: Option<&str>,
        alternate_object_directories: Option<&str>,
    ) -> std::io::Result<Option<ObjectDirectories>> {
        let (Some(objects), Some(alternates)) = (
            object_directory.filter(|s| !s.is_empty()),
            alternate_object_directories.filter(|s| !s.is_empty()),
        ) else {
            return Ok(None);
        };
        let base = std::fs::canonicalize(repo_path)?;
        Ok(Some(ObjectDirectories {
            object_directory: relative(&base, Path::new(objects)),
            alternate_object_directories: alternates
                .split(':')
                .map(|a| relative(&base, Path::new(a)))
                .collect(),
        }))
    }

    /// The `env` field of `/allowed`: a JSON object, keys in the order Gitaly's
    /// encoder writes them.
    pub fn allowed_env(dirs: Option<&ObjectDirectories>) -> String {
        let (objects, alternates) = match dirs {
            Some(d) => (
                serde_json::Value::from(d.object_directory.clone()),
                serde_json::Value::from(d.alternate_object_directories.clone()),
            ),
            // Go encodes the unset slice as null.
            None => (serde_json::Value::from(""), serde_json::Value::Null),
        };
        format!(
            r#"{{"GIT_ALTERNATE_OBJECT_DIRECTORIES_RELATIVE":{alternates},"GIT_OBJECT_DIRECTORY_RELATIVE":{objects}}}"#
        )
    }

    /// Whether these directories are a receive-pack quarantine of the repository
    /// itself: the object directory is `objects/incoming-<name>` (git's
    /// `tmp_objdir`), each alternate is `objects` or below it, and nothing climbs out
    /// with `..` or starts at `/`. A node accepts a Rails callback's quarantine only
    /// when this holds.
    pub fn check_inside_repository(&self) -> Result<(), ContextError> {
        let outside = |p: &str| ContextError::QuarantineOutside(p.to_owned());
        let normal = |p: &str| {
            !p.is_empty()
                && Path::new(p)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
        };
        let objects = &self.object_directory;
        let name = objects
            .strip_prefix("objects/incoming-")
            .ok_or_else(|| outside(objects))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(outside(objects));
        }
        for alt in &self.alternate_object_directories {
            if !normal(alt) || !(alt == "objects" || alt.starts_with("objects/")) {
                return Err(outside(alt));
            }
        }
        Ok(())
    }

    /// The absolute directories for a child's `GIT_OBJECT_DIRECTORY` and
    /// `GIT_ALTERNATE_OBJECT_DIRECTORIES` (joined with `:`).
    pub fn absolute(&self, repo_path: &Path) -> (PathBuf, String) {
        let alternates = self
            .alternate_object_directories
            .iter()
            .map(|a| repo_path.join(a).to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        (repo_path.join(&self.object_directory), alternates)
    }
}

/// Lexical `target` relative to `base` (both absolute), like Go's `filepath.Rel`:
/// `..` where `target` is not below `base`, `.` when equal.
fn relative(base: &Path, target: &Path) -> String {
    let clean = |p: &Path| {
        let mut parts: Vec<String> = Vec::new();
        for c in p.components() {
            match c {
                Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
                Component::ParentDir => {
                    parts.pop();
                }
                _ => {}
            }
        }
        parts
    };
    let (b, t) = (clean(base), clean(target));
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    let mut out: Vec<&str> = vec![".."; b.len() - common];
    out.extend(t[common..].iter().map(String::as_str));
    if out.is_empty() {
        ".".to_owned()
    } else {
        out.join("/")
    }
}

/// The author of an `OperationService` change (`User` without its `gl_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity {
    pub name: Vec<u8>,
    pub email: Vec<u8>,
    pub timezone: String,
}

/// Everything GitLab's side of one call needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookContext {
    /// As sent (`GL_ID`, `/post_receive`'s `identifier`).
    pub gl_id: String,
    /// Parsed, for `/allowed`.
    pub identity: GlId,
    pub gl_username: String,
    /// GitLab's id of the repository, e.g. `project-42`.
    pub gl_repository: String,
    /// e.g. `group/project`.
    pub gl_project_path: String,
    /// The repository's path below its storage (`/allowed`'s `relative_path`).
    pub relative_path: String,
    pub protocol: Protocol,
    /// The client's git protocol request (`version=2`), if any.
    pub git_protocol: String,
    /// `git -c` options the client asked for (`key=value`, split).
    pub git_config_options: Vec<(String, String)>,
    /// Push options (`git push -o`), learned when git runs the hooks.
    pub push_options: Vec<String>,
    /// Correlation id: `X-Request-ID` towards GitLab.
    pub request_id: String,
    /// The quarantine, while objects are in it.
    pub object_directories: Option<ObjectDirectories>,
    /// The author, for operations.
    pub user: Option<UserIdentity>,
}

/// What the first request of a receive-pack call carries.
struct ReceivePackFields<'a> {
    repository: Option<&'a Repository>,
    gl_id: &'a str,
    gl_repository: &'a str,
    gl_username: &'a str,
    git_protocol: &'a str,
    git_config_options: &'a [String],
}

fn config_options(options: &[String]) -> Result<Vec<(String, String)>, ContextError> {
    options
        .iter()
        .map(|o| match o.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(ContextError::InvalidConfigOption(o.clone())),
        })
        .collect()
}

impl HookContext {
    fn receive_pack(
        f: ReceivePackFields<'_>,
        protocol: Protocol,
        request_id: String,
    ) -> Result<HookContext, ContextError> {
        let identity = GlId::parse(f.gl_id)?;
        let repository = f.repository.ok_or(ContextError::NoRepository)?;
        // Gitaly's hooks read the repository's own gl_repository; clients send it in
        // both places, so the request's copy only fills a gap.
        let gl_repository = if repository.gl_repository.is_empty() {
            f.gl_repository
        } else {
            &repository.gl_repository
        };
        if gl_repository.is_empty() {
            return Err(ContextError::NoGlRepository);
        }
        Ok(HookContext {
            gl_id: f.gl_id.to_owned(),
            identity,
            gl_username: f.gl_username.to_owned(),
            gl_repository: gl_repository.to_owned(),
            gl_project_path: repository.gl_project_path.clone(),
            relative_path: repository.relative_path.clone(),
            protocol,
            git_protocol: f.git_protocol.to_owned(),
            git_config_options: config_options(f.git_config_options)?,
            push_options: Vec::new(),
            request_id,
            object_directories: None,
            user: None,
        })
    }

    /// From the first `SSHReceivePack` request (gitlab-shell): protocol `ssh`.
    pub fn from_ssh_receive_pack(
        request: &SshReceivePackRequest,
        request_id: impl Into<String>,
    ) -> Result<HookContext, ContextError> {
        HookContext::receive_pack(
            ReceivePackFields {
                repository: request.repository.as_ref(),
                gl_id: &request.gl_id,
                gl_repository: &request.gl_repository,
                gl_username: &request.gl_username,
                git_protocol: &request.git_protocol,
                git_config_options: &request.git_config_options,
            },
            Protocol::Ssh,
            request_id.into(),
        )
    }

    /// From the first `PostReceivePack` request (workhorse): protocol `http`.
    pub fn from_post_receive_pack(
        request: &PostReceivePackRequest,
        request_id: impl Into<String>,
    ) -> Result<HookContext, ContextError> {
        HookContext::receive_pack(
            ReceivePackFields {
                repository: request.repository.as_ref(),
                gl_id: &request.gl_id,
                gl_repository: &request.gl_repository,
                gl_username: &request.gl_username,
                git_protocol: &request.git_protocol,
                git_config_options: &request.git_config_options,
            },
            Protocol::Http,
            request_id.into(),
        )
    }

    /// From an `OperationService` call's repository and `User` (Rails): protocol
    /// `web`, the user's name, e-mail and time zone kept for the commit it makes.
    pub fn from_operation(
        repository: Option<&Repository>,
        user: Option<&User>,
        request_id: impl Into<String>,
    ) -> Result<HookContext, ContextError> {
        let user = user.ok_or(ContextError::NoUser)?;
        let mut context = HookContext::receive_pack(
            ReceivePackFields {
                repository,
                gl_id: &user.gl_id,
                gl_repository: "",
                gl_username: &user.gl_username,
                git_protocol: "",
                git_config_options: &[],
            },
            Protocol::Web,
            request_id.into(),
        )?;
        context.user = Some(UserIdentity {
            name: user.name.clone(),
            email: user.email.clone(),
            timezone: user.timezone.clone(),
        });
        Ok(context)
    }

    /// The push options git exports to its hooks (`GIT_PUSH_OPTION_COUNT`,
    /// `GIT_PUSH_OPTION_<n>`), read through `var`. A count that is not a number means
    /// none, as in Gitaly.
    pub fn push_options_from_env(var: impl Fn(&str) -> Option<String>) -> Vec<String> {
        let count = var("GIT_PUSH_OPTION_COUNT")
            .and_then(|c| c.parse::<usize>().ok())
            .unwrap_or(0);
        (0..count)
            .map(|i| var(&format!("GIT_PUSH_OPTION_{i}")).unwrap_or_default())
            .collect()
    }

    /// `GIT_PROTOCOL` for git, when the client asked for protocol v1 or v2 (anything
    /// else is ignored, as Gitaly does).
    pub fn git_protocol_env(&self) -> Option<&str> {
        matches!(self.git_protocol.as_str(), "version=1" | "version=2")
            .then_some(self.git_protocol.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> Repository {
        Repository {
            storage_name: "default".into(),
            relative_path: "@hashed/ab/cd/abcd.git".into(),
            gl_repository: "project-7".into(),
            gl_project_path: "group/project".into(),
            ..Default::default()
        }
    }

    #[test]
    fn gl_ids_as_gitaly_reads_them() {
        assert_eq!(GlId::parse("user-12").unwrap(), GlId::User("12".into()));
        assert_eq!(GlId::parse("key-3").unwrap(), GlId::Key("3".into()));
        assert_eq!(
            GlId::parse("username-jane").unwrap(),
            GlId::Username("jane".into())
        );
        assert_eq!(GlId::parse("").unwrap_err(), ContextError::EmptyGlId);
        for bad in ["user-", "user-1a", "key-x", "jane", "user12"] {
            let e = GlId::parse(bad).unwrap_err();
            assert_eq!(e.to_string(), format!("gl_id={bad:?} is invalid"));
        }
    }

    #[test]
    fn from_ssh_receive_pack() {
        let req = SshReceivePackRequest {
            repository: Some(repo()),
            gl_id: "key-5".into(),
            gl_repository: "project-7".into(),
            gl_username: "jane".into(),
            git_protocol: "version=2".into(),
            git_config_options: vec!["receive.maxInputSize=1048576".into()],
            ..Default::default()
        };
        let c = HookContext::from_ssh_receive_pack(&req, "req-1").unwrap();
        assert_eq!(c.identity, GlId::Key("5".into()));
        assert_eq!(c.gl_id, "key-5");
        assert_eq!(c.protocol.as_str(), "ssh");
        assert_eq!(c.gl_repository, "project-7");
        assert_eq!(c.gl_project_path, "group/project");
        assert_eq!(c.relative_path, "@hashed/ab/cd/abcd.git");
        assert_eq!(c.git_protocol_env(), Some("version=2"));
        assert_eq!(
            c.git_config_options,
            vec![("receive.maxInputSize".into(), "1048576".into())]
        );
        assert_eq!(c.request_id, "req-1");
        assert!(c.user.is_none());
    }

    #[test]
    fn from_post_receive_pack_and_its_errors() {
        let mut req = PostReceivePackRequest {
            repository: Some(Repository {
                gl_repository: String::new(),
                ..repo()
            }),
            gl_id: "user-1".into(),
            gl_repository: "project-8".into(),
            git_protocol: "bogus".into(),
            ..Default::default()
        };
        let c = HookContext::from_post_receive_pack(&req, "r").unwrap();
        assert_eq!(c.protocol, Protocol::Http);
        assert_eq!(
            c.gl_repository, "project-8",
            "the request's copy fills the gap"
        );
        assert_eq!(c.git_protocol_env(), None);
        req.git_config_options = vec!["novalue".into()];
        assert_eq!(
            HookContext::from_post_receive_pack(&req, "r").unwrap_err(),
            ContextError::InvalidConfigOption("novalue".into())
        );
        req.git_config_options.clear();
        req.gl_repository.clear();
        assert_eq!(
            HookContext::from_post_receive_pack(&req, "r").unwrap_err(),
            ContextError::NoGlRepository
        );
        req.gl_id.clear();
        assert_eq!(
            HookContext::from_post_receive_pack(&req, "r")
                .unwrap_err()
                .to_string(),
            "empty GlId"
        );
        let req = PostReceivePackRequest {
            gl_id: "user-1".into(),
            ..Default::default()
        };
        assert_eq!(
            HookContext::from_post_receive_pack(&req, "r").unwrap_err(),
            ContextError::NoRepository
        );
    }

    #[test]
    fn from_operation_keeps_the_author() {
        let user = User {
            gl_id: "user-9".into(),
            name: b"Jane Doe".to_vec(),
            email: b"jane@example.com".to_vec(),
            gl_username: "jane".into(),
            timezone: "Europe/Berlin".into(),
        };
        let c = HookContext::from_operation(Some(&repo()), Some(&user), "r").unwrap();
        assert_eq!(c.protocol.as_str(), "web");
        assert_eq!(c.identity, GlId::User("9".into()));
        assert_eq!(c.gl_username, "jane");
        let author = c.user.unwrap();
        assert_eq!(author.name, b"Jane Doe");
        assert_eq!(author.timezone, "Europe/Berlin");
        assert_eq!(
            HookContext::from_operation(Some(&repo()), None, "r").unwrap_err(),
            ContextError::NoUser
        );
    }

    #[test]
    fn push_options_from_gits_environment() {
        let env = |k: &str| match k {
            "GIT_PUSH_OPTION_COUNT" => Some("2".to_owned()),
            "GIT_PUSH_OPTION_0" => Some("ci.skip".to_owned()),
            "GIT_PUSH_OPTION_1" => Some("mr.create".to_owned()),
            _ => None,
        };
        assert_eq!(
            HookContext::push_options_from_env(env),
            vec!["ci.skip", "mr.create"]
        );
        assert!(HookContext::push_options_from_env(|_| Some("x".into())).is_empty());
        assert!(HookContext::push_options_from_env(|_| None).is_empty());
    }

    #[test]
    fn object_directories_relative_to_the_real_repository() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.git");
        std::fs::create_dir_all(real.join("objects/incoming-Ab12")).unwrap();
        let link = dir.path().join("link.git");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let real = std::fs::canonicalize(&real).unwrap();
        let objects = real.join("objects/incoming-Ab12");
        let alternates = real.join("objects");
        let d = ObjectDirectories::from_git_env(&link, objects.to_str(), alternates.to_str())
            .unwrap()
            .unwrap();
        assert_eq!(d.object_directory, "objects/incoming-Ab12");
        assert_eq!(d.alternate_object_directories, vec!["objects"]);
        d.check_inside_repository().unwrap();
        assert_eq!(
            d.absolute(&real),
            (objects.clone(), alternates.to_string_lossy().into_owned())
        );
        assert_eq!(
            ObjectDirectories::from_git_env(&link, objects.to_str(), None).unwrap(),
            None
        );
    }

    #[test]
    fn relative_paths_like_go() {
        let r = |b: &str, t: &str| relative(Path::new(b), Path::new(t));
        assert_eq!(r("/a/b", "/a/b/c/d"), "c/d");
        assert_eq!(r("/a/b", "/a/b"), ".");
        assert_eq!(r("/a/b", "/a/x"), "../x");
        assert_eq!(r("/a/b/", "/a/b/./c"), "c");
        assert_eq!(r("/a/b", "/tmp/q"), "../../tmp/q");
    }

    #[test]
    fn allowed_env_as_gitaly_encodes_it() {
        assert_eq!(
            ObjectDirectories::allowed_env(None),
            r#"{"GIT_ALTERNATE_OBJECT_DIRECTORIES_RELATIVE":null,"GIT_OBJECT_DIRECTORY_RELATIVE":""}"#
        );
        let d = ObjectDirectories {
            object_directory: "objects/incoming-x".into(),
            alternate_object_directories: vec!["objects".into()],
        };
        assert_eq!(
            ObjectDirectories::allowed_env(Some(&d)),
            r#"{"GIT_ALTERNATE_OBJECT_DIRECTORIES_RELATIVE":["objects"],"GIT_OBJECT_DIRECTORY_RELATIVE":"objects/incoming-x"}"#
        );
    }

    #[test]
    fn quarantine_outside_the_repository_is_refused() {
        let d = |o: &str, a: &[&str]| ObjectDirectories {
            object_directory: o.into(),
            alternate_object_directories: a.iter().map(|s| s.to_string()).collect(),
        };
        for (o, a) in [
            ("objects", &["objects"][..]),
            ("objects/incoming-", &["objects"]),
            ("objects/incoming-a/../../x", &["objects"]),
            ("../other.git/objects/incoming-a", &["objects"]),
            ("/tmp/objects/incoming-a", &["objects"]),
            ("objects/incoming-a", &["../other.git/objects"]),
            ("objects/incoming-a", &["/srv/objects"]),
            ("objects/incoming-a", &["refs"]),
        ] {
            assert!(
                d(o, a).check_inside_repository().is_err(),
                "{o} {a:?} must be refused"
            );
        }
        d("objects/incoming-Q_9-z", &["objects", "objects/pack"])
            .check_inside_repository()
            .unwrap();
    }
}
