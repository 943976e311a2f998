//! The ingest gateway: `POST /upload` streams a CSV into the object store, records it as
//! `uploaded` and publishes `file.uploaded` (its confirm awaited) before answering 202; the
//! read endpoints show a file's status and its stored transactions.
//!
//! Claim check: the broker carries only a small message pointing at the stored object. If
//! the store or the broker cannot take an upload, the client gets 503 and nothing is left
//! behind claiming it was accepted.

mod error;

pub use error::GatewayError;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;
use txpipe_common::messages::StageMessage;
use txpipe_common::metrics::{InternalEvent, UploadFinished, UploadStored};
use txpipe_common::stage::Service;
use txpipe_common::status::StatusRecord;
use txpipe_common::storage::StorageErrorKind;
use txpipe_common::{Deps, FileId};

/// Content types accepted on `POST /upload`.
const ACCEPTED_TYPES: [&str; 4] = ["text/csv", "application/csv", "text/plain", "application/octet-stream"];
/// Page size of `GET /files/{id}/transactions` when `limit` is not given, and its maximum.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// How long an upload waits for a lost broker link to come back before answering 503.
const ANNOUNCE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The gateway's routes over `deps`.
pub fn router(deps: Deps) -> Router {
    Router::new()
        .route("/upload", post(upload))
        .route("/files/{file_id}", get(file_status))
        .route("/files/{file_id}/transactions", get(file_transactions))
        .with_state(deps.clone())
        .merge(txpipe_common::health::routes(deps))
        // the upload body is streamed and its size checked as it arrives
        .layer(DefaultBodyLimit::disable())
        // the access log: one line per request at info, with method, path, status and latency
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
}

/// Serves the gateway on `listener` until `shutdown` resolves. Declares the queue uploads go
/// to first, so an upload accepted before any validator runs still waits for one. While the
/// broker is unreachable, uploads get 503; if reconnecting is given up, the gateway stops
/// with an error so a supervisor restarts it.
pub async fn run(
    listener: tokio::net::TcpListener,
    deps: Deps,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    deps.broker.declare_for(Service::Gateway).await.map_err(|e| GatewayError::Unavailable(e.to_string()))?;
    let broker = deps.broker.clone();
    let lost = Arc::new(AtomicBool::new(false));
    let flag = lost.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = broker.gave_up() => flag.store(true, Ordering::SeqCst),
        }
    };
    axum::serve(listener, router(deps.clone()))
        .with_graceful_shutdown(stop)
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    if lost.load(Ordering::SeqCst) {
        return Err(GatewayError::Unavailable(
            "lost RabbitMQ for longer than TXPIPE_RECONNECT_TIMEOUT_MS; stopping".into(),
        ));
    }
    Ok(())
}

fn content_type_ok(headers: &HeaderMap) -> Result<(), GatewayError> {
    let given = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = given.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if ACCEPTED_TYPES.contains(&essence.as_str()) {
        Ok(())
    } else {
        Err(GatewayError::UnsupportedMediaType(if given.is_empty() { "none".into() } else { given.into() }))
    }
}

async fn upload(State(deps): State<Deps>, headers: HeaderMap, body: Body) -> Result<Response, GatewayError> {
    // continue the client's trace, or start one; every message about this file carries it
    let trace = headers
        .get(txpipe_common::trace::HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(txpipe_common::trace::TraceContext::parse)
        .unwrap_or_else(txpipe_common::trace::TraceContext::start);
    let result = trace.scope("upload", accept(deps, headers, body)).await.map(|mut resp| {
        if let Ok(v) = trace.header().parse() {
            resp.headers_mut().insert(txpipe_common::trace::HEADER, v);
        }
        resp
    });
    let label = match &result {
        Ok(_) => "accepted",
        Err(e) => e.code(),
    };
    UploadFinished { result: label }.emit();
    result
}

async fn accept(deps: Deps, headers: HeaderMap, body: Body) -> Result<Response, GatewayError> {
    content_type_ok(&headers)?;
    let limit = deps.settings.max_upload_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::TooLarge(limit));
    }
    if declared == Some(0) {
        return Err(GatewayError::EmptyBody);
    }

    let file_id = FileId::new();
    let key = deps.names.object_key(&file_id);
    let over_limit = Arc::new(AtomicBool::new(false));
    let flag = over_limit.clone();
    let mut seen = 0u64;
    let stream = body
        .into_data_stream()
        .map_err(std::io::Error::other)
        .map(move |chunk| {
            let chunk = chunk?;
            seen += chunk.len() as u64;
            if seen > limit {
                flag.store(true, Ordering::Relaxed);
                return Err(std::io::Error::other(format!("upload larger than {limit} bytes")));
            }
            Ok(chunk)
        })
        .boxed();
    let objects = &deps.storage.objects;
    let size = match objects.put(&key, stream).await {
        Ok(size) => size,
        // the stream failed because it went over the limit: say that, not "bad request"
        Err(e) if e.kind() == StorageErrorKind::UploadFailed && over_limit.load(Ordering::Relaxed) => {
            return Err(GatewayError::TooLarge(limit))
        }
        Err(e) => return Err(GatewayError::from_storage("storing the upload", e)),
    };
    if size == 0 {
        let _ = objects.delete(&key).await;
        return Err(GatewayError::EmptyBody);
    }

    // recorded as not yet announced: no worker starts on it until the broker has confirmed
    let mut record = StatusRecord::uploaded(file_id, key.clone(), size, chrono::Utc::now());
    record.announced = false;
    if let Err(e) = deps.storage.statuses.create(&record).await {
        let _ = objects.delete(&key).await;
        return Err(GatewayError::from_storage("recording the upload", e));
    }
    let event = StageMessage::uploaded(file_id, key.clone());
    let announced = match announce(&deps, &event).await {
        Ok(()) => deps
            .storage
            .statuses
            .mark_announced(file_id)
            .await
            .map_err(|e| GatewayError::from_storage("recording the announcement", e)),
        Err(e) => Err(GatewayError::Unavailable(format!("announcing the upload failed: {e}"))),
    };
    if let Err(e) = announced {
        // undo, so nothing claims an upload the client is told was refused: the object first,
        // then the record, so a validator that got the message anyway finds neither
        let _ = objects.delete(&key).await;
        let _ = deps.storage.statuses.withdraw(file_id).await;
        return Err(e);
    }
    UploadStored { file_id, bytes: size }.emit();
    let status_url = format!("/files/{file_id}");
    let body = json!({"file_id": file_id, "status": "uploaded", "status_url": status_url, "size_bytes": size});
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, status_url)], Json(body)).into_response())
}

/// Publishes file.uploaded. If the broker link is down, waits a little for it to come back
/// and sends again with the same message id (a copy is harmless), before giving up.
async fn announce(deps: &Deps, event: &StageMessage) -> Result<(), txpipe_common::amqp::AmqpError> {
    use txpipe_common::amqp::AmqpError;
    let msg = event.outgoing(&deps.names);
    match deps.publisher.publish(&msg).await {
        Err(e @ (AmqpError::Broker(_) | AmqpError::Disconnected | AmqpError::ConfirmTimeout)) => {
            tracing::warn!(file_id = %event.file_id(), error = %e, "publish failed; waiting briefly for the broker");
            // let the supervisor notice the loss before asking whether the link is up
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            match tokio::time::timeout(ANNOUNCE_WAIT, deps.broker.wait_up()).await {
                Ok(Ok(_)) => deps.publisher.publish(&msg).await,
                _ => Err(e),
            }
        }
        other => other,
    }
}

fn parse_id(raw: &str) -> Result<FileId, GatewayError> {
    raw.parse().map_err(|_| GatewayError::NotFound(format!("no file with id {raw:?}")))
}

async fn find(deps: &Deps, file_id: FileId) -> Result<StatusRecord, GatewayError> {
    deps.storage
        .statuses
        .get(file_id)
        .await
        .map_err(|e| GatewayError::from_storage("reading the status", e))?
        .ok_or_else(|| GatewayError::NotFound(format!("no file with id {file_id}")))
}

async fn file_status(State(deps): State<Deps>, Path(raw): Path<String>) -> Result<Json<StatusRecord>, GatewayError> {
    Ok(Json(find(&deps, parse_id(&raw)?).await?))
}

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

async fn file_transactions(
    State(deps): State<Deps>,
    Path(raw): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Response, GatewayError> {
    let file_id = parse_id(&raw)?;
    let limit = match q.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return Err(GatewayError::BadRequest(format!("limit must be a whole number from 1 to {MAX_PAGE}"))),
        },
    };
    find(&deps, file_id).await?;
    let page = deps
        .storage
        .transactions
        .list_by_file(file_id, limit, q.cursor.as_deref())
        .await
        .map_err(|e| GatewayError::from_storage("reading transactions", e))?;
    Ok(Json(page).into_response())
}
