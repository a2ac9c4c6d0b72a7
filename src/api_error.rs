//! The HTTP boundary's error: a status and `{"error":{"code","message"}}`.
//! Unexpected failures are logged with their cause and answered as an
//! opaque 500, so internals (and secrets) never reach a client. A store
//! that is unavailable (database down, disk full) is a 503
//! `store_unavailable` with `Retry-After`: nothing was stored, try again;
//! it is logged once by `store::health`, not per request.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// `Retry-After` in seconds, when the client should simply try again.
    pub retry_after_secs: Option<u64>,
}

/// What a 503 `store_unavailable` tells the client to wait.
pub const STORE_RETRY_AFTER_SECS: u64 = 5;

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// The database cannot be reached or written: nothing was stored or
    /// changed. The cause is logged once by `store::health`, not here.
    pub fn store_unavailable() -> Self {
        Self {
            retry_after_secs: Some(STORE_RETRY_AFTER_SECS),
            ..Self::new(
                503,
                "store_unavailable",
                format!(
                    "the database is unavailable, so nothing was stored or changed; \
                     send the same request again later (in {STORE_RETRY_AFTER_SECS} s or more). \
                     GET /readyz and the service log say why"
                ),
            )
        }
    }

    /// Logs the cause, answers without it.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            500,
            "internal_error",
            "internal error; the cause is in the service log",
        )
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(404, "not_found", what)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after_secs {
            response.insert_header(("retry-after", secs.to_string()));
        }
        response.json(json!({
            "error": { "code": self.code, "message": self.message }
        }))
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Conflict(message) => Self::new(409, "conflict", message),
            crate::store::StoreError::NotFound(message) => Self::not_found(message),
            crate::store::StoreError::Unavailable(_) => Self::store_unavailable(),
            other => Self::internal(other),
        }
    }
}
