//! The `[gitlab]` and `[hooks]` sections of a node's configuration, with Gitaly's key
//! names (`[gitlab] url, relative_url_root, secret_file, secret`,
//! `[gitlab.http-settings] user, password, ca_file, ca_path, read_timeout`,
//! `[hooks] custom_hooks_dir`), so an operator coming from Gitaly finds them where they
//! were. Checking a section reads what it names (the secret, the CA files) and turns it
//! into an [`ApiConfig`]; an error names the key.
//!
//! What Gitaly accepts and this does not: a client certificate towards GitLab (Gitaly
//! reuses its own `[tls]` identity), and `relative_url_root` on an `http(s)://` URL
//! (Gitaly ignores it there too; we refuse it unless it is empty, `/` or the URL's own
//! path, so nobody believes it applies). A missing `url` turns the GitLab side off,
//! where Gitaly would refuse to start: refvote also runs without GitLab.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::jwt::ApiSecret;

/// A setting that cannot be used: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct InvalidSetting {
    /// The full key, e.g. `gitlab.http-settings.ca_file`.
    pub key: &'static str,
    pub reason: String,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> InvalidSetting {
    InvalidSetting {
        key,
        reason: reason.into(),
    }
}

/// The `[gitlab]` section: where GitLab's internal API is and how to authenticate.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GitlabSettings {
    /// GitLab's base URL: `http://host[:port][/root]`, `https://…`, or
    /// `http+unix:///path/to/workhorse.socket` (percent-encoding allowed, as omnibus
    /// writes it). Empty: no GitLab; every other key of the section must then be unset.
    #[serde(default)]
    pub url: String,
    /// GitLab's relative URL root, for `http+unix://` URLs (with `http(s)://` the root
    /// is the URL's own path).
    #[serde(default)]
    pub relative_url_root: String,
    /// A file holding the shared secret (`.gitlab_shell_secret`); surrounding
    /// whitespace is ignored.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The shared secret itself, instead of `secret_file`.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default, rename = "http-settings")]
    pub http_settings: HttpSettings,
}

/// The `[gitlab.http-settings]` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// HTTP basic auth towards GitLab; with `password`, or neither.
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub password: String,
    /// A PEM file of CA certificates trusted for `https://` besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A directory of PEM CA certificates trusted besides the system's.
    #[serde(default)]
    pub ca_path: Option<PathBuf>,
    /// Longest one call to GitLab may take, connection to last byte, in seconds
    /// (Gitaly's default, 300; 0 means that default too, as in Gitaly).
    #[serde(default = "defaults::read_timeout")]
    pub read_timeout: u64,
}

/// The `[hooks]` section: custom server hooks.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HooksSettings {
    /// Global custom hooks: `<dir>/pre-receive.d/*`, `<dir>/update.d/*`,
    /// `<dir>/post-receive.d/*`, run after a repository's own `custom_hooks/`.
    /// Unset: repository hooks only. A directory that does not exist holds no hooks.
    #[serde(default)]
    pub custom_hooks_dir: Option<PathBuf>,
    /// Longest all custom hooks of one kind may run for one call, together; then they
    /// are killed (their whole process group) and the update is refused. refvote's
    /// own key: Gitaly bounds them only by the RPC's deadline, but here every replica's
    /// vote waits on them.
    #[serde(default = "defaults::hooks_timeout_secs")]
    pub timeout_secs: u64,
}

mod defaults {
    /// Gitaly's and gitlab-shell's default.
    pub const READ_TIMEOUT_SECS: u64 = 300;

    pub fn read_timeout() -> u64 {
        READ_TIMEOUT_SECS
    }
    pub fn hooks_timeout_secs() -> u64 {
        120
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            user: String::new(),
            password: String::new(),
            ca_file: None,
            ca_path: None,
            read_timeout: defaults::read_timeout(),
        }
    }
}

impl Default for HooksSettings {
    fn default() -> Self {
        HooksSettings {
            custom_hooks_dir: None,
            timeout_secs: defaults::hooks_timeout_secs(),
        }
    }
}

/// Where requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `http://` or `https://`: `base` is the URL without a trailing `/`, so
    /// `base + "/api/v4/internal/allowed"` is a request URL.
    Tcp { base: String },
    /// Every request goes over this Unix socket; `base` is `http://unix` plus the
    /// relative URL root (Gitaly's convention; the host name is not resolved).
    Unix { socket: PathBuf, base: String },
}

impl Endpoint {
    /// The URL prefix requests are made under.
    pub fn base(&self) -> &str {
        match self {
            Endpoint::Tcp { base } | Endpoint::Unix { base, .. } => base,
        }
    }
}

/// A checked `[gitlab]` section, with the secret and certificates read: what
/// [`crate::Client::new`] needs.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub endpoint: Endpoint,
    pub secret: ApiSecret,
    /// HTTP basic credentials (user, password).
    pub basic_auth: Option<(String, String)>,
    /// CA certificates trusted besides the system's (`ca_file`, `ca_path`).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Bound on each request, connection to last byte.
    pub read_timeout: Duration,
}

impl GitlabSettings {
    /// Whether a GitLab is configured at all.
    pub fn is_enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Checks the section and reads the files it names. `None`: no GitLab configured.
    pub fn resolve(&self) -> Result<Option<ApiConfig>, InvalidSetting> {
        if !self.is_enabled() {
            if *self != GitlabSettings::default() {
                return Err(invalid(
                    "gitlab.url",
                    "is needed: the [gitlab] section sets other keys but no url (remove the section to run without GitLab)",
                ));
            }
            return Ok(None);
        }
        let endpoint = parse_url(&self.url, &self.relative_url_root)?;
        let secret = self.secret()?;
        let http = &self.http_settings;
        let basic_auth = match (http.user.is_empty(), http.password.is_empty()) {
            (true, true) => None,
            (false, false) => Some((http.user.clone(), http.password.clone())),
            (true, false) => {
                return Err(invalid(
                    "gitlab.http-settings.user",
                    "is needed with gitlab.http-settings.password",
                ));
            }
            (false, true) => {
                return Err(invalid(
                    "gitlab.http-settings.password",
                    "is needed with gitlab.http-settings.user",
                ));
            }
        };
        let mut extra_roots = Vec::new();
        if let Some(file) = &http.ca_file {
            let certs = read_certs(file).map_err(|r| invalid("gitlab.http-settings.ca_file", r))?;
            if certs.is_empty() {
                return Err(invalid(
                    "gitlab.http-settings.ca_file",
                    format!("{} holds no PEM certificate", file.display()),
                ));
            }
            extra_roots.extend(certs);
        }
        if let Some(dir) = &http.ca_path {
            extra_roots.extend(read_cert_dir(dir)?);
        }
        let secs = match http.read_timeout {
            0 => defaults::READ_TIMEOUT_SECS,
            n => n,
        };
        Ok(Some(ApiConfig {
            endpoint,
            secret,
            basic_auth,
            extra_roots,
            read_timeout: Duration::from_secs(secs),
        }))
    }

    fn secret(&self) -> Result<ApiSecret, InvalidSetting> {
        match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => Err(invalid(
                "gitlab.secret_file",
                "set either gitlab.secret or gitlab.secret_file, not both",
            )),
            (None, None) => Err(invalid(
                "gitlab.secret_file",
                "is needed with gitlab.url: the file holding GitLab's shared secret (.gitlab_shell_secret)",
            )),
            (Some(text), None) => ApiSecret::new(text.as_bytes())
                .ok_or_else(|| invalid("gitlab.secret", "is empty; set GitLab's shared secret")),
            (None, Some(path)) => {
                let bytes = std::fs::read(path).map_err(|e| {
                    invalid(
                        "gitlab.secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                ApiSecret::new(&bytes).ok_or_else(|| {
                    invalid(
                        "gitlab.secret_file",
                        format!(
                            "{} is empty; write GitLab's shared secret into it",
                            path.display()
                        ),
                    )
                })
            }
        }
    }
}

impl HooksSettings {
    /// Checks the section; the error names the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if let Some(dir) = &self.custom_hooks_dir {
            if !dir.is_absolute() {
                return Err(invalid(
                    "hooks.custom_hooks_dir",
                    format!("{} must be an absolute path", dir.display()),
                ));
            }
            if dir.exists() && !dir.is_dir() {
                return Err(invalid(
                    "hooks.custom_hooks_dir",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        if self.timeout_secs == 0 {
            return Err(invalid("hooks.timeout_secs", "must be at least 1"));
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// Decodes `%XX` escapes (Gitaly unescapes the whole URL before using it).
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The endpoint a `[gitlab] url` (and `relative_url_root`) names.
pub fn parse_url(url: &str, relative_url_root: &str) -> Result<Endpoint, InvalidSetting> {
    let text = percent_decode(url)
        .ok_or_else(|| invalid("gitlab.url", format!("{url:?} has a malformed %-escape")))?;
    let root = relative_url_root.trim_matches('/');
    if let Some(socket) = text.strip_prefix("http+unix://") {
        let socket = PathBuf::from(socket);
        if !socket.is_absolute() {
            return Err(invalid(
                "gitlab.url",
                format!(
                    "{url:?}: the socket path after http+unix:// must be absolute, e.g. http+unix://%2Fvar%2Fopt%2Fgitlab%2Fgitlab-workhorse%2Fsockets%2Fsocket"
                ),
            ));
        }
        let base = if root.is_empty() {
            "http://unix".to_owned()
        } else {
            format!("http://unix/{root}")
        };
        return Ok(Endpoint::Unix { socket, base });
    }
    if !(text.starts_with("http://") || text.starts_with("https://")) {
        return Err(invalid(
            "gitlab.url",
            format!("{url:?} must start with http://, https:// or http+unix://"),
        ));
    }
    let parsed = reqwest::Url::parse(&text)
        .map_err(|e| invalid("gitlab.url", format!("{url:?} is not a URL: {e}")))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("gitlab.url", format!("{url:?} names no host")));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid(
            "gitlab.url",
            format!("{url:?} must not carry a query or a fragment"),
        ));
    }
    let base = text.trim_end_matches('/').to_owned();
    let path = parsed.path().trim_matches('/');
    if !root.is_empty() && root != path {
        return Err(invalid(
            "gitlab.relative_url_root",
            format!(
                "applies to http+unix:// URLs only; with {url:?} put the root into gitlab.url (e.g. https://gitlab.example.com/{root})"
            ),
        ));
    }
    Ok(Endpoint::Tcp { base })
}

fn read_certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", file.display()))
}

fn read_cert_dir(dir: &Path) -> Result<Vec<CertificateDer<'static>>, InvalidSetting> {
    let key = "gitlab.http-settings.ca_path";
    let entries = std::fs::read_dir(dir)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", dir.display())))?;
    let mut certs = Vec::new();
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    // As Gitaly: every regular file is tried; one that holds no certificate is skipped.
    for file in files {
        if let Ok(found) = read_certs(&file) {
            certs.extend(found);
        }
    }
    if certs.is_empty() {
        return Err(invalid(
            key,
            format!("{} holds no PEM certificate", dir.display()),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gitlab(text: &str) -> GitlabSettings {
        toml::from_str(text).unwrap()
    }

    fn secret_file(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("secret");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn absent_section_means_no_gitlab() {
        assert!(gitlab("").resolve().unwrap().is_none());
        let e = gitlab("secret = \"x\"").resolve().unwrap_err();
        assert_eq!(e.key, "gitlab.url");
    }

    #[test]
    fn defaults_are_gitalys() {
        let s = gitlab("");
        assert_eq!(s.http_settings.read_timeout, 300);
        let h: HooksSettings = toml::from_str("").unwrap();
        assert_eq!(h.custom_hooks_dir, None);
        assert_eq!(h.timeout(), Duration::from_secs(120));
        h.validate().unwrap();
    }

    #[test]
    fn http_url_with_secret_file_and_basic_auth() {
        let dir = tempfile::tempdir().unwrap();
        let file = secret_file(dir.path(), "  topsecret\n");
        let s = gitlab(&format!(
            "url = \"https://gitlab.example.com/gitlab/\"\nsecret_file = {file:?}\n\
             [http-settings]\nuser = \"u\"\npassword = \"p\"\nread_timeout = 7\n"
        ));
        let c = s.resolve().unwrap().unwrap();
        assert_eq!(
            c.endpoint,
            Endpoint::Tcp {
                base: "https://gitlab.example.com/gitlab".into()
            }
        );
        assert_eq!(c.secret.as_bytes(), b"topsecret");
        assert_eq!(c.basic_auth, Some(("u".into(), "p".into())));
        assert_eq!(c.read_timeout, Duration::from_secs(7));
        assert!(c.extra_roots.is_empty());
    }

    #[test]
    fn read_timeout_zero_is_the_default() {
        let s = gitlab(
            "url = \"http://127.0.0.1:8080\"\nsecret = \"s\"\n[http-settings]\nread_timeout = 0\n",
        );
        assert_eq!(
            s.resolve().unwrap().unwrap().read_timeout,
            Duration::from_secs(300)
        );
    }

    #[test]
    fn unix_url_as_omnibus_writes_it() {
        let e = parse_url(
            "http+unix://%2Fvar%2Fopt%2Fgitlab%2Fgitlab-workhorse%2Fsockets%2Fsocket",
            "/",
        )
        .unwrap();
        assert_eq!(
            e,
            Endpoint::Unix {
                socket: "/var/opt/gitlab/gitlab-workhorse/sockets/socket".into(),
                base: "http://unix".into()
            }
        );
        let e = parse_url("http+unix:///run/gitlab.sock", "/gitlab/").unwrap();
        assert_eq!(e.base(), "http://unix/gitlab");
        assert_eq!(
            parse_url("http+unix://relative.sock", "").unwrap_err().key,
            "gitlab.url"
        );
    }

    #[test]
    fn relative_root_with_http_must_match_the_url() {
        parse_url("https://h/gitlab", "/gitlab").unwrap();
        parse_url("https://h", "/").unwrap();
        let e = parse_url("https://h", "/gitlab").unwrap_err();
        assert_eq!(e.key, "gitlab.relative_url_root");
        assert!(
            e.reason.contains("https://gitlab.example.com/gitlab"),
            "{e}"
        );
    }

    #[test]
    fn bad_urls_name_the_key() {
        for url in [
            "ftp://h",
            "gitlab.example.com",
            "http://",
            "https://h/?x=1",
            "http://h%zz",
        ] {
            let e = parse_url(url, "").unwrap_err();
            assert_eq!(e.key, "gitlab.url", "{url}: {e}");
        }
    }

    #[test]
    fn secrets_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let url = "url = \"http://127.0.0.1:1\"\n";
        assert_eq!(gitlab(url).resolve().unwrap_err().key, "gitlab.secret_file");
        let empty = secret_file(dir.path(), " \n");
        let e = gitlab(&format!("{url}secret_file = {empty:?}"))
            .resolve()
            .unwrap_err();
        assert_eq!(e.key, "gitlab.secret_file");
        assert!(e.reason.contains("empty"), "{e}");
        let e = gitlab(&format!("{url}secret_file = \"/nonexistent/secret\""))
            .resolve()
            .unwrap_err();
        assert!(e.reason.contains("/nonexistent/secret"), "{e}");
        let e = gitlab(&format!("{url}secret = \"a\"\nsecret_file = {empty:?}"))
            .resolve()
            .unwrap_err();
        assert_eq!(e.key, "gitlab.secret_file");
        assert_eq!(
            gitlab(&format!("{url}secret = \"\""))
                .resolve()
                .unwrap_err()
                .key,
            "gitlab.secret"
        );
    }

    #[test]
    fn basic_auth_needs_both() {
        let base = "url = \"http://127.0.0.1:1\"\nsecret = \"s\"\n[http-settings]\n";
        assert_eq!(
            gitlab(&format!("{base}user = \"u\""))
                .resolve()
                .unwrap_err()
                .key,
            "gitlab.http-settings.password"
        );
        assert_eq!(
            gitlab(&format!("{base}password = \"p\""))
                .resolve()
                .unwrap_err()
                .key,
            "gitlab.http-settings.user"
        );
    }

    #[test]
    fn ca_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let base = "url = \"https://h\"\nsecret = \"s\"\n[http-settings]\n";
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let e = gitlab(&format!("{base}ca_file = {not_pem:?}"))
            .resolve()
            .unwrap_err();
        assert_eq!(e.key, "gitlab.http-settings.ca_file");
        let e = gitlab(&format!("{base}ca_file = \"/nonexistent.pem\""))
            .resolve()
            .unwrap_err();
        assert_eq!(e.key, "gitlab.http-settings.ca_file");
        let e = gitlab(&format!("{base}ca_path = {:?}", dir.path()))
            .resolve()
            .unwrap_err();
        assert_eq!(e.key, "gitlab.http-settings.ca_path");
        let e = gitlab(&format!("{base}ca_path = \"/nonexistent-dir\""))
            .resolve()
            .unwrap_err();
        assert_eq!(e.key, "gitlab.http-settings.ca_path");
    }

    #[test]
    fn hooks_dir_must_be_absolute_and_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        for (text, key) in [
            (
                "custom_hooks_dir = \"relative\"".to_owned(),
                "hooks.custom_hooks_dir",
            ),
            (
                format!("custom_hooks_dir = {file:?}"),
                "hooks.custom_hooks_dir",
            ),
            ("timeout_secs = 0".to_owned(), "hooks.timeout_secs"),
        ] {
            let h: HooksSettings = toml::from_str(&text).unwrap();
            assert_eq!(h.validate().unwrap_err().key, key, "{text}");
        }
        let h: HooksSettings = toml::from_str(&format!(
            "custom_hooks_dir = {:?}",
            dir.path().join("absent")
        ))
        .unwrap();
        h.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<GitlabSettings>("uri = \"x\"").is_err());
        assert!(toml::from_str::<GitlabSettings>("[http-settings]\nca = \"x\"").is_err());
        assert!(toml::from_str::<HooksSettings>("dir = \"x\"").is_err());
    }
}
