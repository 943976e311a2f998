//! Listing files (`GET /files`): the query a status store answers, the page it returns, and
//! the listing key both adapters sort by.
//!
//! Files are listed newest first by `created_at`, ties broken by `file_id`. The listing key is
//! `{created_at as fixed-width UTC}#{file_id}`: fixed width so it sorts as text (RFC 3339 as
//! serde writes it does not: `…00.1Z` sorts after `…00.123Z`), the id so every key is unique
//! and a cursor names one place exactly. A cursor is that key hex-encoded, as the
//! transactions listing's cursors are.

use super::{decode_cursor, encode_cursor, StorageError};
use crate::file_id::FileId;
use crate::status::{FileStatus, StatusRecord};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What to list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileQuery {
    /// Only the files this API key uploaded; `None` lists every file (admin keys, auth off).
    pub owner: Option<String>,
    /// Only files now in this status.
    pub status: Option<FileStatus>,
    /// Only files recorded at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// At most this many files (at least 1).
    pub limit: usize,
    /// Where the previous page stopped (its `next_cursor`).
    pub cursor: Option<String>,
}

impl FileQuery {
    /// The listing key after which this page starts, from the cursor; a cursor that is not one
    /// of ours is [`super::StorageErrorKind::InvalidCursor`].
    pub fn after(&self) -> Result<Option<String>, StorageError> {
        let Some(c) = self.cursor.as_deref() else { return Ok(None) };
        let key = decode_cursor(c)?;
        parse_listing_key(&key).ok_or_else(StorageError::invalid_cursor)?;
        Ok(Some(key))
    }

    /// The smallest listing key a file recorded at `since` can have.
    pub fn since_key(&self) -> Option<String> {
        self.since.map(|t| format!("{}#", sortable_time(t)))
    }

    /// Whether `record` belongs in this listing (the adapters' indexes select owner and time;
    /// this also checks status, and leaves out uploads not yet announced: not accepted yet).
    pub fn admits(&self, record: &StatusRecord) -> bool {
        record.announced
            && self.status.is_none_or(|s| s == record.status)
            && self.owner.as_deref().is_none_or(|o| record.uploaded_by.as_deref() == Some(o))
            && self.since.is_none_or(|t| record.created_at >= t)
    }
}

/// One page of files, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FilePage {
    /// The files' status records, as `GET /files/{file_id}` shows them.
    pub items: Vec<StatusRecord>,
    /// Pass back as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl FilePage {
    /// Keeps the longest prefix of the page whose items take at most `budget` bytes as JSON
    /// (at least one, so paging moves on); if items were dropped, the cursor points after the
    /// last one kept.
    pub fn truncate_to_bytes(&mut self, budget: usize) {
        let mut used = 0usize;
        let keep = self
            .items
            .iter()
            .position(|r| {
                used += serde_json::to_vec(r).map(|v| v.len() + 1).unwrap_or(usize::MAX / 2);
                used > budget
            })
            .map(|n| n.max(1))
            .unwrap_or(self.items.len());
        if keep < self.items.len() {
            self.items.truncate(keep);
            self.next_cursor = self.items.last().map(cursor_after);
        }
    }
}

/// A time as fixed-width UTC text (microseconds), so that text order is time order.
pub fn sortable_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// The key a file is listed by: `{created_at}#{file_id}`.
pub fn listing_key(record: &StatusRecord) -> String {
    format!("{}#{}", sortable_time(record.created_at), record.file_id)
}

/// The cursor that continues a listing after `record`.
pub fn cursor_after(record: &StatusRecord) -> String {
    encode_cursor(&listing_key(record))
}

/// The parts of a listing key, or None if it is not one.
fn parse_listing_key(key: &str) -> Option<(DateTime<Utc>, FileId)> {
    let (time, id) = key.split_once('#')?;
    let time = DateTime::parse_from_rfc3339(time).ok()?.with_timezone(&Utc);
    Some((time, id.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageErrorKind;

    fn query(cursor: Option<&str>) -> FileQuery {
        FileQuery { owner: None, status: None, since: None, limit: 10, cursor: cursor.map(str::to_owned) }
    }

    #[test]
    fn listing_keys_sort_as_their_times() {
        let t = DateTime::parse_from_rfc3339("2024-01-15T10:30:00.1Z").unwrap().with_timezone(&Utc);
        let later = t + chrono::Duration::microseconds(23_456);
        assert!(sortable_time(t) < sortable_time(later), "{} {}", sortable_time(t), sortable_time(later));
        assert_eq!(sortable_time(t).len(), sortable_time(later).len());
    }

    #[test]
    fn cursors_round_trip_and_others_are_refused() {
        let r = StatusRecord::uploaded(FileId::new(), "k".into(), 1, Utc::now());
        assert_eq!(query(Some(&cursor_after(&r))).after().unwrap(), Some(listing_key(&r)));
        assert_eq!(query(None).after().unwrap(), None);
        // hex of something that is not a listing key, and not hex at all
        for bad in [encode_cursor("t1"), encode_cursor("2024-01-15T10:30:00Z#nope"), "zz".into()] {
            assert_eq!(query(Some(&bad)).after().unwrap_err().kind(), StorageErrorKind::InvalidCursor, "{bad}");
        }
    }
}
