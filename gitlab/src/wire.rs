//! Reading the internal API's answers as Gitaly reads them, apart from any I/O:
//!
//! - any 4xx or 5xx: an error carrying the `message` of the JSON body, if any;
//! - `/allowed`: 200 or 300 with `Content-Type: application/json`, then
//!   `{"status": bool, "message": string}`; another 2xx/3xx is an error;
//! - `/pre_receive`: 200, JSON, `{"reference_counter_increased": bool}`;
//! - `/post_receive`: 200, JSON, `{"reference_counter_decreased": bool,
//!   "messages": [{"message", "type"}]}`;
//! - `/check`: 200, `{"api_version", "gitlab_version", "gitlab_rev", "redis"}`.

use serde::Deserialize;

use crate::call::{ApiError, Call};
use crate::messages::PostReceiveMessage;

/// An answer as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The `Content-Type` header, empty when absent.
    pub content_type: String,
    pub body: Vec<u8>,
}

/// `/allowed`'s verdict.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AllowedAnswer {
    /// Missing means false, as Go's decoder leaves it.
    #[serde(default)]
    pub status: bool,
    #[serde(default)]
    pub message: Option<String>,
}

/// `/post_receive`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PostReceiveAnswer {
    #[serde(default)]
    pub reference_counter_decreased: bool,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub messages: Vec<PostReceiveMessage>,
}

/// `/check`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CheckInfo {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub gitlab_version: String,
    /// Rails names it `gitlab_rev`; Gitaly's struct `gitlab_revision`.
    #[serde(default, alias = "gitlab_revision")]
    pub gitlab_rev: String,
    /// Whether GitLab reaches its Redis (hook calls fail without it).
    #[serde(default)]
    pub redis: bool,
}

impl PostReceiveAnswer {
    /// The messages as Gitaly prints them on the pusher's stdout
    /// ([`crate::messages::render`]).
    pub fn rendered(&self) -> Result<String, (String, crate::messages::InvalidMessageType)> {
        crate::messages::render(&self.messages)
    }
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
struct ErrorBody {
    message: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct PreReceiveBody {
    #[serde(default)]
    reference_counter_increased: bool,
}

impl Answer {
    /// 4xx and 5xx are errors, whatever the endpoint (Gitaly's `parseError`).
    pub fn check_status(&self, call: Call) -> Result<(), ApiError> {
        if (200..400).contains(&self.status) {
            return Ok(());
        }
        let message = serde_json::from_slice::<ErrorBody>(&self.body)
            .ok()
            .and_then(|b| match b.message {
                Some(serde_json::Value::String(s)) => Some(s),
                _ => None,
            });
        Err(ApiError::Status {
            call,
            status: self.status,
            message,
        })
    }

    fn json<'a, T: Deserialize<'a>>(&'a self, call: Call) -> Result<T, ApiError> {
        if media_type(&self.content_type) != "application/json" {
            return Err(ApiError::ContentType {
                call,
                content_type: self.content_type.clone(),
            });
        }
        self.decode(call)
    }

    fn decode<'a, T: Deserialize<'a>>(&'a self, call: Call) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| ApiError::Decode {
            call,
            detail: e.to_string(),
        })
    }

    fn expect_ok(&self, call: Call) -> Result<(), ApiError> {
        self.check_status(call)?;
        if self.status != 200 {
            return Err(ApiError::UnexpectedStatus {
                call,
                status: self.status,
            });
        }
        Ok(())
    }

    pub fn allowed(&self) -> Result<AllowedAnswer, ApiError> {
        self.check_status(Call::Allowed)?;
        match self.status {
            200 | 300 => self.json(Call::Allowed),
            status => Err(ApiError::UnexpectedStatus {
                call: Call::Allowed,
                status,
            }),
        }
    }

    pub fn pre_receive(&self) -> Result<bool, ApiError> {
        self.expect_ok(Call::PreReceive)?;
        Ok(self
            .json::<PreReceiveBody>(Call::PreReceive)?
            .reference_counter_increased)
    }

    pub fn post_receive(&self) -> Result<PostReceiveAnswer, ApiError> {
        self.expect_ok(Call::PostReceive)?;
        self.json(Call::PostReceive)
    }

    pub fn check(&self) -> Result<CheckInfo, ApiError> {
        self.expect_ok(Call::Check)?;
        self.decode(Call::Check)
    }
}

/// The media type of a `Content-Type` value, parameters dropped, lower case.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, content_type: &str, body: &str) -> Answer {
        Answer {
            status,
            content_type: content_type.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    const JSON: &str = "application/json";

    #[test]
    fn allowed_verdicts() {
        assert_eq!(
            answer(
                200,
                "application/json; charset=utf-8",
                r#"{"status":true,"gl_id":"user-1"}"#
            )
            .allowed()
            .unwrap(),
            AllowedAnswer {
                status: true,
                message: None
            }
        );
        assert_eq!(
            answer(200, JSON, r#"{"status":false,"message":"no"}"#)
                .allowed()
                .unwrap(),
            AllowedAnswer {
                status: false,
                message: Some("no".into())
            }
        );
        assert!(
            answer(300, JSON, r#"{"status":true}"#)
                .allowed()
                .unwrap()
                .status
        );
    }

    #[test]
    fn allowed_refusals_carry_gitlabs_message() {
        let e = answer(
            401,
            JSON,
            r#"{"status":false,"message":"You are not allowed to push code to protected branches on this project."}"#,
        )
        .allowed()
        .unwrap_err();
        assert!(e.is_refusal());
        assert_eq!(
            e.gitaly_text(),
            "You are not allowed to push code to protected branches on this project."
        );
        let e = answer(
            404,
            JSON,
            r#"{"status":false,"message":"The project you were looking for could not be found."}"#,
        )
        .allowed()
        .unwrap_err();
        assert!(e.is_refusal());
        let e = answer(403, "text/html", "<h1>Forbidden</h1>")
            .allowed()
            .unwrap_err();
        assert_eq!(e.gitaly_text(), "Internal API error (403)");
        let e = answer(503, JSON, r#"{"status":false,"message":"Timed out"}"#)
            .allowed()
            .unwrap_err();
        assert!(!e.is_refusal());
        assert_eq!(e.gitaly_text(), "Timed out");
        let e = answer(500, JSON, r#"{"message":{"nested":1}}"#)
            .allowed()
            .unwrap_err();
        assert_eq!(e.gitaly_text(), "Internal API error (500)");
    }

    #[test]
    fn allowed_odd_answers() {
        let e = answer(204, JSON, "").allowed().unwrap_err();
        assert_eq!(e.gitaly_text(), "gitlab api is not accessible: 204");
        let e = answer(200, "text/html", "<html>").allowed().unwrap_err();
        assert_eq!(
            e.gitaly_text(),
            "/allowed endpoint respond with unsupported content type: text/html"
        );
        let e = answer(200, JSON, "{").allowed().unwrap_err();
        assert!(
            e.gitaly_text()
                .starts_with("decoding response from /allowed endpoint: "),
            "{e}"
        );
        assert_eq!(
            answer(200, JSON, r#"{"message":"x"}"#).allowed().unwrap(),
            AllowedAnswer {
                status: false,
                message: Some("x".into())
            }
        );
    }

    #[test]
    fn pre_receive_counter() {
        assert!(
            answer(200, JSON, r#"{"reference_counter_increased":true}"#)
                .pre_receive()
                .unwrap()
        );
        assert!(
            !answer(200, JSON, r#"{"reference_counter_increased":false}"#)
                .pre_receive()
                .unwrap()
        );
        assert_eq!(
            answer(201, JSON, "{}")
                .pre_receive()
                .unwrap_err()
                .gitaly_text(),
            "pre-receive call failed with status: 201"
        );
        assert!(matches!(
            answer(500, JSON, "{}").pre_receive().unwrap_err(),
            ApiError::Status { status: 500, .. }
        ));
    }

    #[test]
    fn post_receive_messages() {
        let a = answer(
            200,
            JSON,
            r#"{"reference_counter_decreased":true,"messages":[{"message":"hi","type":"basic"},{"message":"careful","type":"alert"}]}"#,
        )
        .post_receive()
        .unwrap();
        assert!(a.reference_counter_decreased);
        assert_eq!(a.messages.len(), 2);
        assert_eq!(a.messages[1].kind, "alert");
        assert!(a.rendered().unwrap().starts_with("\nhi\n\n\n====="));
        let a = answer(
            200,
            JSON,
            r#"{"reference_counter_decreased":false,"messages":null}"#,
        )
        .post_receive()
        .unwrap();
        assert!(a.messages.is_empty());
        assert!(answer(200, "", "{}").post_receive().is_err());
    }

    #[test]
    fn check_info() {
        let c = answer(
            200,
            JSON,
            r#"{"api_version":"v4","gitlab_version":"17.5.0","gitlab_rev":"abc","redis":true}"#,
        )
        .check()
        .unwrap();
        assert_eq!(c.api_version, "v4");
        assert_eq!(c.gitlab_rev, "abc");
        assert!(c.redis);
        assert_eq!(
            answer(401, JSON, r#"{"message":"401 Unauthorized"}"#)
                .check()
                .unwrap_err()
                .gitaly_text(),
            "401 Unauthorized"
        );
    }
}
