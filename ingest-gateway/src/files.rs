//! The read endpoints: `GET /files/{file_id}` (the status record) and
//! `GET /files/{file_id}/transactions` (the rows the file stored, a page at a time).
//! A file is shown only to the key that uploaded it and to admin keys; any other key gets the
//! same 404 as for a file that does not exist, so it cannot learn that it does.
//!
//! Path and query parameters become types at the edge ([`FileIdParam`], [`Page`]): a bad
//! one is a [`GatewayError`] before any handler runs, in the one JSON error shape.

use crate::GatewayError;
use axum::extract::{Extension, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use txpipe_common::auth::Caller;
use txpipe_common::status::StatusRecord;
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

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<String>,
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
        let limit = match q.limit.as_deref() {
            None => DEFAULT_PAGE,
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
                _ => {
                    return Err(GatewayError::BadRequest(format!("limit must be a whole number from 1 to {MAX_PAGE}")))
                }
            },
        };
        Ok(Page { limit, cursor: q.cursor })
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

pub(crate) async fn file_status(
    State(deps): State<Deps>,
    Extension(caller): Extension<Caller>,
    FileIdParam(file_id): FileIdParam,
) -> Result<Json<StatusRecord>, GatewayError> {
    Ok(Json(find(&deps, &caller, file_id).await?))
}

/// A page stops at `limit` rows or at `TXPIPE_MAX_PAGE_BYTES` of JSON, whichever comes first;
/// `next_cursor` then points at the rest.
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
