//! `POST /upload`: streams the body into the object store, records the file as `uploaded`
//! (not yet announced), publishes `file.uploaded` and waits for its confirm, marks it
//! announced and answers 202; if the store or the broker cannot take it, undoes what was done
//! and answers 503. The upload is counted against its key's daily quota first, and belongs to
//! that key.

use crate::GatewayError;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use txpipe_common::auth::Caller;
use txpipe_common::messages::StageMessage;
use txpipe_common::metrics::{InternalEvent, UploadFinished, UploadStored};
use txpipe_common::stage::RoutingKey;
use txpipe_common::status::StatusRecord;
use txpipe_common::storage::StorageErrorKind;
use txpipe_common::{Deps, FileId};

/// Content types accepted on `POST /upload`.
const ACCEPTED_TYPES: [&str; 4] = ["text/csv", "application/csv", "text/plain", "application/octet-stream"];
/// How long an upload waits for a lost broker link to come back before answering 503.
const ANNOUNCE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn content_type_ok(headers: &HeaderMap) -> Result<(), GatewayError> {
    let given = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = given.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if ACCEPTED_TYPES.contains(&essence.as_str()) {
        Ok(())
    } else {
        Err(GatewayError::UnsupportedMediaType(if given.is_empty() { "none".into() } else { given.into() }))
    }
}

pub(crate) async fn upload(
    State(deps): State<Deps>,
    Extension(caller): Extension<Caller>,
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
        Ok(charge) => charge.settle(trace.scope("upload", accept(deps.clone(), owner, headers, body)).await).await,
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

async fn accept(deps: Deps, owner: Option<String>, headers: HeaderMap, body: Body) -> Result<Response, GatewayError> {
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
    record.uploaded_by = owner;
    if let Err(e) = deps.storage.statuses.create(&record).await {
        let _ = objects.delete(&key).await;
        return Err(GatewayError::from_storage("recording the upload", e));
    }
    let event = StageMessage::from_record(RoutingKey::FileUploaded, &record);
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
