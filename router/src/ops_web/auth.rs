//! Who may use the ops web: the accounts of `[ops_web]` (admins and viewers, each a
//! name and a token, separate from Gitaly's token), the login sessions kept in this
//! router's memory (a login is per router and ends with it), and the CSRF token each
//! session carries for its forms.
//!
//! A browser logs in on `/login` and gets a random session id in a cookie that is
//! `HttpOnly`, `SameSite=Strict`, and `Secure` when the listener serves TLS. Scripts
//! send `Authorization: Bearer <token>` or Basic `<name>:<token>` instead, for the
//! `/api/` reads. Tokens are compared as SHA-256 digests, in time independent of where
//! they differ.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::settings::Settings;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "refvote_ops";
/// The cookie pairing the login form with its browser (login CSRF).
pub const LOGIN_COOKIE: &str = "refvote_ops_login";
/// Sessions kept at most; a login beyond it is refused until some expire.
const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Viewer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

/// Someone authenticated.
#[derive(Debug, Clone)]
pub struct Who {
    pub user: String,
    pub role: Role,
    /// The session's CSRF token; empty for a script authenticated by its header
    /// (it cannot post forms).
    pub csrf: String,
}

/// Why a request carries no valid session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// No cookie, no credentials header.
    None,
    /// A session id this router does not know (forged, or from before a restart).
    Unknown,
    /// The session ran out.
    Expired,
    /// A credentials header that matches no account.
    BadCredentials,
}

struct Session {
    user: String,
    role: Role,
    csrf: String,
    expires: Instant,
}

pub struct Auth {
    /// name → (role, SHA-256 of the token)
    accounts: BTreeMap<String, (Role, [u8; 32])>,
    ttl: Duration,
    sessions: Mutex<HashMap<String, Session>>,
    /// The listener serves TLS: cookies get `Secure`.
    pub secure: bool,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal, in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random token (244 bits from the OS's generator, hex).
pub fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Auth {
    pub fn new(settings: &Settings, secure: bool) -> Auth {
        let mut accounts = BTreeMap::new();
        for (name, token) in &settings.admins {
            accounts.insert(name.clone(), (Role::Admin, digest(token)));
        }
        for (name, token) in &settings.viewers {
            accounts.insert(name.clone(), (Role::Viewer, digest(token)));
        }
        Auth {
            accounts,
            ttl: Duration::from_secs(settings.session_ttl_secs),
            sessions: Mutex::new(HashMap::new()),
            secure,
        }
    }

    /// The role of `user` if `token` is theirs.
    pub fn check(&self, user: &str, token: &str) -> Option<Role> {
        let given = digest(token);
        // Compared against a dummy for unknown names too, so timing says nothing.
        let (role, want) = self
            .accounts
            .get(user)
            .copied()
            .unwrap_or((Role::Viewer, digest("\0no such account")));
        (same(&given, &want) && self.accounts.contains_key(user)).then_some(role)
    }

    /// The account whose token `token` is.
    fn by_token(&self, token: &str) -> Option<(String, Role)> {
        let given = digest(token);
        let mut found = None;
        for (name, (role, want)) in &self.accounts {
            if same(&given, want) {
                found = Some((name.clone(), *role));
            }
        }
        found
    }

    /// Starts a session; its id (the cookie's value), or `None` when too many are open.
    pub fn login(&self, user: &str, role: Role) -> Option<String> {
        let mut sessions = self.sessions.lock().expect("sessions");
        if sessions.len() >= MAX_SESSIONS {
            let now = Instant::now();
            sessions.retain(|_, s| s.expires > now);
            if sessions.len() >= MAX_SESSIONS {
                return None;
            }
        }
        let id = random_token();
        sessions.insert(
            id.clone(),
            Session {
                user: user.to_owned(),
                role,
                csrf: random_token(),
                expires: Instant::now() + self.ttl,
            },
        );
        Some(id)
    }

    pub fn logout(&self, headers: &http::HeaderMap) {
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            self.sessions.lock().expect("sessions").remove(id);
        }
    }

    /// Who sent the request: its session cookie, or (for scripts) its credentials.
    pub fn who(&self, headers: &http::HeaderMap) -> Result<Who, Missing> {
        if let Some(value) = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            return self.parse_header(value).ok_or(Missing::BadCredentials);
        }
        let Some(id) = cookie(headers, SESSION_COOKIE) else {
            return Err(Missing::None);
        };
        let mut sessions = self.sessions.lock().expect("sessions");
        let Some(s) = sessions.get(id) else {
            return Err(Missing::Unknown);
        };
        if s.expires <= Instant::now() {
            sessions.remove(id);
            return Err(Missing::Expired);
        }
        Ok(Who {
            user: s.user.clone(),
            role: s.role,
            csrf: s.csrf.clone(),
        })
    }

    fn parse_header(&self, value: &str) -> Option<Who> {
        let (scheme, rest) = value.split_once(' ')?;
        let (user, role) = if scheme.eq_ignore_ascii_case("bearer") {
            self.by_token(rest.trim())?
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            let (user, token) = decoded.split_once(':')?;
            (user.to_owned(), self.check(user, token)?)
        } else {
            return None;
        };
        Some(Who {
            user,
            role,
            csrf: String::new(),
        })
    }

    /// The `Set-Cookie` value carrying a session id (empty `id`, age 0: cleared).
    pub fn cookie_header(&self, name: &str, id: &str, path: &str) -> String {
        let max_age = if id.is_empty() { 0 } else { self.ttl.as_secs() };
        format!(
            "{name}={id}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
            if self.secure { "; Secure" } else { "" }
        )
    }

    #[cfg(test)]
    fn expire_all(&self) {
        for s in self.sessions.lock().unwrap().values_mut() {
            s.expires = Instant::now();
        }
    }
}

/// Whether a form's CSRF field matches the session's token.
pub fn csrf_ok(who: &Who, field: Option<&str>) -> bool {
    !who.csrf.is_empty() && field.is_some_and(|f| same(f.as_bytes(), who.csrf.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn auth() -> Auth {
        let s: Settings = toml::from_str(
            "[admins]\nalice = \"alice-token-0123456\"\n[viewers]\nbob = \"bob-token-0123456789\"",
        )
        .unwrap();
        Auth::new(&s, false)
    }

    fn with(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, value.parse().unwrap());
        h
    }

    #[test]
    fn credentials_and_roles() {
        let a = auth();
        assert_eq!(a.check("alice", "alice-token-0123456"), Some(Role::Admin));
        assert_eq!(a.check("bob", "bob-token-0123456789"), Some(Role::Viewer));
        assert_eq!(a.check("alice", "bob-token-0123456789"), None);
        assert_eq!(a.check("mallory", "alice-token-0123456"), None);
        let who = a
            .who(&with("authorization", "Bearer bob-token-0123456789"))
            .unwrap();
        assert_eq!((who.user.as_str(), who.role), ("bob", Role::Viewer));
        assert!(who.csrf.is_empty());
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:alice-token-0123456");
        let who = a
            .who(&with("authorization", &format!("Basic {basic}")))
            .unwrap();
        assert_eq!(who.role, Role::Admin);
        assert_eq!(
            a.who(&with("authorization", "Bearer nope")).unwrap_err(),
            Missing::BadCredentials
        );
    }

    #[test]
    fn sessions_expire_and_forged_ones_are_unknown() {
        let a = auth();
        assert_eq!(a.who(&HeaderMap::new()).unwrap_err(), Missing::None);
        let id = a.login("alice", Role::Admin).unwrap();
        let headers = with("cookie", &format!("other=1; {SESSION_COOKIE}={id}"));
        let who = a.who(&headers).unwrap();
        assert_eq!(who.user, "alice");
        assert!(csrf_ok(&who, Some(&who.csrf)));
        assert!(!csrf_ok(&who, Some("forged")));
        assert!(!csrf_ok(&who, None));
        let forged = with("cookie", &format!("{SESSION_COOKIE}={}", random_token()));
        assert_eq!(a.who(&forged).unwrap_err(), Missing::Unknown);
        a.expire_all();
        assert_eq!(a.who(&headers).unwrap_err(), Missing::Expired);
        // An expired session is gone for good.
        assert_eq!(a.who(&headers).unwrap_err(), Missing::Unknown);
    }

    #[test]
    fn cookies_are_strict_and_secure_under_tls() {
        let mut a = auth();
        let c = a.cookie_header(SESSION_COOKIE, "abc", "/");
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
        assert!(!c.contains("Secure"), "{c}");
        a.secure = true;
        assert!(
            a.cookie_header(SESSION_COOKIE, "abc", "/")
                .ends_with("; Secure")
        );
        assert!(
            a.cookie_header(SESSION_COOKIE, "", "/")
                .contains("Max-Age=0")
        );
    }
}
