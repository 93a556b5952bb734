//! Refusals: an HTTP status and `{"error": "..."}`.

use serde::{Deserialize, Serialize};

/// The body of every error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// One line saying why.
    pub error: String,
}

/// The HTTP statuses the control API refuses with, and what each means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorStatus {
    /// 400: the request cannot be parsed (a bad range, an unknown field).
    BadRequest,
    /// 404: no such virtual LU, backend or move.
    NotFound,
    /// 409: the precondition does not hold in the present state (acquire while
    /// Re-synchronizing, a busy device, a move under way).
    Conflict,
    /// 422: the config file given to reload is not valid; nothing changed.
    Invalid,
    /// 501: the backend's array lacks the function.
    Unsupported,
    /// 503: the backend is not ready.
    Unavailable,
    /// 500 and any other: the agent failed.
    Internal,
}

impl ErrorStatus {
    /// The meaning of HTTP status `code` (400 and above).
    pub fn of(code: u16) -> ErrorStatus {
        match code {
            400 => ErrorStatus::BadRequest,
            404 => ErrorStatus::NotFound,
            409 => ErrorStatus::Conflict,
            422 => ErrorStatus::Invalid,
            501 => ErrorStatus::Unsupported,
            503 => ErrorStatus::Unavailable,
            _ => ErrorStatus::Internal,
        }
    }

    /// The HTTP status the server answers with.
    pub fn code(self) -> u16 {
        match self {
            ErrorStatus::BadRequest => 400,
            ErrorStatus::NotFound => 404,
            ErrorStatus::Conflict => 409,
            ErrorStatus::Invalid => 422,
            ErrorStatus::Unsupported => 501,
            ErrorStatus::Unavailable => 503,
            ErrorStatus::Internal => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for s in [
            ErrorStatus::BadRequest,
            ErrorStatus::NotFound,
            ErrorStatus::Conflict,
            ErrorStatus::Invalid,
            ErrorStatus::Unsupported,
            ErrorStatus::Unavailable,
            ErrorStatus::Internal,
        ] {
            assert_eq!(ErrorStatus::of(s.code()), s);
        }
        assert_eq!(ErrorStatus::of(502), ErrorStatus::Internal);
    }
}
