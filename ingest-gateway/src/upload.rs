//! `POST /upload`: streams the body into the object store, records the file as `uploaded`
//! (not yet announced), publishes `file.uploaded` and waits for its confirm, marks it
//! announced and answers 202; if the store or the broker cannot take it, undoes what was done
//! and answers 503. The upload is counted against its key's daily quota first, and belongs to
//! that key.
//!
//! All or nothing, whatever the client does: while the body streams in, the upload holds one
//! of the `TXPIPE_MAX_UPLOADS_IN_FLIGHT` slots (none free: 503 before a byte is read) and a
//! body that stops arriving for `TXPIPE_BODY_IDLE_TIMEOUT_MS` is dropped with its partial
//! object. Once the body is stored, recording and announcing run in a task of their own, so
//! a client that hangs up then cannot stop them half-way: the file is processed and notified.

use crate::GatewayError;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use txpipe_common::auth::Caller;
use txpipe_common::messages::StageMessage;
use txpipe_common::metrics::{InternalEvent, UploadFinished, UploadStored};
use txpipe_common::stage::RoutingKey;
use txpipe_common::status::{Mode, OnConflict, StatusRecord, UploadOptions};
use txpipe_common::storage::StorageErrorKind;
use txpipe_common::{Deps, FileId};

/// Content types accepted on `POST /upload`.
const ACCEPTED_TYPES: [&str; 4] = ["text/csv", "application/csv", "text/plain", "application/octet-stream"];
/// How long an upload waits for a lost broker link to come back before answering 503.
const ANNOUNCE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The uploads allowed to stream their bodies at once.
#[derive(Clone)]
pub(crate) struct UploadSlots(Arc<Semaphore>);

impl UploadSlots {
    pub(crate) fn new(n: usize) -> Self {
        Self(Arc::new(Semaphore::new(n)))
    }

    /// A slot now, or `Busy` (503 with Retry-After): never waits, so a flood is refused cheaply.
    fn take(&self) -> Result<OwnedSemaphorePermit, GatewayError> {
        self.0.clone().try_acquire_owned().map_err(|_| GatewayError::Busy)
    }
}

/// Why an upload body stopped: its own stream failed, it went over the size limit, or it
/// stopped arriving.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    None,
    TooLarge,
    Idle,
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

#[derive(serde::Deserialize)]
struct OptionsQuery {
    mode: Option<String>,
    on_conflict: Option<String>,
}

/// `?mode=all|partial&on_conflict=reject|update`, checked before anything is read or counted:
/// an unknown value, or an `on_conflict` the deployment does not let uploads choose, is a 400.
pub(crate) struct Options(UploadOptions);

impl axum::extract::FromRequestParts<Deps> for Options {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, deps: &Deps) -> Result<Self, GatewayError> {
        let axum::extract::Query(q) = axum::extract::Query::<OptionsQuery>::from_request_parts(parts, deps)
            .await
            .map_err(|e| GatewayError::BadRequest(e.body_text()))?;
        let mode = match q.mode.as_deref() {
            None => Mode::All,
            Some(m) => Mode::parse(m)
                .ok_or_else(|| GatewayError::BadRequest(format!("mode must be all or partial, not {m:?}")))?,
        };
        let deployment = deps.settings.on_conflict;
        let on_conflict = match q.on_conflict.as_deref() {
            None => deployment,
            Some(c) => {
                let asked = OnConflict::parse(c).ok_or_else(|| {
                    GatewayError::BadRequest(format!("on_conflict must be reject or update, not {c:?}"))
                })?;
                if asked != deployment && !deps.settings.allow_upload_on_conflict {
                    return Err(GatewayError::BadRequest(format!(
                        "this deployment does not let uploads choose on_conflict: it is {} (TXPIPE_ON_CONFLICT; \
                         TXPIPE_ALLOW_UPLOAD_ON_CONFLICT=true lets them)",
                        deployment.as_str()
                    )));
                }
                asked
            }
        };
        Ok(Options(UploadOptions { mode, on_conflict }))
    }
}

pub(crate) async fn upload(
    State(deps): State<Deps>,
    Extension(caller): Extension<Caller>,
    Extension(slots): Extension<UploadSlots>,
    Options(options): Options,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    // continue the client's trace, or start one; every message about this file carries it
    let trace = headers
        .get(txpipe_common::trace::HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(txpipe_common::trace::TraceContext::parse)
        .unwrap_or_else(txpipe_common::trace::TraceContext::start);
    let owner = caller.name().map(str::to_owned);
    let result = match crate::limits::Charge::take(&deps, &caller).await {
        Ok(charge) => {
            charge.settle(trace.scope("upload", accept(deps.clone(), slots, owner, options, headers, body)).await).await
        }
        Err(e) => Err(e),
    };
    let result = result.map(|mut resp| {
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

async fn accept(
    deps: Deps,
    slots: UploadSlots,
    owner: Option<String>,
    options: UploadOptions,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
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
    let slot = slots.take()?;

    let file_id = FileId::new();
    let key = deps.names.object_key(&file_id);
    let idle = Duration::from_millis(deps.settings.body_idle_timeout_ms);
    let cut = Arc::new(std::sync::Mutex::new(Cut::None));
    let stream = limited(body, limit, idle, cut.clone());
    let objects = &deps.storage.objects;
    let stored = objects.put(&key, stream).await;
    drop(slot);
    let cut = *cut.lock().unwrap_or_else(|p| p.into_inner());
    let size = match stored {
        Ok(size) => size,
        // the stream failed because it went over the limit or stalled: say that, not "bad request"
        Err(e) if e.kind() == StorageErrorKind::UploadFailed && cut == Cut::TooLarge => {
            return Err(GatewayError::TooLarge(limit))
        }
        Err(e) if e.kind() == StorageErrorKind::UploadFailed && cut == Cut::Idle => {
            tracing::warn!(%file_id, ?idle, "upload body stalled; dropped");
            return Err(GatewayError::BodyTimeout(idle));
        }
        Err(e) => return Err(GatewayError::from_storage("storing the upload", e)),
    };
    if size == 0 {
        let _ = objects.delete(&key).await;
        return Err(GatewayError::EmptyBody);
    }
    // from here on the upload completes even if the client goes: this task is not cancelled
    // when the request is (an unread 202 is harmless; a half-done upload is not)
    // (the task keeps the trace, a task-local, so the messages still carry it)
    let work = crate::error::with_request_id(
        crate::error::request_id(),
        commit(deps.clone(), file_id, key, size, owner, options),
    );
    let commit = match txpipe_common::trace::current() {
        Some(trace) => tokio::spawn(trace.scope("upload", work)),
        None => tokio::spawn(work.in_current_span()),
    };
    commit.await.map_err(|e| GatewayError::Internal(format!("the upload task failed: {e}")))?
}

/// The body as a stream that fails once it passes `limit` bytes or goes `idle` without a
/// chunk, noting which in `cut`.
fn limited(
    body: Body,
    limit: u64,
    idle: Duration,
    cut: Arc<std::sync::Mutex<Cut>>,
) -> txpipe_common::storage::ByteStream {
    let chunks = body.into_data_stream().map_err(std::io::Error::other);
    let state = (chunks, 0u64, cut, false);
    futures::stream::unfold(state, move |(mut chunks, mut seen, cut, done)| async move {
        if done {
            return None;
        }
        let fail = |why: Cut, msg: String| {
            *cut.lock().unwrap_or_else(|p| p.into_inner()) = why;
            Err(std::io::Error::other(msg))
        };
        let item = match tokio::time::timeout(idle, chunks.next()).await {
            Err(_) => fail(Cut::Idle, format!("no body bytes for {idle:?}")),
            Ok(None) => return None,
            Ok(Some(Err(e))) => Err(e),
            Ok(Some(Ok(chunk))) => {
                seen += chunk.len() as u64;
                if seen > limit {
                    fail(Cut::TooLarge, format!("upload larger than {limit} bytes"))
                } else {
                    Ok(chunk)
                }
            }
        };
        let done = item.is_err();
        Some((item, (chunks, seen, cut, done)))
    })
    .boxed()
}

/// Records the stored upload, announces it and marks it announced; undoes it all and answers
/// 503 if it cannot be announced (or was withdrawn meanwhile by a validator or a sweeper).
async fn commit(
    deps: Deps,
    file_id: FileId,
    key: String,
    size: u64,
    owner: Option<String>,
    options: UploadOptions,
) -> Result<Response, GatewayError> {
    let objects = &deps.storage.objects;
    // recorded as not yet announced: no worker starts on it until the broker has confirmed
    let mut record = StatusRecord::uploaded(file_id, key.clone(), size, chrono::Utc::now());
    record.announced = false;
    record.uploaded_by = owner;
    record.options = options;
    if let Err(e) = deps.storage.statuses.create(&record).await {
        let _ = objects.delete(&key).await;
        return Err(GatewayError::from_storage("recording the upload", e));
    }
    let event = StageMessage::from_record(RoutingKey::FileUploaded, &record);
    let announced = match announce(&deps, &event).await {
        // withdrawn meanwhile (the record is gone): the upload is refused like any other
        Ok(()) => deps
            .storage
            .statuses
            .mark_announced(file_id)
            .await
            .map_err(|e| GatewayError::unavailable("recording the announcement", &e)),
        Err(e) => Err(GatewayError::unavailable("announcing the upload", &e)),
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
    let body = json!({
        "file_id": file_id, "status": "uploaded", "status_url": status_url, "size_bytes": size,
        "mode": options.mode, "on_conflict": options.on_conflict,
    });
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
