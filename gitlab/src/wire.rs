//! Reading the internal API's answers as Gitaly reads them, apart from any I/O:
//!
//! - any 4xx or 5xx: an error carrying the `message` of the JSON body, if any;
//! - `/allowed`: 200 or 300 with `Content-Type: application/json`, then
//!   `{"status": bool, "message": string}`; another 2xx/3xx is an error;
//! - `/pre_receive`: 200, JSON, `{"reference_counter_increased": bool}`;
//! - `/post_receive`: 200, JSON, `{"reference_counter_decreased": bool,
//!   "messages": [{"message", "type"}]}`;
//! - `/check`: 200, `{"api_version", "gitlab_version", "gitlab_rev", "redis"}`.
//!
//! # Non-2xx answers, 429 and 5xx, as Gitaly handles them
//!
//! (gitlab-org/gitaly; the client is gitlab-shell's, copied into Gitaly.)
//!
//! - `internal/gitlab/client/httpclient.go`: a plain `net/http` client. **No retry**,
//!   whatever the status; `Retry-After` is not read. A transport failure or the read
//!   timeout is "Internal API unreachable" (`client/gitlabnet.go`, `DoRequest`).
//! - `internal/gitlab/client/gitlabnet.go`, `parseError`: 200–399 pass; for any other
//!   status the body is decoded once with `json.Decoder` into `ErrorResponse{Message
//!   string}` (key `message`) — the first JSON value only (trailing bytes ignored), the
//!   key matched case-insensitively, `null` leaving it empty. If that decode fails (not
//!   JSON, empty, a `message` that is no string such as Rails' rate limiter's
//!   `{"message":{"error":…}}`) the text is `Internal API error (<status>)`, else the
//!   message. 401/403/404, 429 and 5xx are all the same to it.
//! - `internal/gitlab/http_client.go`: `Allowed` returns that error as it is;
//!   `PreReceive`/`PostReceive` wrap it as `http post to gitlab api /<endpoint>
//!   endpoint: …` and call any other non-200 `<pre|post>-receive call failed with
//!   status: N`.
//! - `internal/gitaly/hook/prereceive.go`: *any* error of `Allowed` becomes
//!   `NotAllowedError{Message: err.Error()}` (Gitaly's own comment calls this broken:
//!   it cannot tell a denial from an outage), whose text is `GitLab: <message>`; the
//!   primary stops the transaction so no secondary commits. A `/pre_receive` failure
//!   is `calling pre_receive endpoint: …`. `internal/gitaly/service/hook/pre_receive.go`
//!   writes that text on the hook's stderr with exit status 1: the pusher reads
//!   `remote: GitLab: Internal API error (429)` (or GitLab's message) and
//!   `[remote rejected] … (pre-receive hook declined)`, on every replica.
//! - `internal/gitaly/hook/postreceive.go`: a `/post_receive` failure is `GitLab:
//!   http post to gitlab api /post_receive endpoint: …` on stderr (the pusher reads
//!   it after `remote: `); git ignores post-receive's status, so the push stands;
//!   nothing retries it.
//! - `internal/gitaly/hook/updateref/update_with_hooks.go` wraps a pre-receive failure
//!   as `running pre-receive hooks: GitLab: …`, and `internal/gitaly/service/operations`
//!   answers a `NotAllowedError` with `PERMISSION_DENIED` and an `AccessCheckError`
//!   (`error_message` without `GitLab: `) where the RPC's error has that arm
//!   (UserDeleteBranch, UserCreateTag, UserCommitFiles, UserMergeBranch), and returns
//!   it unwrapped where it has none (UserCreateBranch, UserFFBranch), which
//!   `internal/grpc/middleware/statushandler` answers as `INTERNAL` with its text; see
//!   the node's `gitlab::operation`.
//!
//! (gitlab-shell's own client, which checks SSH pushes before Gitaly is called, is
//! different: go-retryablehttp retries 429, 5xx but 501 and transport errors twice,
//! 1 s then 2 s apart or `Retry-After` on a 429/503, then says "Internal API
//! unreachable". That is not the hooks' client.)
//!
//! refvote does as Gitaly does, with two deliberate differences: a JSON error whose
//! `message` is missing, `null` or empty reads `Internal API error (<status>)` rather
//! than an empty text (the pusher learns the status instead of nothing), and
//! `Retry-After` is kept ([`Answer::retry_after`]) for the logs and for the bounded
//! retries of `/post_receive` (`crate::hooks`), never for `/allowed` or
//! `/pre_receive`, which are not repeated.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::call::{ApiError, Call};
use crate::messages::PostReceiveMessage;

/// An answer as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The `Content-Type` header, empty when absent.
    pub content_type: String,
    /// The `Retry-After` header as a wait ([`retry_after`]), when present and valid.
    pub retry_after: Option<Duration>,
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

/// `Retry-After` as a wait from `now`: delay-seconds (Go's `ParseInt`: an optional
/// sign, negative refused) or an HTTP date (one in the past is no wait).
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<i64>() {
        return u64::try_from(seconds).ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The `message` of an error answer's body as Go's `json.Decoder` fills Gitaly's
/// `ErrorResponse`: `Err` when that decode fails (Gitaly then says `Internal API
/// error (<status>)`), `Ok("")` when it succeeds without a message.
fn error_message(body: &[u8]) -> Result<String, ()> {
    // Go replaces invalid UTF-8 inside strings; elsewhere it is a syntax error either way.
    let text = String::from_utf8_lossy(body);
    let mut de = serde_json::Deserializer::from_str(&text);
    // The first value only: Decode stops there, whatever follows.
    serde::Deserialize::deserialize(&mut de)
        .map(|ErrorBody(m)| m.unwrap_or_default())
        .map_err(|_: serde_json::Error| ())
}

/// Gitaly's `ErrorResponse`: a JSON object (or `null`) whose keys that equal
/// `message` ignoring case set it in order — a string sets it, `null` leaves it, any
/// other value fails the decode — and whose other keys are skipped.
struct ErrorBody(Option<String>);

impl<'de> Deserialize<'de> for ErrorBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ErrorBody;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_unit<E>(self) -> Result<ErrorBody, E> {
                Ok(ErrorBody(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ErrorBody, A::Error> {
                let mut message = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key.eq_ignore_ascii_case("message") {
                        if let Some(m) = map.next_value::<Option<String>>()? {
                            message = Some(m);
                        }
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(ErrorBody(message))
            }
        }
        d.deserialize_any(Visit)
    }
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
        Err(ApiError::Status {
            call,
            status: self.status,
            message: error_message(&self.body).ok(),
            retry_after: self.retry_after,
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
            retry_after: None,
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

    /// The text a 4xx/5xx of `/allowed` with `body` gives the pusher (after `GitLab: `).
    fn shown(status: u16, content_type: &str, body: &str) -> String {
        answer(status, content_type, body)
            .allowed()
            .unwrap_err()
            .gitaly_text()
    }

    #[test]
    fn error_messages_are_read_as_gos_json_decoder_reads_them() {
        // GitLab's message, whatever the status: 429 and 5xx like 401.
        for status in [401, 403, 404, 429, 500, 502, 503] {
            assert_eq!(
                shown(status, JSON, r#"{"message":"slow down"}"#),
                "slow down"
            );
        }
        // The first JSON value only, whatever follows it; the key in any case, the
        // last one winning; other keys skipped, whatever they hold.
        assert_eq!(shown(429, JSON, "{\"message\":\"a\"}\n<html>"), "a");
        assert_eq!(shown(429, JSON, r#"{"Message":"b"}"#), "b");
        assert_eq!(shown(429, JSON, r#"{"message":"c","MESSAGE":"d"}"#), "d");
        assert_eq!(shown(429, JSON, r#"{"message":"e","message":null}"#), "e");
        assert_eq!(
            shown(
                503,
                JSON,
                r#" {"status":false,"x":[1,{"y":2}],"message":"f"}"#
            ),
            "f"
        );
        // Decoding fails: Gitaly's "Internal API error (<status>)". Rails' own rate
        // limiter nests its text under `error`; Rack::Attack answers plain text.
        for body in [
            r#"{"message":{"error":"This endpoint has been requested too many times. Try again later."}}"#,
            "Retry later\n",
            "",
            "<html><body>502 Bad Gateway</body></html>",
            r#""just a string""#,
            "[]",
            r#"{"message":"unterminated"#,
            r#"{"message":5}"#,
        ] {
            assert_eq!(
                shown(429, "text/plain", body),
                "Internal API error (429)",
                "{body:?}"
            );
        }
        // Decoding succeeds without a message: Gitaly's text would be empty; ours
        // names the status (the one deliberate difference).
        for body in ["{}", "null", r#"{"message":null}"#, r#"{"message":""}"#] {
            assert_eq!(
                shown(500, JSON, body),
                "Internal API error (500)",
                "{body:?}"
            );
        }
        // Invalid UTF-8 inside the message is replaced, as Go does.
        let e = Answer {
            status: 403,
            content_type: JSON.into(),
            retry_after: None,
            body: b"{\"message\":\"caf\xe9\"}".to_vec(),
        }
        .allowed()
        .unwrap_err();
        assert_eq!(e.gitaly_text(), "caf\u{fffd}");
    }

    #[test]
    fn a_throttled_answer_keeps_retry_after_and_is_no_refusal() {
        let mut a = answer(429, "text/plain", "Retry later\n");
        a.retry_after = Some(std::time::Duration::from_secs(30));
        let e = a.allowed().unwrap_err();
        assert!(e.is_throttled() && !e.is_refusal());
        assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(30)));
        assert_eq!(e.gitaly_text(), "Internal API error (429)");
        assert_eq!(
            e.to_string(),
            "GitLab's /allowed answered HTTP 429 (Retry-After: 30 s)"
        );
        // 400 is our request's fault, 5xx GitLab's: neither is a verdict.
        assert!(!answer(400, JSON, "{}").allowed().unwrap_err().is_refusal());
        assert!(!answer(503, JSON, "{}").allowed().unwrap_err().is_refusal());
        assert!(answer(422, JSON, "{}").allowed().unwrap_err().is_refusal());
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        use std::time::{Duration, UNIX_EPOCH};
        // Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example.
        let now = UNIX_EPOCH + Duration::from_secs(784111777);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(retry_after("+5", now), Some(Duration::from_secs(5)));
        assert_eq!(retry_after("-1", now), None);
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("", now), None);
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
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
