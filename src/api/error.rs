//! API errors: one enum, each with an HTTP status and a stable `code`. The body is
//! `{"error": {"code", "message", "type"}}`, a shape OpenAI clients also understand.

use crate::actors::router::SubmitError;
use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(&'static str, String),
    #[error("{0}")]
    Invalid(String),
    #[error("{message}")]
    MethodNotAllowed { message: String, allow: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InsufficientBalance(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("too many tasks in flight ({0}); retry after {1} s")]
    RateLimited(String, u64),
    /// The key's task quota is used up (no retry helps).
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0}")]
    Busy(String, u64),
    #[error("{0}")]
    ChainUnavailable(String, u64),
    /// The store refused a write; nothing was accepted.
    #[error("{0}")]
    StorageUnavailable(String, u64),
    #[error("{message}")]
    TaskFailed {
        code: &'static str,
        message: String,
        status: StatusCode,
    },
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(code, _) => code,
            ApiError::Invalid(_) => "invalid_request",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::InsufficientBalance(_) => "insufficient_balance",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::RateLimited(..) => "rate_limited",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::Busy(..) => "overloaded",
            ApiError::ChainUnavailable(..) => "chain_unavailable",
            ApiError::StorageUnavailable(..) => "storage_unavailable",
            ApiError::TaskFailed { code, .. } => code,
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::NotFound(..)
            | ApiError::Invalid(_)
            | ApiError::MethodNotAllowed { .. }
            | ApiError::Conflict(_)
            | ApiError::TooLarge(_) => "invalid_request_error",
            ApiError::InsufficientBalance(_) => "insufficient_quota",
            ApiError::RateLimited(..) | ApiError::Busy(..) | ApiError::QuotaExceeded(_) => {
                "rate_limit_error"
            }
            ApiError::TaskFailed { .. }
            | ApiError::Internal(_)
            | ApiError::ChainUnavailable(..)
            | ApiError::StorageUnavailable(..) => "server_error",
        }
    }

    /// The JSON body, also sent as an SSE or WebSocket event.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code(), "message": self.to_string(), "type": self.kind()}})
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(..) => StatusCode::NOT_FOUND,
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::InsufficientBalance(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited(..) | ApiError::QuotaExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Busy(..)
            | ApiError::ChainUnavailable(..)
            | ApiError::StorageUnavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TaskFailed { status, .. } => *status,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if let ApiError::RateLimited(_, s)
        | ApiError::Busy(_, s)
        | ApiError::ChainUnavailable(_, s)
        | ApiError::StorageUnavailable(_, s) = self
        {
            response.insert_header((header::RETRY_AFTER, s.to_string()));
        }
        if let ApiError::MethodNotAllowed { allow, .. } = self {
            response.insert_header((header::ALLOW, allow.as_str()));
        }
        response.json(self.body())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::NoSuchSession(_) => ApiError::NotFound("session_not_found", e.to_string()),
            SubmitError::NotOwner(_) => ApiError::Forbidden(e.to_string()),
            SubmitError::InsufficientBalance(m) => ApiError::InsufficientBalance(m),
            SubmitError::Invalid(m) => ApiError::Invalid(m),
            SubmitError::Busy(m) => ApiError::Busy(m, 1),
            SubmitError::ChainUnavailable(_) => ApiError::ChainUnavailable(e.to_string(), 5),
            SubmitError::StorageUnavailable(m) => ApiError::StorageUnavailable(m, 1),
            SubmitError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<super::keys::KeyError> for ApiError {
    fn from(e: super::keys::KeyError) -> Self {
        use super::keys::KeyError;
        match e {
            KeyError::NameTaken(_) | KeyError::Full => ApiError::Conflict(e.to_string()),
            KeyError::NoSuchKey(_) => ApiError::NotFound("not_found", e.to_string()),
            KeyError::QuotaExhausted(_) | KeyError::TooManySessions(_) => {
                ApiError::QuotaExceeded(e.to_string())
            }
            KeyError::NoCredit { .. } => ApiError::InsufficientBalance(e.to_string()),
            KeyError::Store(_) | KeyError::Stopped(_) => {
                ApiError::StorageUnavailable(e.to_string(), 1)
            }
        }
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> Self {
        ApiError::Internal(format!("an actor did not answer: {e}"))
    }
}
