//! The internal-API calls refvote makes and the ways one can fail, shared by the
//! client ([`crate::api`]) and the reading of answers ([`crate::wire`]), so neither
//! imports the other for them.

use std::time::Duration;

/// The internal-API endpoints we call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Allowed,
    PreReceive,
    PostReceive,
    Check,
}

impl Call {
    /// The path below [`INTERNAL_API`](crate::api::INTERNAL_API).
    pub fn path(self) -> &'static str {
        match self {
            Call::Allowed => "/allowed",
            Call::PreReceive => "/pre_receive",
            Call::PostReceive => "/post_receive",
            Call::Check => "/check",
        }
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path())
    }
}

/// A call that did not produce a usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// GitLab answered 4xx or 5xx (`message`: the `message` of its JSON body, read as
    /// Gitaly reads it; `retry_after`: its `Retry-After`, for a 429 or 503).
    #[error("GitLab's {call} answered HTTP {status}{}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default(), retry_after.map(|d| format!(" (Retry-After: {} s)", d.as_secs())).unwrap_or_default())]
    Status {
        call: Call,
        status: u16,
        message: Option<String>,
        retry_after: Option<Duration>,
    },
    /// A success or redirect status the endpoint does not answer with.
    #[error("GitLab's {call} answered HTTP {status}, not 200")]
    UnexpectedStatus { call: Call, status: u16 },
    #[error("GitLab's {call} answered with content type {content_type:?}, not application/json")]
    ContentType { call: Call, content_type: String },
    #[error("GitLab's {call} answered JSON that does not decode: {detail}")]
    Decode { call: Call, detail: String },
    /// The call failed in transport. `connect`: no connection was made, so GitLab
    /// never saw the request.
    #[error("GitLab's {call} could not be reached: {detail}")]
    Unreachable {
        call: Call,
        detail: String,
        connect: bool,
    },
    #[error("GitLab's {call} did not answer within {after:?}")]
    Timeout { call: Call, after: Duration },
    /// The request could not be made (e.g. a correlation id that is no header value).
    #[error("cannot call GitLab's {call}: {detail}")]
    Request { call: Call, detail: String },
}

impl ApiError {
    pub fn call(&self) -> Call {
        match self {
            ApiError::Status { call, .. }
            | ApiError::UnexpectedStatus { call, .. }
            | ApiError::ContentType { call, .. }
            | ApiError::Decode { call, .. }
            | ApiError::Unreachable { call, .. }
            | ApiError::Timeout { call, .. }
            | ApiError::Request { call, .. } => *call,
        }
    }

    /// GitLab looked at the request and refused it (401, 403, 404, 422, …): its message
    /// is meant for the pusher. Anything else is GitLab (or the way to it) failing or
    /// shedding load — a 400 (our request was malformed), a 429 ([`is_throttled`]),
    /// a 5xx — as gitlab-shell's `IsSystemErrorStatus` classifies them. (Gitaly shows
    /// the pusher all of them alike; this only decides how loudly we log.)
    ///
    /// [`is_throttled`]: ApiError::is_throttled
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ApiError::Status {
                status: 401..=499,
                ..
            }
        ) && !self.is_throttled()
    }

    /// GitLab's rate limiter answered 429 Too Many Requests: Rack::Attack (or the
    /// API's own limiter) turned the request away before the endpoint ran.
    pub fn is_throttled(&self) -> bool {
        matches!(self, ApiError::Status { status: 429, .. })
    }

    /// The wait GitLab asked for with `Retry-After`, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The text Gitaly's client gives this error, which Gitaly shows the pusher
    /// (after `GitLab: ` for `/allowed`).
    pub fn gitaly_text(&self) -> String {
        let endpoint = self.call().path();
        match self {
            ApiError::Status {
                message: Some(m), ..
            } if !m.is_empty() => m.clone(),
            ApiError::Status { status, .. } => format!("Internal API error ({status})"),
            ApiError::Unreachable { .. } | ApiError::Timeout { .. } => {
                "Internal API unreachable".into()
            }
            ApiError::UnexpectedStatus { call, status } => match call {
                Call::Allowed => format!("gitlab api is not accessible: {status}"),
                Call::PreReceive => format!("pre-receive call failed with status: {status}"),
                Call::PostReceive => format!("post-receive call failed with status: {status}"),
                Call::Check => format!("Check HTTP request failed with status: {status}"),
            },
            ApiError::ContentType { content_type, .. } => {
                format!("{endpoint} endpoint respond with unsupported content type: {content_type}")
            }
            ApiError::Decode { detail, .. } => {
                format!("decoding response from {endpoint} endpoint: {detail}")
            }
            ApiError::Request { detail, .. } => detail.clone(),
        }
    }
}
