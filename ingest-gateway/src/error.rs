//! The gateway's one error type; each variant becomes a status code and a JSON body
//! `{"error": code, "message": text}` that tells the client what to do.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use txpipe_common::error::Chain;
use txpipe_common::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("unsupported content type {0}: send the CSV as the request body with Content-Type text/csv or application/octet-stream")]
    UnsupportedMediaType(String),
    #[error("the request body is empty: send the CSV file as the body")]
    EmptyBody,
    #[error("the upload is larger than the limit of {0} bytes (TXPIPE_MAX_UPLOAD_BYTES)")]
    TooLarge(u64),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("service unavailable, try again later: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// Over a rate limit or the daily quota (429): the limit's headers and `Retry-After` go
    /// with it. `code` is `rate_limited` or `quota_exceeded`.
    #[error("{message}")]
    Limited { code: &'static str, message: String, limit: crate::limits::Limit, retry_after: u64 },
}

impl GatewayError {
    /// Storage failures, answered with the status their class maps to
    /// ([`txpipe_common::storage::StorageClass::http_status`]): an unavailable store is the
    /// client's cue to retry (503), a bad cursor or a broken upload stream its own fault (400).
    pub fn from_storage(what: &str, e: StorageError) -> Self {
        let message = format!("{what}: {}", Chain(&e));
        match e.class().http_status() {
            StatusCode::NOT_FOUND => GatewayError::NotFound(message),
            StatusCode::SERVICE_UNAVAILABLE => GatewayError::Unavailable(message),
            StatusCode::BAD_REQUEST => GatewayError::BadRequest(message),
            _ => GatewayError::Internal(message),
        }
    }

    /// The short code of the error, as in the response body's `error` field.
    pub fn code(&self) -> &'static str {
        self.parts().1
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            GatewayError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            GatewayError::EmptyBody => (StatusCode::BAD_REQUEST, "empty_body"),
            GatewayError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            GatewayError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            GatewayError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            GatewayError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            GatewayError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            GatewayError::Limited { code, .. } => (StatusCode::TOO_MANY_REQUESTS, code),
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let mut resp = (status, Json(json!({"error": code, "message": self.to_string()}))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("5"));
        }
        if let GatewayError::Limited { limit, retry_after, .. } = &self {
            limit.write(resp.headers_mut());
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, (*retry_after).into());
        }
        resp
    }
}
