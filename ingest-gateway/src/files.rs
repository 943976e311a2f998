//! The read endpoints: `GET /files` (the caller's files, newest first, a page at a time),
//! `GET /files/{file_id}` (the status record), `GET /files/{file_id}/transactions` (the rows
//! the file stored, with the values it wrote, a page at a time) and
//! `GET /transactions/{transaction_id}` (a transaction's current version, the file that stored
//! it, and its earlier versions).
//! A file is shown only to the key that uploaded it and to admin keys; any other key gets the
//! same 404 as for a file that does not exist, so it cannot learn that it does. The same goes
//! for a transaction (by the file of its current version) and each of its earlier versions.
//!
//! Path and query parameters become types at the edge ([`FileIdParam`], [`Page`],
//! [`FileList`]): a bad one is a [`GatewayError`] before any handler runs, in the one JSON
//! error shape. Their `IntoParams` structs ([`PageQuery`], [`FileListQuery`]) also describe
//! them in the OpenAPI document: a new query parameter is one field there.

use crate::GatewayError;
use axum::extract::{Extension, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use txpipe_common::auth::Caller;
use txpipe_common::status::{FileStatus, StatusRecord};
use txpipe_common::storage::{FilePage, FileQuery, Transaction, TransactionPage};
use txpipe_common::{Deps, FileId};

/// Page size of `GET /files/{id}/transactions` when `limit` is not given, and its maximum.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The `{file_id}` of a path; a malformed id is a file that does not exist (404).
pub(crate) struct FileIdParam(FileId);

impl<S: Send + Sync> FromRequestParts<S> for FileIdParam {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, GatewayError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| GatewayError::BadRequest(e.body_text()))?;
        raw.parse().map(FileIdParam).map_err(|_| GatewayError::NotFound(format!("no file with id {raw:?}")))
    }
}

/// `?limit=&cursor=` of a paged listing. Taken as text and checked by [`Page`], so a bad value
/// gets a message of ours; the document gives the types.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    /// Most items in the page (a page also stops at `TXPIPE_MAX_PAGE_BYTES` of JSON).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000, default = 100)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(value_type = Option<String>)]
    cursor: Option<String>,
}

/// `?status=&since=&limit=&cursor=` of `GET /files`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct FileListQuery {
    /// Only files now in this status.
    #[param(value_type = Option<FileStatus>)]
    status: Option<String>,
    /// Only files uploaded at or after this time (RFC 3339, e.g. `2024-01-15T10:30:00Z`).
    #[param(value_type = Option<String>, format = DateTime)]
    since: Option<String>,
    /// Most files in the page (a page also stops at `TXPIPE_MAX_PAGE_BYTES` of JSON).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000, default = 100)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(value_type = Option<String>)]
    cursor: Option<String>,
}

/// `?limit=&cursor=`: a limit from 1 to [`MAX_PAGE`] and an opaque cursor (checked by the
/// store). A repeated or malformed parameter is a 400.
pub(crate) struct Page {
    limit: usize,
    cursor: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Page {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, GatewayError> {
        let Query(q) = Query::<PageQuery>::from_request_parts(parts, state)
            .await
            .map_err(|e| GatewayError::BadRequest(e.body_text()))?;
        Ok(Page { limit: page_limit(q.limit.as_deref())?, cursor: q.cursor })
    }
}

fn page_limit(given: Option<&str>) -> Result<usize, GatewayError> {
    match given {
        None => Ok(DEFAULT_PAGE),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(GatewayError::BadRequest(format!("limit must be a whole number from 1 to {MAX_PAGE}"))),
        },
    }
}

/// `GET /files`' parameters, checked: what to list, but not yet whose (the handler adds the
/// caller).
pub(crate) struct FileList(FileQuery);

impl<S: Send + Sync> FromRequestParts<S> for FileList {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, GatewayError> {
        let Query(q) = Query::<FileListQuery>::from_request_parts(parts, state)
            .await
            .map_err(|e| GatewayError::BadRequest(e.body_text()))?;
        let status = match q.status.as_deref() {
            None => None,
            Some(s) => Some(FileStatus::parse(s).ok_or_else(|| {
                let all: Vec<&str> = FileStatus::ALL.iter().map(|s| s.as_str()).collect();
                GatewayError::BadRequest(format!("status must be one of {}", all.join(", ")))
            })?),
        };
        let since = match q.since.as_deref() {
            None => None,
            Some(t) => Some(
                chrono::DateTime::parse_from_rfc3339(t)
                    .map_err(|_| {
                        GatewayError::BadRequest("since must be an RFC 3339 time, e.g. 2024-01-15T10:30:00Z".into())
                    })?
                    .with_timezone(&chrono::Utc),
            ),
        };
        let limit = page_limit(q.limit.as_deref())?;
        Ok(FileList(FileQuery { owner: None, status, since, limit, cursor: q.cursor }))
    }
}

async fn find(deps: &Deps, caller: &Caller, file_id: FileId) -> Result<StatusRecord, GatewayError> {
    deps.storage
        .statuses
        .get(file_id)
        .await
        .map_err(|e| GatewayError::from_storage("reading the status", e))?
        .filter(|r| caller.may_read(r.uploaded_by.as_deref()))
        .ok_or_else(|| GatewayError::NotFound(format!("no file with id {file_id}")))
}

/// The caller's files, newest first (admin keys: every file). A page stops at `limit` files or
/// at `TXPIPE_MAX_PAGE_BYTES` of JSON, whichever comes first; `next_cursor` then points at the
/// rest.
#[utoipa::path(
    get,
    path = "/files",
    tag = "files",
    params(FileListQuery),
    responses(
        (status = 200, description = "A page of the caller's files, newest first", body = FilePage),
    )
)]
pub(crate) async fn list_files(
    State(deps): State<Deps>,
    Extension(caller): Extension<Caller>,
    FileList(mut query): FileList,
) -> Result<Json<FilePage>, GatewayError> {
    query.owner = match caller.key() {
        Some(key) if !key.admin => Some(key.name.clone()),
        _ => None, // an admin key, or auth off: every file
    };
    let mut page =
        deps.storage.statuses.list(&query).await.map_err(|e| GatewayError::from_storage("listing files", e))?;
    page.truncate_to_bytes(deps.settings.max_page_bytes);
    Ok(Json(page))
}

/// A file's status record: where it is in the pipeline, its history, counts and row errors.
#[utoipa::path(
    get,
    path = "/files/{file_id}",
    tag = "files",
    params(("file_id" = FileId, Path, description = "The id the upload's 202 answer gave")),
    responses(
        (status = 200, description = "The file's status record", body = StatusRecord),
        (status = 404, description = "No such file, or not the caller's (`not_found`)", body = crate::openapi::ErrorBody),
    )
)]
pub(crate) async fn file_status(
    State(deps): State<Deps>,
    Extension(caller): Extension<Caller>,
    FileIdParam(file_id): FileIdParam,
) -> Result<Json<StatusRecord>, GatewayError> {
    Ok(Json(find(&deps, &caller, file_id).await?))
}

/// The rows a file stored, by `transaction_id`. A page stops at `limit` rows or at
/// `TXPIPE_MAX_PAGE_BYTES` of JSON, whichever comes first; `next_cursor` then points at the
/// rest.
#[utoipa::path(
    get,
    path = "/files/{file_id}/transactions",
    tag = "files",
    params(("file_id" = FileId, Path, description = "The id the upload's 202 answer gave"), PageQuery),
    responses(
        (status = 200, description = "A page of the file's stored rows", body = TransactionPage),
        (status = 404, description = "No such file, or not the caller's (`not_found`)", body = crate::openapi::ErrorBody),
    )
)]
pub(crate) async fn file_transactions(
    State(deps): State<Deps>,
    Extension(caller): Extension<Caller>,
    FileIdParam(file_id): FileIdParam,
    page: Page,
) -> Result<Response, GatewayError> {
    find(&deps, &caller, file_id).await?;
    let mut out = deps
        .storage
        .transactions
        .list_by_file(file_id, page.limit, page.cursor.as_deref())
        .await
        .map_err(|e| GatewayError::from_storage("reading transactions", e))?;
    out.truncate_to_bytes(deps.settings.max_page_bytes);
    Ok(Json(out).into_response())
}

/// Earlier versions shown with a transaction, newest first; older ones are left out (the
/// response says so).
const MAX_EARLIER_VERSIONS: usize = 100;
/// Longer path segments cannot be a transaction id of the CSV contract.
const MAX_ID_BYTES: usize = 1024;

/// `GET /transactions/{transaction_id}`: the current version, and the ones it replaced.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct TransactionView {
    #[serde(flatten)]
    current: Transaction,
    /// The versions it replaced, newest first, each with the file that wrote it.
    earlier_versions: Vec<Transaction>,
    /// True when there are more earlier versions than shown (or some are not the caller's).
    earlier_versions_truncated: bool,
}

/// A transaction: its current version (its values, the file that stored it, its `version` and
/// the version it `replaces`) and its earlier versions, newest first, each with the file that
/// wrote it.
#[utoipa::path(
    get,
    path = "/transactions/{transaction_id}",
    tag = "transactions",
    params(("transaction_id" = String, Path, description = "The transaction's id, percent-encoded")),
    responses(
        (status = 200, description = "The transaction and its earlier versions", body = TransactionView),
        (status = 404, description = "No such transaction, or one stored by another tenant's file (`not_found`)", body = crate::openapi::ErrorBody),
    )
)]
pub(crate) async fn transaction(
    State(deps): State<Deps>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<TransactionView>, GatewayError> {
    let missing = || GatewayError::NotFound(format!("no transaction with id {id:?}"));
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(missing());
    }
    let store = &deps.storage.transactions;
    let read = |e| GatewayError::from_storage("reading the transaction", e);
    let current =
        store.current(std::slice::from_ref(&id)).await.map_err(read)?.into_iter().next().ok_or_else(missing)?;
    if !readable(&deps, &caller, current.file_id).await? {
        return Err(missing());
    }
    let mut earlier = Vec::new();
    let mut truncated = false;
    let mut next = current.replaces;
    while let Some(r) = next {
        if earlier.len() == MAX_EARLIER_VERSIONS || !readable(&deps, &caller, r.file_id).await? {
            truncated = true;
            break;
        }
        let Some(v) = store.version(r.file_id, &id).await.map_err(read)? else { break };
        next = v.replaces;
        earlier.push(v);
    }
    Ok(Json(TransactionView { current, earlier_versions: earlier, earlier_versions_truncated: truncated }))
}

/// Whether the caller may see what `file_id` wrote.
async fn readable(deps: &Deps, caller: &Caller, file_id: FileId) -> Result<bool, GatewayError> {
    if caller.key().is_none_or(|k| k.admin) {
        return Ok(true); // an admin key, or keys are off
    }
    let record =
        deps.storage.statuses.get(file_id).await.map_err(|e| GatewayError::from_storage("reading the status", e))?;
    Ok(record.is_some_and(|r| caller.may_read(r.uploaded_by.as_deref())))
}
