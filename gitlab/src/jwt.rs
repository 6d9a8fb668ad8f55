//! The `Gitlab-Shell-Api-Request` header every internal-API request carries: an HS256
//! JWT over GitLab's shared secret with the claims gitlab-shell and Gitaly send,
//! `iss: "gitlab-shell"`, `iat` and `exp = iat + 60`. Rails checks the signature and
//! the issuer; the minute bounds a replayed header.
//!
//! Built from `hmac` and `sha2` (already in the tree) rather than a JWT crate: one
//! fixed algorithm and three claims need no general JOSE machinery.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header's name.
pub const HEADER: &str = "Gitlab-Shell-Api-Request";
/// The `iss` claim Rails expects.
pub const ISSUER: &str = "gitlab-shell";
/// `exp - iat`, seconds.
pub const TTL_SECS: u64 = 60;

/// GitLab's shared secret (`.gitlab_shell_secret`). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiSecret(Vec<u8>);

impl ApiSecret {
    /// The secret with surrounding whitespace removed (as gitlab-shell and Gitaly read
    /// the file); `None` when nothing is left.
    pub fn new(bytes: &[u8]) -> Option<ApiSecret> {
        let text = bytes.trim_ascii();
        (!text.is_empty()).then(|| ApiSecret(text.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The header value for a request issued at `at`.
    pub fn token(&self, at: SystemTime) -> String {
        let iat = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        sign(&self.0, iat)
    }
}

impl fmt::Debug for ApiSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiSecret(<redacted>)")
    }
}

/// `base64url(header) . base64url(claims) . base64url(HMAC-SHA256)`, claims in the
/// order Go's JWT library writes them (`iss`, `exp`, `iat`).
fn sign(secret: &[u8], iat: u64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"iss":"{ISSUER}","exp":{},"iat":{iat}}}"#,
        iat + TTL_SECS
    ));
    let signing_input = format!("{header}.{claims}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Computed outside this code (Python's `hmac` and `base64`, compact JSON): the
    /// token for secret `s3cret` at iat 1700000000.
    const KNOWN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
        eyJpc3MiOiJnaXRsYWItc2hlbGwiLCJleHAiOjE3MDAwMDAwNjAsImlhdCI6MTcwMDAwMDAwMH0.\
        eOFWiWEBjIpqFzadwr84PYSGTaMkFX31w2Dh_SXlVLM";

    #[test]
    fn matches_an_independently_computed_token() {
        let secret = ApiSecret::new(b"s3cret").unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(secret.token(at), KNOWN);
    }

    /// Verifies as a server would: split, recompute the MAC with the secret, decode
    /// the JSON and read the claims.
    #[test]
    fn verifies_with_the_secret_and_carries_the_claims() {
        let secret = ApiSecret::new(b"\n  another secret \n").unwrap();
        assert_eq!(secret.as_bytes(), b"another secret");
        let now = SystemTime::now();
        let token = secret.token(now);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"another secret").unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
            .expect("signature verifies under the secret");
        let mut wrong = Hmac::<Sha256>::new_from_slice(b"another secreT").unwrap();
        wrong.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        assert!(
            wrong
                .verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
                .is_err()
        );
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "HS256");
        assert_eq!(header["typ"], "JWT");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        let iat = claims["iat"].as_u64().unwrap();
        let unix_now = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(iat, unix_now);
        assert_eq!(claims["exp"].as_u64().unwrap(), iat + 60);
        assert_eq!(claims["iss"], "gitlab-shell");
        assert_eq!(claims.as_object().unwrap().len(), 3);
    }

    #[test]
    fn empty_secrets_are_refused_and_never_printed() {
        assert!(ApiSecret::new(b" \n\t").is_none());
        let s = ApiSecret::new(b"hunter2").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
