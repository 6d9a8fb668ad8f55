//! What GitLab's post-receive of a gated transaction needs, carried in etcd so that it
//! can run after every promoted voter restarted (DESIGN-CHANGES-12.md): a voter's
//! successful `done` carries it ([`refvote_cluster::records::DoneRecord::post_receive`]),
//! and the txn that ends the transaction copies a promoted voter's into the pending
//! marker. No write of its own: both writes happen anyway.
//!
//! Bounded: the changes (post-receive's stdin) are carried only up to
//! [`MAX_CARRIED_CHANGES`] bytes with the push options. Beyond that the identity goes
//! without them, and only a promoted voter that still remembers the call can run it;
//! if none does, it is dropped with an error logged that names the bound.

use refvote_gitlab::HookContext;
use refvote_gitlab::context::{GlId, Protocol, UserIdentity};
use serde::{Deserialize, Serialize};

/// Most bytes of changes and push options a marker carries (about 2,500 branch
/// updates). etcd takes requests of 1.5 MiB by default; every voter's `done` and the
/// marker carry one copy each.
pub const MAX_CARRIED_CHANGES: usize = 256 * 1024;

/// The carried data, as stored (field names are on-disk format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    pub gl_id: String,
    pub gl_username: String,
    pub gl_repository: String,
    pub gl_project_path: String,
    /// The repository below its storage, as this voter resolved it.
    pub relative_path: String,
    /// `ssh`, `http` or `web`.
    pub protocol: String,
    #[serde(default)]
    pub git_protocol: String,
    #[serde(default)]
    pub git_config_options: Vec<(String, String)>,
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<CarriedUser>,
    /// post-receive's stdin on this voter; `None` when it was over the bound.
    #[serde(default)]
    pub changes: Option<String>,
    #[serde(default)]
    pub push_options: Vec<String>,
    /// Bytes of changes and push options, carried or not.
    #[serde(default)]
    pub size: usize,
}

/// An operation's author.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedUser {
    pub name: Vec<u8>,
    pub email: Vec<u8>,
    pub timezone: String,
}

/// Why carried data cannot run post-receive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotCarried {
    #[error(
        "its changes and push options ({size} bytes) were over the {MAX_CARRIED_CHANGES} bytes a pending marker carries"
    )]
    OverBound { size: usize },
    #[error("the marker's post-receive data cannot be read: {0}")]
    Malformed(String),
}

impl Carried {
    /// What `context` and the committed `changes` with `push_options` carry.
    pub fn of(context: &HookContext, changes: &str, push_options: &[String]) -> Carried {
        let size = changes.len() + push_options.iter().map(|o| o.len() + 1).sum::<usize>();
        let within = size <= MAX_CARRIED_CHANGES;
        Carried {
            gl_id: context.gl_id.clone(),
            gl_username: context.gl_username.clone(),
            gl_repository: context.gl_repository.clone(),
            gl_project_path: context.gl_project_path.clone(),
            relative_path: context.relative_path.clone(),
            protocol: context.protocol.as_str().to_owned(),
            git_protocol: context.git_protocol.clone(),
            git_config_options: context.git_config_options.clone(),
            request_id: context.request_id.clone(),
            user: context.user.as_ref().map(|u| CarriedUser {
                name: u.name.clone(),
                email: u.email.clone(),
                timezone: u.timezone.clone(),
            }),
            changes: within.then(|| changes.to_owned()),
            push_options: if within {
                push_options.to_vec()
            } else {
                Vec::new()
            },
            size,
        }
    }

    /// From a marker's `post_receive` value.
    pub fn from_value(value: &serde_json::Value) -> Result<Carried, NotCarried> {
        serde_json::from_value(value.clone()).map_err(|e| NotCarried::Malformed(e.to_string()))
    }

    /// The context post-receive runs with and its changes, as the voter that
    /// remembered the call would have had them.
    pub fn context(&self) -> Result<(HookContext, &str), NotCarried> {
        let Some(changes) = &self.changes else {
            return Err(NotCarried::OverBound { size: self.size });
        };
        let identity =
            GlId::parse(&self.gl_id).map_err(|e| NotCarried::Malformed(e.to_string()))?;
        let protocol = match self.protocol.as_str() {
            "ssh" => Protocol::Ssh,
            "http" => Protocol::Http,
            "web" => Protocol::Web,
            other => return Err(NotCarried::Malformed(format!("protocol {other:?}"))),
        };
        let context = HookContext {
            gl_id: self.gl_id.clone(),
            identity,
            gl_username: self.gl_username.clone(),
            gl_repository: self.gl_repository.clone(),
            gl_project_path: self.gl_project_path.clone(),
            relative_path: self.relative_path.clone(),
            protocol,
            git_protocol: self.git_protocol.clone(),
            git_config_options: self.git_config_options.clone(),
            push_options: self.push_options.clone(),
            request_id: self.request_id.clone(),
            object_directories: None,
            user: self.user.as_ref().map(|u| UserIdentity {
                name: u.name.clone(),
                email: u.email.clone(),
                timezone: u.timezone.clone(),
            }),
        };
        Ok((context, changes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> HookContext {
        HookContext {
            gl_id: "user-7".into(),
            identity: GlId::User("7".into()),
            gl_username: "jane".into(),
            gl_repository: "project-7".into(),
            gl_project_path: "g/p".into(),
            relative_path: "g/p.git".into(),
            protocol: Protocol::Http,
            git_protocol: "version=2".into(),
            git_config_options: vec![("a.b".into(), "c".into())],
            push_options: Vec::new(),
            request_id: "req-1".into(),
            object_directories: None,
            user: Some(UserIdentity {
                name: b"Jane".to_vec(),
                email: b"j@example.com".to_vec(),
                timezone: "UTC".into(),
            }),
        }
    }

    #[test]
    fn round_trips_through_json_as_the_remembered_call() {
        let changes = "0000000000000000000000000000000000000000 1111111111111111111111111111111111111111 refs/heads/main\n";
        let options = vec!["ci.skip".to_owned(), "mr.create".to_owned()];
        let value = serde_json::to_value(Carried::of(&context(), changes, &options)).unwrap();
        let carried = Carried::from_value(&value).unwrap();
        let (got, got_changes) = carried.context().unwrap();
        let mut want = context();
        want.push_options = options;
        assert_eq!(got, want);
        assert_eq!(got_changes, changes);
    }

    #[test]
    fn over_the_bound_carries_the_identity_without_changes() {
        let line = format!("{} {} refs/heads/b\n", "0".repeat(40), "1".repeat(40));
        let changes = line.repeat(MAX_CARRIED_CHANGES / line.len() + 1);
        let carried = Carried::of(&context(), &changes, &["o".to_owned()]);
        assert_eq!(carried.changes, None);
        assert!(carried.push_options.is_empty());
        assert_eq!(carried.size, changes.len() + 2);
        assert_eq!(carried.gl_id, "user-7");
        let err = carried.context().unwrap_err();
        assert_eq!(
            err,
            NotCarried::OverBound {
                size: changes.len() + 2
            }
        );
        assert!(err.to_string().contains("262144 bytes"), "{err}");
        // Just within: carried whole.
        let within = "x".repeat(MAX_CARRIED_CHANGES);
        assert!(Carried::of(&context(), &within, &[]).changes.is_some());
    }

    #[test]
    fn a_malformed_value_is_an_error() {
        let err = Carried::from_value(&serde_json::json!({"gl_id": 3})).unwrap_err();
        assert!(matches!(err, NotCarried::Malformed(_)), "{err}");
    }
}
