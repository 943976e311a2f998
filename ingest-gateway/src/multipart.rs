//! `multipart/form-data` uploads (`curl -F file=@transactions.csv`): the one file part is
//! streamed into the object store exactly as a raw body is, through the same size limit; the
//! other parts are read past and ignored.
//!
//! A file part is the part named `file`, or any part with a `filename`. There must be exactly
//! one: none, or a second one, is a 400 (the object stored for the first is removed). The
//! part's own `Content-Type` is not looked at: browsers and curl label CSV files in many ways.
//! The body is parsed as it streams by `multer` (the parser axum's `Multipart` uses), so a
//! part is never held in memory whole.

use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;
use txpipe_common::storage::{ByteStream, ObjectStore, StorageError};

/// The form field name of the file part.
pub(crate) const FILE_FIELD: &str = "file";

/// Why a multipart upload was not stored.
#[derive(Debug)]
pub(crate) enum PartError {
    /// Storing the file part failed (its stream's own failure included).
    Storage(StorageError),
    /// The body is not well-formed multipart (or stopped arriving mid-way).
    Malformed(String),
    /// No part named `file` and no part with a filename.
    NoFile,
    /// More than one file part.
    SeveralFiles,
}

/// Whether a part is the upload's file.
fn is_file(field: &multer::Field<'_>) -> bool {
    field.name() == Some(FILE_FIELD) || field.file_name().is_some()
}

/// Streams the one file part of `body` (already wrapped in the wire limit and idle timeout)
/// into `objects` under `key`, each part's bytes passed through `part` (the file size limit);
/// returns its size. On any error nothing is left under `key`.
pub(crate) async fn store_file_part(
    objects: &Arc<dyn ObjectStore>,
    key: &str,
    body: ByteStream,
    boundary: String,
    part: impl Fn(ByteStream) -> ByteStream,
) -> Result<u64, PartError> {
    let mut form = multer::Multipart::new(body, boundary);
    let mut stored: Option<u64> = None;
    let outcome = loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break Ok(()),
            Err(e) => break Err(PartError::Malformed(e.to_string())),
        };
        if !is_file(&field) {
            // ignored; next_field reads past whatever is left of it
            continue;
        }
        if stored.is_some() {
            break Err(PartError::SeveralFiles);
        }
        let bytes = part(field.map_err(std::io::Error::other).boxed());
        match objects.put(key, bytes).await {
            Ok(size) => stored = Some(size),
            Err(e) => return Err(PartError::Storage(e)), // a failed put leaves nothing
        }
    };
    match (outcome, stored) {
        (Ok(()), Some(size)) => Ok(size),
        (Ok(()), None) => Err(PartError::NoFile),
        (Err(e), stored) => {
            if stored.is_some() {
                let _ = objects.delete(key).await;
            }
            Err(e)
        }
    }
}
