//! How a command is refused: an error code, the contract of the reply envelope
//! (`docs/protocol.md`), and a message for people.

use serde::{Deserialize, Serialize};

/// Error codes of the reply envelope. The strings are the contract; see `docs/protocol.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request is malformed or invalid; nothing changed.
    BadRequest,
    /// The command names something that does not exist.
    NotFound,
    /// The command conflicts with the current state (a name taken, `root` stopped).
    Conflict,
    /// No leader or no quorum right now; nothing changed, retry later.
    Unavailable,
    /// The outcome is unknown: the command may or may not have taken effect. Retry with the
    /// same `request_id` to find out safely.
    Timeout,
    /// No node has room.
    Capacity,
    /// The request is over a size limit; nothing changed.
    TooLarge,
    /// A bug or a storage failure on the node.
    Internal,
    /// The sender's identity may not do this (NATS refused the subject, or a node spoke for
    /// another node); nothing changed.
    Forbidden,
    /// The agent's first start failed (`spawn_agent` with `wait: "running"`): it was not
    /// kept, as OTP's `start_child` returns `{error, Reason}`. The message is the start's error.
    StartFailed,
}

impl ErrorCode {
    /// The code's wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Capacity => "capacity",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::StartFailed => "start_failed",
        }
    }
}

/// An error as it travels in a reply envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }

    /// A `bad_request`: the request is wrong, nothing changed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        WireError::new(ErrorCode::BadRequest, message)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for WireError {}
