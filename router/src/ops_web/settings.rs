//! The `[ops_web]` section of the router's config: who may log in to the ops web
//! (served on `admin_listen_addr`), in which role, and for how long a login lasts.
//! Validation only; nothing here serves anything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Shortest token an account may have.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Accounts that may see everything and run the admin jobs: name → token.
    #[serde(default)]
    pub admins: BTreeMap<String, String>,
    /// Accounts that may only look: name → token.
    #[serde(default)]
    pub viewers: BTreeMap<String, String>,
    /// How long a login lasts, in seconds.
    #[serde(default = "session_ttl_secs")]
    pub session_ttl_secs: u64,
}

fn session_ttl_secs() -> u64 {
    8 * 3600
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            admins: BTreeMap::new(),
            viewers: BTreeMap::new(),
            session_ttl_secs: session_ttl_secs(),
        }
    }
}

// Tokens stay out of logs and error messages.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("admins", &self.admins.keys().collect::<Vec<_>>())
            .field("viewers", &self.viewers.keys().collect::<Vec<_>>())
            .field("session_ttl_secs", &self.session_ttl_secs)
            .finish()
    }
}

impl Settings {
    /// Checks the accounts; `serving` says whether `admin_listen_addr` is set (then at
    /// least one account must exist, or nobody could log in).
    pub fn validate(&self, serving: bool) -> Result<(), (&'static str, String)> {
        for (key, accounts) in [
            ("ops_web.admins", &self.admins),
            ("ops_web.viewers", &self.viewers),
        ] {
            for (name, token) in accounts {
                refvote_cluster::settings::check_name(name)
                    .map_err(|reason| (key, format!("account {name:?}: {reason}")))?;
                if token.chars().count() < MIN_TOKEN_LEN {
                    return Err((
                        key,
                        format!(
                            "account {name:?}: the token must be at least {MIN_TOKEN_LEN} characters"
                        ),
                    ));
                }
            }
        }
        if let Some(name) = self.admins.keys().find(|n| self.viewers.contains_key(*n)) {
            return Err((
                "ops_web.viewers",
                format!("account {name:?} is also an admin; name each account once"),
            ));
        }
        if serving && self.admins.is_empty() && self.viewers.is_empty() {
            return Err((
                "ops_web.admins",
                "admin_listen_addr is set but no account may log in: add one under \
                 [ops_web.admins] or [ops_web.viewers]"
                    .into(),
            ));
        }
        if !(1..=7 * 24 * 3600).contains(&self.session_ttl_secs) {
            return Err((
                "ops_web.session_ttl_secs",
                "must be between 1 and 604800".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Settings {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn accounts_are_checked() {
        assert!(Settings::default().validate(false).is_ok());
        assert_eq!(settings(""), Settings::default());
        assert_eq!(settings("").session_ttl_secs, 8 * 3600);
        let e = settings("").validate(true).unwrap_err();
        assert_eq!(e.0, "ops_web.admins");
        let e = settings("[admins]\nalice = \"short\"")
            .validate(true)
            .unwrap_err();
        assert_eq!(e.0, "ops_web.admins");
        assert!(e.1.contains("alice"), "{e:?}");
        let e = settings("[viewers]\n\"a b\" = \"0123456789abcdef\"")
            .validate(true)
            .unwrap_err();
        assert_eq!(e.0, "ops_web.viewers");
        let both = "[admins]\nbob = \"0123456789abcdef\"\n[viewers]\nbob = \"0123456789abcdeg\"";
        assert_eq!(
            settings(both).validate(true).unwrap_err().0,
            "ops_web.viewers"
        );
        let ok = "[admins]\nbob = \"0123456789abcdef\"";
        assert!(settings(ok).validate(true).is_ok());
        let e = settings("session_ttl_secs = 0")
            .validate(false)
            .unwrap_err();
        assert_eq!(e.0, "ops_web.session_ttl_secs");
        assert!(!format!("{:?}", settings(ok)).contains("0123456789abcdef"));
    }
}
