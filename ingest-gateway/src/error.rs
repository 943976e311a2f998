//! The gateway's one error type; each variant becomes a status code and a JSON body
//! `{"error": code, "message": text}` that tells the client what to do. Every other error
//! answer — the framework's own rejections (unknown route or method, malformed query, a
//! panic caught) — is reshaped into the same body here, so clients parse one shape.
//!
//! Each request gets an id, sent back in `x-request-id`. A 5xx body carries that id and a
//! generic message, never internal error text: the detail is logged under the same id.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use txpipe_common::error::Chain;
use txpipe_common::storage::StorageError;

/// The response header (and body field, on 5xx) that names a request in the logs.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Most bytes of a framework rejection's text kept as the JSON message.
const REJECTION_TEXT_MAX: usize = 1024;

tokio::task_local! {
    /// The id of the request being handled, for error bodies and log lines.
    static REQUEST_ID: String;
}

/// The current request's id, if called while handling one.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Marks a response whose body already has the JSON error shape.
#[derive(Clone, Copy)]
struct Shaped;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "unsupported content type {0}: send the CSV as the request body with Content-Type text/csv or \
         application/octet-stream, or as the part named file of a multipart/form-data form"
    )]
    UnsupportedMediaType(String),
    #[error("the upload is empty: send the CSV file as the body, or as a form's file part")]
    EmptyBody,
    #[error("the upload is larger than the limit of {0} bytes (TXPIPE_MAX_UPLOAD_BYTES)")]
    TooLarge(u64),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error(
        "the request body stopped arriving, or came slower than 1 KiB in {0:?} (TXPIPE_BODY_IDLE_TIMEOUT_MS); the \
         upload was dropped"
    )]
    BodyTimeout(std::time::Duration),
    #[error("too many uploads in progress; try again shortly")]
    Busy,
    #[error("service unavailable, try again later: {0}")]
    Unavailable(String),
    /// Another request with the same `Idempotency-Key` is still being handled (409, with
    /// `Retry-After`).
    #[error("a request with this Idempotency-Key is still in progress; retry shortly to get its answer")]
    IdempotencyInFlight,
    /// The `Idempotency-Key` was used for another request (422).
    #[error("{0}")]
    IdempotencyMismatch(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// Over a rate limit or the daily quota (429): the limit's headers and `Retry-After` go
    /// with it. `code` is `rate_limited` or `quota_exceeded`.
    #[error("{message}")]
    Limited { code: &'static str, message: String, limit: crate::limits::Limit, retry_after: u64 },
    /// A rejection the framework made (routing, extractors, limits), with its status and text.
    #[error("{1}")]
    Rejected(StatusCode, String),
}

impl GatewayError {
    /// Storage failures, answered with the status their class maps to
    /// ([`txpipe_common::storage::StorageClass::http_status`]): an unavailable store is the
    /// client's cue to retry (503), a bad cursor or a broken upload stream its own fault (400).
    /// A server-side failure's detail is logged here, under the request id, and only `what`
    /// failed goes into the error (and so to the client).
    pub fn from_storage(what: &str, e: StorageError) -> Self {
        match e.class().http_status() {
            StatusCode::NOT_FOUND => GatewayError::NotFound(format!("{what}: {}", Chain(&e))),
            StatusCode::BAD_REQUEST => GatewayError::BadRequest(format!("{what}: {}", Chain(&e))),
            StatusCode::SERVICE_UNAVAILABLE => GatewayError::unavailable(what, &e),
            _ => {
                log_detail(what, &e);
                GatewayError::Internal(what.to_owned())
            }
        }
    }

    /// 503 saying `what` failed; `detail` (internal) only in the log, under the request id.
    pub fn unavailable(what: &str, detail: &(dyn std::error::Error + 'static)) -> Self {
        log_detail(what, detail);
        GatewayError::Unavailable(what.to_owned())
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
            GatewayError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            GatewayError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            GatewayError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            GatewayError::IdempotencyInFlight => (StatusCode::CONFLICT, "idempotency_key_in_use"),
            GatewayError::IdempotencyMismatch(_) => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            GatewayError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            GatewayError::Limited { code, .. } => (StatusCode::TOO_MANY_REQUESTS, code),
            GatewayError::Rejected(status, _) => (*status, rejection_code(*status)),
        }
    }
}

fn log_detail(what: &str, detail: &(dyn std::error::Error + 'static)) {
    tracing::warn!(request_id = %request_id().unwrap_or_default(), what, error = %Chain(detail), "request failed");
}

/// Runs `f` (a task spawned for the current request) with the request's id in scope.
pub(crate) async fn with_request_id<F: std::future::Future>(id: Option<String>, f: F) -> F::Output {
    match id {
        Some(id) => REQUEST_ID.scope(id, f).await,
        None => f.await,
    }
}

/// The most characters of an error message: messages quote what the client sent (a query
/// value, an id), which must not make an answer as large as the request.
const MAX_MESSAGE_CHARS: usize = 500;

/// `message`, cut to [`MAX_MESSAGE_CHARS`] with an ellipsis.
fn bounded(message: String) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((at, _)) => format!("{}…", &message[..at]),
        None => message,
    }
}

/// Stable codes for the framework's rejections, by status.
fn rejection_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let id = request_id().unwrap_or_default();
        let message = bounded(self.to_string());
        let body = if status.is_server_error() {
            // what failed, never why: the detail was logged under the request id
            tracing::warn!(request_id = %id, error = %message, "answered with a server error");
            json!({"error": code, "message": format!("{message} (request id {id})"), "request_id": id})
        } else {
            json!({"error": code, "message": message})
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if matches!(self, GatewayError::IdempotencyInFlight) {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let GatewayError::Limited { limit, retry_after, .. } = &self {
            limit.write(resp.headers_mut());
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, (*retry_after).into());
        }
        resp.extensions_mut().insert(Shaped);
        resp
    }
}

/// Middleware (outermost): gives the request an id, runs it with that id in scope, sets the
/// `x-request-id` header, and reshapes any error answer not already in the JSON shape.
pub(crate) async fn request_scope(mut req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().simple().to_string();
    // a client's own x-request-id is replaced: the id must name this gateway's log lines
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let mut resp = REQUEST_ID
        .scope(id.clone(), async move {
            let resp = next.run(req).await;
            let status = resp.status();
            if (status.is_client_error() || status.is_server_error()) && !is_json(&resp) {
                // a 405's Allow header says which methods the path has: keep it
                let allow = resp.headers().get(axum::http::header::ALLOW).cloned();
                let text = match axum::body::to_bytes(resp.into_body(), REJECTION_TEXT_MAX).await {
                    Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
                    Err(_) => String::new(),
                };
                let text = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { text };
                let mut reshaped = GatewayError::Rejected(status, text).into_response();
                if let Some(allow) = allow {
                    reshaped.headers_mut().insert(axum::http::header::ALLOW, allow);
                }
                reshaped
            } else {
                resp
            }
        })
        .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// Whether an answer is already JSON: ours, or a route's own (`/readyz` says why it is not ready).
fn is_json(resp: &Response) -> bool {
    resp.extensions().get::<Shaped>().is_some()
        || resp
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
}

/// The answer to a panic the catch-panic layer caught (reshaped by [`request_scope`]).
pub(crate) fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    tracing::error!(request_id = %request_id().unwrap_or_default(), "a handler panicked");
    GatewayError::Internal("a handler panicked".into()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(e: GatewayError) -> (StatusCode, serde_json::Value) {
        let resp = REQUEST_ID.scope("abc123".into(), async move { e.into_response() }).await;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn server_errors_carry_the_request_id_and_no_internal_text() {
        let secret = std::io::Error::other("sqlite at /secret/path is locked, amqp://user:pw@host refused");
        for e in [
            GatewayError::from_storage("reading", StorageError::unavailable("x").with_source(secret)),
            GatewayError::from_storage("reading", StorageError::corrupt("/secret/path")),
            GatewayError::unavailable("announcing", &std::io::Error::other("amqp://user:pw@host")),
        ] {
            let (status, body) = body_of(e).await;
            assert!(status.is_server_error());
            assert_eq!(body["request_id"], "abc123");
            let text = body.to_string();
            assert!(!text.contains("secret") && !text.contains("pw@"), "{text}");
        }
    }

    #[tokio::test]
    async fn client_errors_keep_their_codes_and_messages() {
        let (status, body) = body_of(GatewayError::TooLarge(10)).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")));
        assert!(body["message"].as_str().unwrap().contains("TXPIPE_MAX_UPLOAD_BYTES"));
        let (_, body) = body_of(GatewayError::Rejected(StatusCode::METHOD_NOT_ALLOWED, "no".into())).await;
        assert_eq!(body["error"], "method_not_allowed");
    }

    #[tokio::test]
    async fn a_message_quoting_a_huge_input_is_cut() {
        let (_, body) =
            body_of(GatewayError::BadRequest(format!("mode must be all or partial, not {}", "é".repeat(60_000)))).await;
        let message = body["message"].as_str().unwrap();
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS + 1, "{message}");
        assert!(message.starts_with("mode must be") && message.ends_with('…'));
    }
}
