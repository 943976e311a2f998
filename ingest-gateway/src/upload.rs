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
//!
//! The body is the CSV itself (`text/csv`, `application/octet-stream`...), or a
//! `multipart/form-data` form whose file part is the CSV ([`crate::multipart`]); both stream
//! into the store through the same limits.
//!
//! Two request headers change the answer: `Idempotency-Key` ([`crate::idempotency`]: a repeat
//! gets the first upload's answer, nothing is stored twice) and `Prefer: wait=N`
//! ([`crate::verdicts`]: the answer waits for the validator's verdict, or with `?until=completed`
//! the file's final status, at most N seconds, keeping the upload's slot meanwhile).

use crate::idempotency::Found;
use crate::multipart::{PartError, FILE_FIELD};
use crate::verdicts::{Until, Verdicts};
use crate::GatewayError;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::HeaderValue;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit as Slot;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use txpipe_common::auth::Caller;
use txpipe_common::messages::{Content, StageMessage};
use txpipe_common::metrics::{InternalEvent, UploadFinished, UploadStored};
use txpipe_common::stage::RoutingKey;
use txpipe_common::status::{FileStatus, Mode, OnConflict, StatusRecord, UploadOptions};
use txpipe_common::storage::{ByteStream, IdempotentUpload, ObjectReader, ObjectStore, StorageError, StorageErrorKind};
use txpipe_common::{Deps, FileId};

/// Content types accepted on `POST /upload` for a raw body (the CSV itself).
const ACCEPTED_TYPES: [&str; 4] = ["text/csv", "application/csv", "text/plain", "application/octet-stream"];
/// The content type of a form upload.
const MULTIPART: &str = "multipart/form-data";
/// Bytes a multipart body may carry beyond `TXPIPE_MAX_UPLOAD_BYTES` of file: the parts'
/// headers and boundaries, and small fields beside the file (ignored, but read).
const MULTIPART_OVERHEAD: u64 = 64 * 1024;
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

/// How the upload's body carries the CSV.
enum BodyKind {
    /// The body is the CSV.
    Raw,
    /// A `multipart/form-data` form with this boundary; its file part is the CSV.
    Form(String),
}

fn body_kind(headers: &HeaderMap) -> Result<BodyKind, GatewayError> {
    let given = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = given.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if ACCEPTED_TYPES.contains(&essence.as_str()) {
        Ok(BodyKind::Raw)
    } else if essence == MULTIPART {
        multer::parse_boundary(given).map(BodyKind::Form).map_err(|_| {
            GatewayError::BadRequest(
                "multipart/form-data needs a boundary parameter in its Content-Type (curl -F sets it)".into(),
            )
        })
    } else {
        let shown = match headers.get(header::CONTENT_TYPE) {
            None => "none".to_owned(),
            Some(v) if v.to_str().is_err() => format!("{:?}", String::from_utf8_lossy(v.as_bytes())),
            Some(_) => given.to_owned(),
        };
        Err(GatewayError::UnsupportedMediaType(shown))
    }
}

#[derive(serde::Deserialize)]
struct OptionsQuery {
    mode: Option<String>,
    on_conflict: Option<String>,
    until: Option<String>,
}

/// `?mode=all|partial&on_conflict=reject|update&until=validated|completed`, checked before
/// anything is read or counted: an unknown value, or an `on_conflict` the deployment does not
/// let uploads choose, is a 400. (`until` matters only with `Prefer: wait`.)
pub(crate) struct Options(UploadOptions, Until);

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
        let until = match q.until.as_deref() {
            None => Until::default(),
            Some(u) => Until::parse(u)
                .ok_or_else(|| GatewayError::BadRequest(format!("until must be validated or completed, not {u:?}")))?,
        };
        Ok(Options(UploadOptions { mode, on_conflict }, until))
    }
}

/// The answer to an accepted upload.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct UploadAccepted {
    /// The file's id: its status is at `status_url`.
    pub file_id: FileId,
    /// Always `uploaded`: validation starts now.
    #[schema(value_type = FileStatus)]
    pub status: &'static str,
    /// `/files/{file_id}`, also in the `Location` header.
    pub status_url: String,
    /// Bytes stored (for a form, the file part's).
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of those bytes, taken while they streamed in.
    pub sha256: String,
    /// Which rows will be stored: all or none (`all`), or the valid ones (`partial`).
    pub mode: Mode,
    /// What a row conflicting with a stored transaction does.
    pub on_conflict: OnConflict,
}

/// The CSV's request body, as the document describes it.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub(crate) struct CsvFile(Vec<u8>);

/// A form upload, as the document describes it.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct UploadForm {
    /// The CSV file (`curl -F file=@transactions.csv`). Other fields are ignored; a second file
    /// part is refused.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

/// The 422 answer of an upload: the file's status record when the verdict was waited for and
/// the file is invalid, or the error of an `Idempotency-Key` used for another upload.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code, clippy::large_enum_variant)] // only describes the answer in the document
pub(crate) enum Unprocessable {
    Rejected(StatusRecord),
    Refused(crate::openapi::ErrorBody),
}

/// Uploads a CSV of transactions: stores it, records it as `uploaded` and queues it for
/// validation, then answers 202 with the file's id. Follow the file at `status_url`, or send
/// `Prefer: wait=N` to have the answer wait for the validator's verdict (200 valid, 422
/// invalid, 202 undecided after N seconds). With `Idempotency-Key`, a repeat within 24 hours
/// gets the first upload's answer and nothing is stored twice.
#[utoipa::path(
    post,
    path = "/upload",
    tag = "uploads",
    params(
        ("mode" = Option<Mode>, Query, description = "`all` (default): every row or none; `partial`: the valid rows are stored, the others reported and counted in `rejected_rows`"),
        ("on_conflict" = Option<OnConflict>, Query, description = "A row whose transaction another file stored with other values: `reject` refuses it (the file, unless partial), `update` stores it as the next version. Default TXPIPE_ON_CONFLICT; choosing another is a 400 unless TXPIPE_ALLOW_UPLOAD_ON_CONFLICT"),
        ("until" = Option<Until>, Query, description = "With `Prefer: wait`: what the answer waits for, the validator's verdict (`validated`, default) or the file's final status (`completed`)"),
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters (a UUID, say; bare or as a quoted string). A repeat with the same key from the same API key within 24 hours gets the first upload's answer (same `file_id`, `Idempotent-Replayed: true`) and stores nothing; while the first is in progress, 409; with another file or other options, 422",
            max_length = 257, min_length = 1, pattern = r#"^("[!#-\[\]-~]{1,255}"|[!#-\[\]-~]{1,255})$"#),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): wait up to N seconds (at most 60; more is taken as 60) for the verdict before answering: 200 valid (the status record), 422 invalid (the status record with `errors`), 202 undecided. Other preferences are ignored"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context to continue (else the gateway starts a trace); sent back on the answer"),
    ),
    request_body(
        description = "The CSV itself, or a multipart/form-data form whose part named `file` (or only file part) is the CSV. At most TXPIPE_MAX_UPLOAD_BYTES.",
        content(
            (CsvFile = "text/csv"),
            (CsvFile = "application/csv"),
            (CsvFile = "text/plain"),
            (CsvFile = "application/octet-stream"),
            (UploadForm = "multipart/form-data"),
        ),
    ),
    responses(
        (status = 200, description = "`Prefer: wait` and the file is valid (`until=completed`: it completed, or a stage failed it, see `status` and `reason`): its status record, as `GET /files/{file_id}` gives it", body = StatusRecord,
            headers(
                ("Location" = String, description = "The file's status URL"),
                ("Preference-Applied" = String, description = "`wait=N`: the wait that was honoured"),
                ("Idempotent-Replayed" = String, description = "`true` when this answers a repeated Idempotency-Key"),
                ("traceparent" = String, description = "The trace the file's processing carries"),
                ("X-Quota-Limit" = u64, description = "Uploads allowed a UTC day for the key"),
                ("X-Quota-Remaining" = u64, description = "Uploads left today"),
                ("X-Quota-Reset" = u64, description = "Seconds until the quota starts again (UTC midnight)"),
            )),
        (status = 202, description = "Stored and queued for validation (with `Prefer: wait`, not decided in time)", body = UploadAccepted,
            headers(
                ("Location" = String, description = "The file's status URL"),
                ("Preference-Applied" = String, description = "`wait=N`: the wait that was honoured"),
                ("Idempotent-Replayed" = String, description = "`true` when this answers a repeated Idempotency-Key"),
                ("traceparent" = String, description = "The trace the file's processing carries"),
                ("X-Quota-Limit" = u64, description = "Uploads allowed a UTC day for the key"),
                ("X-Quota-Remaining" = u64, description = "Uploads left today"),
                ("X-Quota-Reset" = u64, description = "Seconds until the quota starts again (UTC midnight)"),
            )),
        (status = 400, description = "A bad `mode`, `on_conflict` or `until`, a malformed `Idempotency-Key`, an empty body (`empty_body`), a form without exactly one file part or a malformed form (`bad_request`)", body = crate::openapi::ErrorBody),
        (status = 408, description = "The body stopped arriving for TXPIPE_BODY_IDLE_TIMEOUT_MS (`body_timeout`)", body = crate::openapi::ErrorBody),
        (status = 409, description = "A request with the same Idempotency-Key is still in progress (`idempotency_key_in_use`): retry after `Retry-After` for its answer", body = crate::openapi::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 413, description = "Larger than TXPIPE_MAX_UPLOAD_BYTES (`too_large`)", body = crate::openapi::ErrorBody),
        (status = 415, description = "Not a CSV content type nor multipart/form-data (`unsupported_media_type`)", body = crate::openapi::ErrorBody),
        (status = 422, description = "`Prefer: wait` and the file is invalid (`validation_failed`): its status record, with `errors` and `error_count`; or the Idempotency-Key was used for another file or other options (`idempotency_key_reused`)", body = Unprocessable,
            headers(
                ("Location" = String, description = "The file's status URL (a rejected file)"),
                ("Preference-Applied" = String, description = "`wait=N`: the wait that was honoured"),
            )),
    )
)]
pub(crate) async fn upload(
    State(deps): State<Deps>,
    Extension(caller): Extension<Caller>,
    Extension(slots): Extension<UploadSlots>,
    Extension(verdicts): Extension<Verdicts>,
    Options(options, until): Options,
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
    // the exported span of the upload (when spans are exported); its id is the response's
    // traceparent, so a client can find the trace
    let span = tracing::info_span!(
        target: txpipe_common::telemetry::OTEL_TARGET,
        "upload",
        otel.name = "POST /upload",
        otel.kind = "server",
        http.request.method = "POST",
        http.route = "/upload",
    );
    let trace = trace.adopt(&span).unwrap_or(trace);
    let wait = crate::verdicts::wait_of(&headers).map(|secs| Wait { secs, until });
    let taken: Result<Taken, GatewayError> = async {
        // a malformed key is refused before anything is counted or read
        let held = match crate::idempotency::key_of(&headers)? {
            None => None,
            Some(key) => {
                let key = crate::idempotency::record_key(owner.as_deref(), &key);
                match crate::idempotency::claim(&deps.storage.idempotency, key).await? {
                    Found::Claimed(held) => Some(held),
                    // a repeat: read, compared, answered as the first was; nothing stored or counted
                    Found::Done(first) => {
                        let slot = repeat(&deps, &slots, &first, options, &headers, body, wait.is_some()).await?;
                        return Ok(Taken { accepted: accepted_of(&first), slot, quota: None, replayed: true });
                    }
                }
            }
        };
        let charge = crate::limits::Charge::take(&deps, &caller).await?;
        let work = accept(deps.clone(), slots, owner, options, headers, body, held, wait.is_some());
        let ((accepted, slot), quota) = charge.settle(trace.scope_in(span, "upload", work).await).await?;
        Ok(Taken { accepted, slot, quota, replayed: false })
    }
    .await;
    let result = match taken {
        Ok(taken) => {
            // the slot, if kept, is held while the answer waits
            let mut resp = answer(&deps, &verdicts, taken.accepted, wait).await;
            drop(taken.slot);
            if let Some(quota) = taken.quota {
                quota.write(resp.headers_mut());
            }
            if taken.replayed {
                resp.headers_mut().insert(crate::idempotency::REPLAYED_HEADER, HeaderValue::from_static("true"));
            }
            Ok((resp, taken.replayed))
        }
        Err(e) => Err(e),
    };
    let label = match &result {
        Ok((_, true)) => "replayed",
        Ok(_) => "accepted",
        Err(e) => e.code(),
    };
    UploadFinished { result: label }.emit();
    result.map(|(mut resp, _)| {
        if let Ok(v) = trace.header().parse() {
            resp.headers_mut().insert(txpipe_common::trace::HEADER, v);
        }
        resp
    })
}

/// `Prefer: wait=N` with `?until=`.
#[derive(Clone, Copy)]
struct Wait {
    secs: u64,
    until: Until,
}

/// An upload taken (or a repeat recognised), before its answer.
struct Taken {
    accepted: UploadAccepted,
    /// The upload slot, kept while the answer waits.
    slot: Option<Slot>,
    /// The daily quota after this upload, for the answer's headers.
    quota: Option<crate::limits::Limit>,
    /// A repeated Idempotency-Key's answer.
    replayed: bool,
}

/// The answer to a taken upload: 202 at once, or with `wait`, what the file's status says once
/// decided (200 or 422 with the status record), or 202 if it is not decided in time.
async fn answer(deps: &Deps, verdicts: &Verdicts, accepted: UploadAccepted, wait: Option<Wait>) -> Response {
    let location = [(header::LOCATION, accepted.status_url.clone())];
    let Some(wait) = wait else {
        return (StatusCode::ACCEPTED, location, Json(accepted)).into_response();
    };
    let decided = verdicts.wait_for(deps, accepted.file_id, wait.until, Duration::from_secs(wait.secs)).await;
    let mut resp = match decided {
        Some(record) => (crate::verdicts::status_code(&record), location, Json(record)).into_response(),
        None => (StatusCode::ACCEPTED, location, Json(accepted)).into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(&format!("wait={}", wait.secs)) {
        resp.headers_mut().insert(crate::verdicts::PREFERENCE_APPLIED, v);
    }
    resp
}

/// The 202 body of an upload, as its first request was answered.
fn accepted_of(first: &IdempotentUpload) -> UploadAccepted {
    UploadAccepted {
        file_id: first.file_id,
        status: "uploaded",
        status_url: format!("/files/{}", first.file_id),
        size_bytes: first.size_bytes,
        sha256: first.sha256.clone(),
        mode: first.options.mode,
        on_conflict: first.options.on_conflict,
    }
}

/// A repeated `Idempotency-Key` whose upload is done: reads the body through the same limits
/// into nothing, only hashing it, and lets the first answer stand if it is the same file with
/// the same options (422 otherwise). Returns the upload slot if the answer is to wait.
async fn repeat(
    deps: &Deps,
    slots: &UploadSlots,
    first: &IdempotentUpload,
    options: UploadOptions,
    headers: &HeaderMap,
    body: Body,
    keep_slot: bool,
) -> Result<Option<Slot>, GatewayError> {
    let nowhere: Arc<dyn ObjectStore> = Arc::new(Discard);
    let key = deps.names.object_key(&first.file_id);
    let received = receive(deps, &nowhere, slots, &key, headers, body).await?;
    if let Some(why) = crate::idempotency::mismatch(first, &received.sha256, options) {
        return Err(GatewayError::IdempotencyMismatch(why));
    }
    Ok(keep_slot.then_some(received.slot))
}

/// An object store that keeps nothing: a repeated upload's body streams through it only to be
/// hashed (and sized).
struct Discard;

#[async_trait::async_trait]
impl ObjectStore for Discard {
    async fn put(&self, _: &str, mut body: ByteStream) -> Result<u64, StorageError> {
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            size += chunk.map_err(StorageError::upload_failed)?.len() as u64;
        }
        Ok(size)
    }
    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        Err(StorageError::not_found(key.to_owned()))
    }
    async fn delete(&self, _: &str) -> Result<(), StorageError> {
        Ok(())
    }
    async fn check(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

/// A body received whole: its size, its SHA-256 and the upload slot it streamed under.
struct Received {
    size: u64,
    sha256: String,
    /// The bytes, if the file is small enough to travel in its messages.
    content: Option<Content>,
    slot: Slot,
}

/// Stores a new upload's body and commits it (recorded, announced, and its Idempotency-Key
/// completed). Returns its 202 body and, if `keep_slot` (the answer is to wait), the slot.
#[allow(clippy::too_many_arguments)]
async fn accept(
    deps: Deps,
    slots: UploadSlots,
    owner: Option<String>,
    options: UploadOptions,
    headers: HeaderMap,
    body: Body,
    held: Option<crate::idempotency::Held>,
    keep_slot: bool,
) -> Result<(UploadAccepted, Option<Slot>), GatewayError> {
    let file_id = FileId::new();
    let key = deps.names.object_key(&file_id);
    let Received { size, sha256, content, slot } =
        receive(&deps, &deps.storage.objects, &slots, &key, &headers, body).await?;
    // committing holds no slot, unless the answer will wait (then the wait counts as in flight)
    let slot = keep_slot.then_some(slot);
    // from here on the upload completes even if the client goes: this task is not cancelled
    // when the request is (an unread 202 is harmless; a half-done upload is not)
    // (the task keeps the trace, a task-local, so the messages still carry it)
    let span = tracing::info_span!(target: txpipe_common::telemetry::OTEL_TARGET, "commit", otel.name = "commit upload", file_id = %file_id);
    txpipe_common::trace::set_attribute("file_id", &file_id.to_string());
    let work = crate::error::with_request_id(
        crate::error::request_id(),
        commit(deps.clone(), Stored { file_id, key, size, sha256, content }, owner, options, held),
    );
    let commit = match txpipe_common::trace::current() {
        Some(trace) => tokio::spawn(trace.scope_in(span, "upload", work)),
        None => tokio::spawn(work.in_current_span()),
    };
    let accepted = commit.await.map_err(|e| GatewayError::Internal(format!("the upload task failed: {e}")))??;
    Ok((accepted, slot))
}

/// Streams the body into `objects` under `key` within the upload limits (a slot, the size
/// limit, the idle timeout), taking its SHA-256 on the way; on any failure nothing is left.
async fn receive(
    deps: &Deps,
    objects: &Arc<dyn ObjectStore>,
    slots: &UploadSlots,
    key: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Received, GatewayError> {
    let kind = body_kind(headers)?;
    let limit = deps.settings.max_upload_bytes;
    // what may come over the wire: the file, plus a form's own bytes
    let wire_limit = match kind {
        BodyKind::Raw => limit,
        BodyKind::Form(_) => limit.saturating_add(MULTIPART_OVERHEAD),
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > wire_limit) {
        return Err(GatewayError::TooLarge(limit));
    }
    if declared == Some(0) {
        return Err(GatewayError::EmptyBody);
    }
    let slot = slots.take()?;

    let idle = Duration::from_millis(deps.settings.body_idle_timeout_ms);
    let cut = Arc::new(std::sync::Mutex::new(Cut::None));
    let stream = limited(body.into_data_stream().map_err(std::io::Error::other), wire_limit, Some(idle), cut.clone());
    // the file's SHA-256, taken as its bytes go by (a form's: its file part's)
    let digest = Digest::new(deps.settings.inline_max_bytes);
    let stored = match kind {
        BodyKind::Raw => objects.put(key, digest.of(stream)).await,
        BodyKind::Form(boundary) => {
            let part = |bytes: ByteStream| digest.of(limited(bytes, limit, None, cut.clone()));
            let cut_short = || *cut.lock().unwrap_or_else(|p| p.into_inner()) != Cut::None;
            match crate::multipart::store_file_part(objects, key, stream, boundary, part).await {
                Ok(size) => Ok(size),
                // the file part's stream broke on its own: the form is malformed (a body that
                // went over the limit or stalled is said so below)
                Err(PartError::Storage(e)) if e.kind() == StorageErrorKind::UploadFailed && !cut_short() => {
                    let why = txpipe_common::error::Chain(&e);
                    return Err(GatewayError::BadRequest(format!("the multipart/form-data body is malformed: {why}")));
                }
                Err(PartError::Storage(e)) => Err(e),
                Err(PartError::Malformed(_)) if cut_short() => {
                    Err(StorageError::new(StorageErrorKind::UploadFailed, "the form's body was cut off"))
                }
                Err(PartError::Malformed(why)) => {
                    return Err(GatewayError::BadRequest(format!("the multipart/form-data body is malformed: {why}")))
                }
                Err(PartError::NoFile) => {
                    return Err(GatewayError::BadRequest(format!(
                        "the form has no file part: send the CSV as a part named {FILE_FIELD} (curl -F {FILE_FIELD}=@transactions.csv)"
                    )))
                }
                Err(PartError::SeveralFiles) => {
                    return Err(GatewayError::BadRequest(
                        "the form has more than one file part: send one CSV per upload, in the part named file".into(),
                    ))
                }
            }
        }
    };
    let cut = *cut.lock().unwrap_or_else(|p| p.into_inner());
    let size = match stored {
        Ok(size) => size,
        // the stream failed because it went over the limit or stalled: say that, not "bad request"
        Err(e) if e.kind() == StorageErrorKind::UploadFailed && cut == Cut::TooLarge => {
            return Err(GatewayError::TooLarge(limit))
        }
        Err(e) if e.kind() == StorageErrorKind::UploadFailed && cut == Cut::Idle => {
            tracing::warn!(%key, ?idle, "upload body stalled; dropped");
            return Err(GatewayError::BodyTimeout(idle));
        }
        Err(e) => return Err(GatewayError::from_storage("storing the upload", e)),
    };
    if size == 0 {
        let _ = objects.delete(key).await;
        return Err(GatewayError::EmptyBody);
    }
    let (sha256, content) = digest.finish();
    Ok(Received { size, sha256, content, slot })
}

/// The least a body must send in each `TXPIPE_BODY_IDLE_TIMEOUT_MS` (34 bytes a second at the
/// default 30 s): a byte now and then would otherwise hold an upload slot for ever.
const MIN_BYTES_PER_IDLE_PERIOD: u64 = 1024;

/// `chunks` as a stream that fails once it passes `limit` bytes, or goes `idle` (if given)
/// without a chunk or sends less than [`MIN_BYTES_PER_IDLE_PERIOD`] in an `idle` period,
/// noting which in `cut`.
fn limited(
    chunks: impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin + 'static,
    limit: u64,
    idle: Option<Duration>,
    cut: Arc<std::sync::Mutex<Cut>>,
) -> ByteStream {
    // bytes seen, and the current idle period's start and bytes
    let state = (chunks, 0u64, (tokio::time::Instant::now(), 0u64), cut, false);
    futures::stream::unfold(state, move |(mut chunks, mut seen, mut period, cut, done)| async move {
        if done {
            return None;
        }
        let fail = |why: Cut, msg: String| {
            *cut.lock().unwrap_or_else(|p| p.into_inner()) = why;
            Err(std::io::Error::other(msg))
        };
        let next = match idle {
            Some(idle) => tokio::time::timeout(idle, chunks.next()).await.map_err(|_| idle),
            None => Ok(chunks.next().await),
        };
        let item = match next {
            Err(idle) => fail(Cut::Idle, format!("no body bytes for {idle:?}")),
            Ok(None) => return None,
            Ok(Some(Err(e))) => Err(e),
            Ok(Some(Ok(chunk))) => {
                seen += chunk.len() as u64;
                period.1 += chunk.len() as u64;
                let slow = idle.filter(|idle| period.0.elapsed() >= *idle);
                if seen > limit {
                    fail(Cut::TooLarge, format!("upload larger than {limit} bytes"))
                } else if let Some(idle) = slow.filter(|_| period.1 < MIN_BYTES_PER_IDLE_PERIOD) {
                    fail(Cut::Idle, format!("only {} body bytes in {idle:?}", period.1))
                } else {
                    if slow.is_some() {
                        period = (tokio::time::Instant::now(), 0);
                    }
                    Ok(chunk)
                }
            }
        };
        let done = item.is_err();
        Some((item, (chunks, seen, period, cut, done)))
    })
    .boxed()
}

/// An upload's body, stored.
struct Stored {
    file_id: FileId,
    key: String,
    size: u64,
    /// Lower-case hex SHA-256 of the file's bytes.
    sha256: String,
    /// The bytes, for the messages, if the file is small.
    content: Option<Content>,
}

/// A SHA-256 fed by the chunks of a stream as they pass, and a copy of the bytes while they
/// fit in `keep` (a small file travels in its messages: [`txpipe_common::messages::Content`]).
#[derive(Clone)]
struct Digest(Arc<std::sync::Mutex<Tapped>>);

struct Tapped {
    hasher: sha2::Sha256,
    /// The bytes so far; dropped (None) once they pass `keep`.
    copy: Option<Vec<u8>>,
    keep: usize,
}

impl Digest {
    fn new(keep: usize) -> Self {
        let copy = (keep > 0).then(Vec::new);
        Self(Arc::new(std::sync::Mutex::new(Tapped { hasher: sha2::Sha256::default(), copy, keep })))
    }

    fn of(&self, stream: ByteStream) -> ByteStream {
        let tapped = self.0.clone();
        stream
            .inspect_ok(move |chunk| {
                let mut t = tapped.lock().unwrap_or_else(|p| p.into_inner());
                sha2::Digest::update(&mut t.hasher, chunk);
                let keep = t.keep;
                if let Some(copy) = &mut t.copy {
                    if copy.len() + chunk.len() <= keep {
                        copy.extend_from_slice(chunk);
                    } else {
                        t.copy = None;
                    }
                }
            })
            .boxed()
    }

    /// The digest in lower-case hex, and the bytes if they fit.
    fn finish(&self) -> (String, Option<Content>) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let hex = hex::encode(sha2::Digest::finalize(t.hasher.clone()));
        (hex, t.copy.take().and_then(Content::of))
    }
}

/// Records the stored upload, announces it and marks it announced; undoes it all and answers
/// 503 if it cannot be announced (or was withdrawn meanwhile by the sweeper).
async fn commit(
    deps: Deps,
    stored: Stored,
    owner: Option<String>,
    options: UploadOptions,
    held: Option<crate::idempotency::Held>,
) -> Result<UploadAccepted, GatewayError> {
    let Stored { file_id, key, size, sha256, content } = stored;
    let objects = &deps.storage.objects;
    // recorded as not yet announced: no worker starts on it until the broker has confirmed
    let mut record = StatusRecord::uploaded(file_id, key.clone(), size, chrono::Utc::now());
    record.sha256 = Some(sha256.clone());
    record.announced = false;
    record.uploaded_by = owner;
    record.options = options;
    if let Err(e) = deps.storage.statuses.create(&record).await {
        let _ = objects.delete(&key).await;
        return Err(GatewayError::from_storage("recording the upload", e));
    }
    // the record as stored, for the validator's claim (see StoredRecord): no read before it
    let stored = || deps.storage.statuses.stored(record.file_id);
    let event = StageMessage::from_record(RoutingKey::FileUploaded, &record).with_content(content).with_stored(stored);
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
        // undo, so nothing works on an upload the client is told was refused: the record is
        // withdrawn only while unannounced, so either this withdrawal wins (then the object
        // goes, and a validator that got the message anyway finds neither) or a validator
        // already claimed the file, which marks it announced: it is being processed, and the
        // answer is the usual 202
        match deps.storage.statuses.withdraw(file_id).await {
            Ok(true) => {
                let _ = objects.delete(&key).await;
                return Err(e);
            }
            Ok(false) => match deps.storage.statuses.get(file_id).await {
                Ok(Some(r)) if r.announced => {
                    tracing::info!(%file_id, "the broker's confirm failed, but a validator has the file already");
                }
                Ok(None) => {
                    let _ = objects.delete(&key).await;
                    return Err(e);
                }
                _ => return Err(e),
            },
            // storage cannot be reached: the record stays unannounced, and the sweep withdraws
            // it later unless a validator claims it first
            Err(_) => return Err(e),
        }
    }
    UploadStored { file_id, bytes: size }.emit();
    let upload = IdempotentUpload { file_id, size_bytes: size, sha256, options };
    // in this task, which the client cannot cancel: an upload committed is always its key's
    // answer (an earlier failure dropped the claim, releasing the key for a retry)
    if let Some(held) = held {
        held.complete(&upload).await;
    }
    Ok(accepted_of(&upload))
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
