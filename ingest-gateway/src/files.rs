//! The read endpoints: `GET /files/{file_id}` (the status record) and
//! `GET /files/{file_id}/transactions` (the rows the file stored, a page at a time).
//! A file is shown only to the key that uploaded it and to admin keys; any other key gets the
//! same 404 as for a file that does not exist, so it cannot learn that it does.

use crate::GatewayError;
use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use txpipe_common::auth::Caller;
use txpipe_common::status::StatusRecord;
use txpipe_common::{Deps, FileId};

/// Page size of `GET /files/{id}/transactions` when `limit` is not given, and its maximum.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

fn parse_id(raw: &str) -> Result<FileId, GatewayError> {
    raw.parse().map_err(|_| GatewayError::NotFound(format!("no file with id {raw:?}")))
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
    Path(raw): Path<String>,
) -> Result<Json<StatusRecord>, GatewayError> {
    Ok(Json(find(&deps, &caller, parse_id(&raw)?).await?))
}

#[derive(Deserialize)]
pub(crate) struct PageQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

pub(crate) async fn file_transactions(
    State(deps): State<Deps>,
    Extension(caller): Extension<Caller>,
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
    find(&deps, &caller, file_id).await?;
    let page = deps
        .storage
        .transactions
        .list_by_file(file_id, limit, q.cursor.as_deref())
        .await
        .map_err(|e| GatewayError::from_storage("reading transactions", e))?;
    Ok(Json(page).into_response())
}
