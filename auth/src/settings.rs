//! The `[auth]` section of the router's and votingd's configuration files (Gitaly's
//! key names).

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::token::Secret;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// The shared secret callers sign their tokens with. Unset (and no `token_file`):
    /// calls are not authenticated.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the shared secret (trailing whitespace ignored), so it need not
    /// sit in the config file. Mutually exclusive with `token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Accept calls without a valid token but log them, while clients are being
    /// given the secret (Gitaly's `transitioning`).
    #[serde(default)]
    pub transitioning: bool,
}

/// A resolved `[auth]` section: the secret and what to do with a bad token.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    pub secret: Arc<Secret>,
    pub transitioning: bool,
    /// A second secret whose tokens (or Basic passwords) may only read: set by the
    /// router from its `[auth_read_only]` section; votingd never sets it.
    pub read_only: Option<Arc<Secret>>,
}

/// The router's `[auth_read_only]` section: a second shared secret for callers that
/// may only read (accessors; clone and fetch over HTTP). Calls signed with it that
/// would write are refused PERMISSION_DENIED (HTTP 403).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReadOnlySettings {
    /// The read-only secret. Unset (and no `token_file`): no read-only credential.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding it (trailing whitespace ignored). Not both.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl ReadOnlySettings {
    /// The read-only secret, if one is set; an error names the key
    /// (`auth_read_only.…`).
    pub fn secret(&self) -> Result<Option<Arc<Secret>>, (&'static str, String)> {
        let secret = load_secret(
            self.token.as_deref(),
            self.token_file.as_deref(),
            ("auth_read_only.token", "auth_read_only.token_file"),
        )?;
        Ok(secret.map(Arc::new))
    }
}

/// The secret from `token` or the file `token_file` (one of them), `keys` naming them
/// in errors.
fn load_secret(
    token: Option<&str>,
    token_file: Option<&std::path::Path>,
    keys: (&'static str, &'static str),
) -> Result<Option<Secret>, (&'static str, String)> {
    match (token, token_file) {
        (Some(_), Some(_)) => Err((
            keys.1,
            format!("set either {} or {}, not both", keys.0, keys.1),
        )),
        (Some(token), None) => Ok(Some(Secret::new(token.as_bytes()).ok_or((
            keys.0,
            "is empty; set the shared secret, or remove the key to turn auth off".to_owned(),
        ))?)),
        (None, Some(path)) => {
            let text = std::fs::read(path)
                .map_err(|e| (keys.1, format!("cannot read {}: {e}", path.display())))?;
            let end = text
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())
                .map_or(0, |i| i + 1);
            Ok(Some(Secret::new(&text[..end]).ok_or((
                keys.1,
                format!(
                    "{} is empty; write the shared secret into it",
                    path.display()
                ),
            ))?))
        }
        (None, None) => Ok(None),
    }
}

impl AuthSettings {
    /// The policy, or `None` when auth is off. Reads `token_file`; an error names the
    /// key (`auth.…`) and says why.
    pub fn policy(&self) -> Result<Option<AuthPolicy>, (&'static str, String)> {
        let secret = load_secret(
            self.token.as_deref(),
            self.token_file.as_deref(),
            ("auth.token", "auth.token_file"),
        )?;
        match secret {
            Some(secret) => Ok(Some(AuthPolicy {
                secret: Arc::new(secret),
                transitioning: self.transitioning,
                read_only: None,
            })),
            None if self.transitioning => Err((
                "auth.transitioning",
                "needs auth.token or auth.token_file (the secret clients are moving to)".into(),
            )),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> AuthSettings {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn absent_means_off() {
        assert!(parse("").policy().unwrap().is_none());
    }

    #[test]
    fn a_token_or_a_file() {
        let p = parse("token = \"s3cret\"").policy().unwrap().unwrap();
        assert_eq!(*p.secret, Secret::new("s3cret").unwrap());
        assert!(!p.transitioning);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let p = parse(&format!("token_file = {file:?}\ntransitioning = true"))
            .policy()
            .unwrap()
            .unwrap();
        assert_eq!(*p.secret, Secret::new("s3cret").unwrap());
        assert!(p.transitioning);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("token = \"\"").policy().unwrap_err();
        assert_eq!(e.0, "auth.token");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, " \n").unwrap();
        let e = parse(&format!("token_file = {file:?}"))
            .policy()
            .unwrap_err();
        assert_eq!(e.0, "auth.token_file");
        assert!(e.1.contains("empty"), "{}", e.1);
        let e = parse("token_file = \"/nonexistent/token\"")
            .policy()
            .unwrap_err();
        assert_eq!(e.0, "auth.token_file");
        assert!(e.1.contains("/nonexistent/token"), "{}", e.1);
        let e = parse(&format!("token = \"a\"\ntoken_file = {file:?}"))
            .policy()
            .unwrap_err();
        assert_eq!(e.0, "auth.token_file");
        let e = parse("transitioning = true").policy().unwrap_err();
        assert_eq!(e.0, "auth.transitioning");
    }

    #[test]
    fn a_read_only_secret_is_optional_and_named_in_errors() {
        let ro = |text: &str| toml::from_str::<ReadOnlySettings>(text).unwrap().secret();
        assert!(ro("").unwrap().is_none());
        assert_eq!(
            *ro("token = \"r\"").unwrap().unwrap(),
            Secret::new("r").unwrap()
        );
        assert_eq!(ro("token = \"\"").unwrap_err().0, "auth_read_only.token");
        let e = ro("token = \"a\"\ntoken_file = \"/x\"").unwrap_err();
        assert_eq!(e.0, "auth_read_only.token_file");
        assert!(e.1.contains("auth_read_only.token or"), "{}", e.1);
    }
}
