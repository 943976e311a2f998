//! The processing-status machine: which status may follow which, and the record kept per file.
//!
//! A status only moves forward, so a redelivered message can never move a file back; every
//! change is kept with its time so the history can be shown.

use crate::csv_schema::RowError;
use crate::file_id::FileId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a file is in the pipeline (the seed's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    Uploaded,
    Validating,
    Validated,
    ValidationFailed,
    Processing,
    Processed,
    ProcessingFailed,
    Notifying,
    Completed,
    NotificationFailed,
}

impl FileStatus {
    pub const ALL: [FileStatus; 10] = [
        FileStatus::Uploaded,
        FileStatus::Validating,
        FileStatus::Validated,
        FileStatus::ValidationFailed,
        FileStatus::Processing,
        FileStatus::Processed,
        FileStatus::ProcessingFailed,
        FileStatus::Notifying,
        FileStatus::Completed,
        FileStatus::NotificationFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FileStatus::Uploaded => "uploaded",
            FileStatus::Validating => "validating",
            FileStatus::Validated => "validated",
            FileStatus::ValidationFailed => "validation_failed",
            FileStatus::Processing => "processing",
            FileStatus::Processed => "processed",
            FileStatus::ProcessingFailed => "processing_failed",
            FileStatus::Notifying => "notifying",
            FileStatus::Completed => "completed",
            FileStatus::NotificationFailed => "notification_failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The statuses directly after this one.
    fn next(self) -> &'static [FileStatus] {
        use FileStatus::*;
        match self {
            Uploaded => &[Validating, ValidationFailed],
            Validating => &[Validated, ValidationFailed],
            Validated => &[Processing, ProcessingFailed],
            Processing => &[Processed, ProcessingFailed],
            Processed => &[Notifying, NotificationFailed],
            Notifying => &[Completed, NotificationFailed],
            ValidationFailed | ProcessingFailed | Completed | NotificationFailed => &[],
        }
    }

    /// The status a failed file returns to when its stage is tried again (a DLQ replay,
    /// `txpipe retry`, or the last delivery of a message that reached its delivery limit).
    pub fn retry_of(self) -> Option<FileStatus> {
        match self {
            FileStatus::ValidationFailed => Some(FileStatus::Validating),
            FileStatus::ProcessingFailed => Some(FileStatus::Processing),
            FileStatus::NotificationFailed => Some(FileStatus::Notifying),
            _ => None,
        }
    }

    /// True when `to` lies ahead of this status (a step may be skipped, never undone), or `to`
    /// is this failed status's retry.
    pub fn can_move_to(self, to: FileStatus) -> bool {
        self.retry_of() == Some(to) || self.ahead(to)
    }

    fn ahead(self, to: FileStatus) -> bool {
        self.next().iter().any(|&n| n == to || n.ahead(to))
    }

    /// True for the statuses a file ends in.
    pub fn is_final(self) -> bool {
        self.next().is_empty()
    }

    /// True for the statuses a stage holds a file in while it works on it.
    pub fn is_working(self) -> bool {
        matches!(self, FileStatus::Validating | FileStatus::Processing | FileStatus::Notifying)
    }

    /// True when the file has reached `other` or gone past it.
    pub fn is_at_or_past(self, other: FileStatus) -> bool {
        self == other || other.ahead(self)
    }
}

impl fmt::Display for FileStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which rows of a file are stored (chosen per upload with `?mode=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every row or none: one invalid row rejects the file (the seed's behaviour).
    #[default]
    All,
    /// The valid rows are stored; the invalid ones are reported and counted (`rejected_rows`).
    Partial,
}

/// What happens to a row whose transaction another file already stored with other values
/// (`TXPIPE_ON_CONFLICT`, or `?on_conflict=` where the deployment allows it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// The row is refused (the file, unless it is uploaded in partial mode).
    #[default]
    Reject,
    /// The row becomes the transaction's new version; earlier ones stay with their files.
    Update,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::All => "all",
            Mode::Partial => "partial",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Mode::All, Mode::Partial].into_iter().find(|m| m.as_str() == s)
    }
}

impl OnConflict {
    pub fn as_str(self) -> &'static str {
        match self {
            OnConflict::Reject => "reject",
            OnConflict::Update => "update",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [OnConflict::Reject, OnConflict::Update].into_iter().find(|m| m.as_str() == s)
    }
}

/// How an upload asked for its rows to be taken; kept with the file for every stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadOptions {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub on_conflict: OnConflict,
}

/// One status change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    pub status: FileStatus,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A file's status record as the process that published a message about it last stored it:
/// its version and its JSON, exactly as stored. A stage message carries it (DynamoDB only) so
/// a worker in another process can make its conditional claim on it without reading the
/// record first. It is trusted for nothing: a change made on it is conditional on the stored
/// item being exactly this version and this JSON, so a stale or forged copy only costs a
/// refused write, which answers with the item as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub version: u64,
    pub json: String,
}

/// Everything kept about one file in the processing-status table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusRecord {
    pub file_id: FileId,
    pub status: FileStatus,
    pub object_key: String,
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the stored file, taken by the gateway while it streamed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub history: Vec<HistoryEntry>,
    #[serde(default)]
    pub row_count: Option<u64>,
    #[serde(default)]
    pub error_count: Option<u64>,
    /// Row errors, capped; `error_count` is the total.
    #[serde(default)]
    pub errors: Vec<RowError>,
    /// Rows this file stored (new transactions, or new versions with `on_conflict=update`).
    #[serde(default)]
    pub records_processed: Option<u64>,
    /// Rows whose transaction another file had already stored with the same values: stored
    /// once, by that file, and not counted in `records_processed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub already_stored: Option<u64>,
    /// In partial mode, the rows refused (invalid or conflicting) while the rest were stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_rows: Option<u64>,
    /// How the upload asked for its rows to be taken.
    #[serde(default)]
    pub options: UploadOptions,
    /// Why the file failed, for the `*_failed` statuses.
    #[serde(default)]
    pub reason: Option<String>,
    /// False from the gateway's record until the broker has confirmed `file.uploaded`: the
    /// validator does not start on an upload the gateway may still withdraw.
    #[serde(default = "announced_by_default")]
    pub announced: bool,
    /// The name of the API key that uploaded the file: its owner (only it, and admin keys, may
    /// read the file). None for files uploaded with `TXPIPE_AUTH=none` or before keys existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_by: Option<String>,
    /// History entries dropped to keep the record small (see [`MAX_HISTORY`]): those after the
    /// first and before the last kept ones.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub history_omitted: u64,
    /// The attempt holding (or last holding) the file's working status, while it is in one:
    /// see `crate::attempt`. Cleared by every status change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The most row errors a record keeps (`TXPIPE_MAX_REPORTED_ERRORS` may not ask for more); the
/// count of all of them is always kept.
pub const MAX_RECORDED_ERRORS: usize = 500;
/// The most history entries a record keeps: the first and the latest (a file retried again and
/// again would otherwise grow its record for ever).
pub const MAX_HISTORY: usize = 50;
/// The most bytes (as JSON) of a row error's message, or of its column.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 256;
pub const MAX_ERROR_COLUMN_BYTES: usize = 64;
/// The most bytes (as JSON) of a reason, on the record or in its history.
pub const MAX_REASON_BYTES: usize = 512;
/// The most bytes a whole record takes as JSON. The bounds above make a record at most about
/// 220 KB (500 errors of at most ~370 bytes, 50 history entries of at most ~600 bytes, the rest
/// under 2 KB); this budget is the guarantee whatever a future field holds: a DynamoDB item
/// takes 400 KB, and the record is one attribute of it.
pub const MAX_STATUS_RECORD_BYTES: usize = 256 * 1024;

/// Bytes `c` takes inside a JSON string (serde_json escapes quotes, backslashes and control
/// characters, nothing else).
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// Cuts `s` so it takes at most `max` bytes inside a JSON string, marking the cut with `…`.
fn clip(s: &mut String, max: usize) {
    if s.chars().map(json_len).sum::<usize>() <= max {
        return;
    }
    let room = max.saturating_sub('…'.len_utf8());
    let mut used = 0;
    let end = s
        .char_indices()
        .find(|&(_, c)| {
            used += json_len(c);
            used > room
        })
        .map_or(s.len(), |(i, _)| i);
    s.truncate(end);
    s.push('…');
}

/// Who works on a file in its working status, and how the attempts so far went (see
/// `crate::attempt`, which owns the rules).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attempt {
    /// Unique per delivery handled (a redelivery or a duplicate gets a new one).
    pub id: String,
    /// Attempts started on the file in this stage since it entered the stage.
    pub started: u32,
    /// Attempts that ended in a crash of their worker (what the delivery limit counts).
    pub crashes: u32,
    /// The holder's last heartbeat (or when the attempt was found dead or released).
    pub renewed_at: DateTime<Utc>,
    /// False once the attempt has ended without an outcome (released, or found dead).
    pub live: bool,
    /// The attempt ran alone in its worker, so a crash while it ran is its own.
    #[serde(default)]
    pub alone: bool,
    /// An earlier attempt died without an outcome: the next one runs alone in its worker.
    #[serde(default)]
    pub suspect: bool,
}

fn announced_by_default() -> bool {
    true
}

/// What a status change also records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusUpdate {
    pub row_count: Option<u64>,
    pub error_count: Option<u64>,
    pub errors: Option<Vec<RowError>>,
    pub records_processed: Option<u64>,
    pub already_stored: Option<u64>,
    pub rejected_rows: Option<u64>,
    pub reason: Option<String>,
    /// The stage's working status and when its work began, for a stage done in this one
    /// write without having stored that status (a file small enough to travel in its
    /// message: see `crate::worker`). The move is checked from there, and the history shows
    /// it before the new status, as if it had been stored.
    pub passed: Option<(FileStatus, DateTime<Utc>)>,
}

impl StatusRecord {
    /// A new file, just stored by the gateway.
    pub fn uploaded(file_id: FileId, object_key: String, size_bytes: u64, at: DateTime<Utc>) -> Self {
        Self {
            file_id,
            status: FileStatus::Uploaded,
            object_key,
            size_bytes,
            sha256: None,
            created_at: at,
            updated_at: at,
            history: vec![HistoryEntry { status: FileStatus::Uploaded, at, reason: None }],
            row_count: None,
            error_count: None,
            errors: Vec::new(),
            records_processed: None,
            already_stored: None,
            rejected_rows: None,
            options: UploadOptions::default(),
            reason: None,
            announced: true,
            uploaded_by: None,
            history_omitted: 0,
            attempt: None,
        }
    }

    /// True when the validator rejected the file for its contents: a verdict, not a failure,
    /// so it is never retried (a failure for a fault has no error count).
    pub fn is_rejected(&self) -> bool {
        self.status == FileStatus::ValidationFailed && self.error_count.is_some()
    }

    /// The last time anything showed the file is being worked on: its attempt's heartbeat, or
    /// its last status change (what the stuck-file sweep measures).
    pub fn last_sign_of_life(&self) -> DateTime<Utc> {
        self.attempt.as_ref().map_or(self.updated_at, |a| a.renewed_at.max(self.updated_at))
    }

    /// Moves to `to` if that is forward; returns false (and changes nothing) otherwise.
    ///
    /// One move goes back: `processing` to `validation_failed` with row errors, the verdict
    /// the transformer reaches when a row conflicts with a transaction another file stored
    /// after this one was validated (a failure never carries an error count, so a stage's
    /// failure cannot take this edge).
    pub fn advance(&mut self, to: FileStatus, update: StatusUpdate, at: DateTime<Utc>) -> bool {
        if update.passed.is_some_and(|(working, _)| !self.status.can_move_to(working)) {
            return false;
        }
        let from = update.passed.map_or(self.status, |(working, _)| working);
        let verdict_while_storing =
            from == FileStatus::Processing && to == FileStatus::ValidationFailed && update.error_count.is_some();
        if !(from.can_move_to(to) || verdict_while_storing) {
            return false;
        }
        if let Some((working, began)) = update.passed {
            self.history.push(HistoryEntry { status: working, at: began, reason: None });
            // a stage holding the file's message is proof it was announced (as its claim would say)
            self.announced = true;
        }
        self.status = to;
        self.updated_at = at;
        self.attempt = None;
        self.history.push(HistoryEntry { status: to, at, reason: update.reason.clone() });
        if let Some(v) = update.row_count {
            self.row_count = Some(v);
        }
        if let Some(v) = update.error_count {
            self.error_count = Some(v);
        }
        if let Some(v) = update.errors {
            self.errors = v;
        }
        if let Some(v) = update.records_processed {
            self.records_processed = Some(v);
        }
        if let Some(v) = update.already_stored {
            self.already_stored = Some(v);
        }
        if let Some(v) = update.rejected_rows {
            self.rejected_rows = Some(v);
        }
        // the reason is the new status's (a failure's); a file retried from a failure and
        // moving on has none, and the failure's stays in its history entry
        self.reason = update.reason;
        self.bound();
        true
    }

    /// Keeps the record within [`MAX_STATUS_RECORD_BYTES`] as JSON, whatever a caller put in it: long
    /// messages and reasons are cut, the error list capped, the history kept to its first and
    /// latest entries; if it is still too big, kept errors are dropped from the end (their
    /// count stays in `error_count`), then history entries.
    pub fn bound(&mut self) {
        self.errors.truncate(MAX_RECORDED_ERRORS);
        for e in &mut self.errors {
            clip(&mut e.message, MAX_ERROR_MESSAGE_BYTES);
            if let Some(c) = &mut e.column {
                clip(c, MAX_ERROR_COLUMN_BYTES);
            }
        }
        if let Some(r) = &mut self.reason {
            clip(r, MAX_REASON_BYTES);
        }
        for h in &mut self.history {
            if let Some(r) = &mut h.reason {
                clip(r, MAX_REASON_BYTES);
            }
        }
        self.trim_history(MAX_HISTORY);
        while self.json_len() > MAX_STATUS_RECORD_BYTES {
            if self.errors.pop().is_none() && !self.trim_history(self.history.len().saturating_sub(1)) {
                break;
            }
        }
    }

    /// Keeps the first entry and the latest `keep - 1`; true if any were dropped.
    fn trim_history(&mut self, keep: usize) -> bool {
        let keep = keep.max(2);
        if self.history.len() <= keep {
            return false;
        }
        let drop = self.history.len() - keep;
        self.history.drain(1..1 + drop);
        self.history_omitted += drop as u64;
        true
    }

    fn json_len(&self) -> usize {
        /// Counts the bytes written to it (the JSON is only measured, not kept).
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut n = Count(0);
        serde_json::to_writer(&mut n, self).map(|()| n.0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FileStatus::*;

    #[test]
    fn the_happy_path_moves_forward() {
        let path = [Uploaded, Validating, Validated, Processing, Processed, Notifying, Completed];
        for w in path.windows(2) {
            assert!(w[0].can_move_to(w[1]), "{} -> {}", w[0], w[1]);
            assert!(!w[1].can_move_to(w[0]), "{} -> {} must be refused", w[1], w[0]);
        }
        assert!(Uploaded.can_move_to(Completed), "skipping ahead is forward");
    }

    #[test]
    fn a_stage_done_in_one_write_shows_its_working_status_in_the_history() {
        let t0 = Utc::now();
        let (began, done) = (t0 + chrono::Duration::milliseconds(5), t0 + chrono::Duration::milliseconds(9));
        let mut r = StatusRecord::uploaded(FileId::new(), "k".into(), 1, t0);
        r.announced = false;
        let passed = Some((Validating, began));
        assert!(r.advance(Validated, StatusUpdate { passed, ..Default::default() }, done));
        let path: Vec<_> = r.history.iter().map(|h| (h.status, h.at)).collect();
        assert_eq!(path, [(Uploaded, t0), (Validating, began), (Validated, done)]);
        assert!(r.announced, "its message proves it was announced, as a claim would say");
        // checked from the working status: a conflict found while storing may still refuse it
        let mut v = r.clone();
        let conflict = StatusUpdate { passed: Some((Processing, done)), error_count: Some(1), ..Default::default() };
        assert!(v.advance(ValidationFailed, conflict, done));
        // and never a way around the rules: no passing through a status the file may not reach
        let mut late = r.clone();
        assert!(late.advance(Processed, StatusUpdate::default(), done));
        let before = late.clone();
        assert!(!late.advance(
            Completed,
            StatusUpdate { passed: Some((Validating, done)), ..Default::default() },
            done
        ));
        assert_eq!(late, before, "a refused move changes nothing");
    }

    #[test]
    fn nothing_moves_back_or_out_of_a_final_status() {
        for from in FileStatus::ALL {
            assert!(!from.can_move_to(from), "{from} -> itself is not a move");
            if from.is_final() {
                for to in FileStatus::ALL {
                    if from.retry_of() != Some(to) {
                        assert!(!from.can_move_to(to), "{from} is final, {to} refused");
                    }
                }
            }
        }
        assert!(!Processing.can_move_to(ValidationFailed));
        assert!(!Processed.can_move_to(Validating));
        assert!(Validating.can_move_to(ValidationFailed));
        assert!(!ValidationFailed.can_move_to(Completed));
        assert!(!Completed.can_move_to(Notifying), "a completed file is never retried");
    }

    #[test]
    fn a_failed_stage_can_be_tried_again_and_only_that_stage() {
        assert!(ValidationFailed.can_move_to(Validating));
        assert!(ProcessingFailed.can_move_to(Processing));
        assert!(NotificationFailed.can_move_to(Notifying));
        assert!(!ProcessingFailed.can_move_to(Validating));
        assert!(!ProcessingFailed.can_move_to(Processed), "a retry starts the stage over");
        assert!(!Validating.is_at_or_past(ValidationFailed));
    }

    #[test]
    fn names_round_trip() {
        for s in FileStatus::ALL {
            assert_eq!(FileStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn a_record_keeps_its_history_and_refuses_going_back() {
        let t0 = Utc::now();
        let mut r = StatusRecord::uploaded(FileId::new(), "uploads/x.csv".into(), 10, t0);
        assert!(r.advance(Validating, StatusUpdate::default(), t0));
        assert!(r.advance(Validated, StatusUpdate { row_count: Some(3), ..Default::default() }, t0));
        assert!(!r.advance(Validating, StatusUpdate::default(), t0), "redelivery must not move back");
        assert_eq!(r.status, Validated);
        assert_eq!(r.row_count, Some(3));
        let seen: Vec<_> = r.history.iter().map(|h| h.status).collect();
        assert_eq!(seen, [Uploaded, Validating, Validated]);
        assert!(Completed.is_at_or_past(Validated));
        let conflict = StatusUpdate { error_count: Some(1), ..Default::default() };
        assert!(!r.advance(ValidationFailed, conflict.clone(), t0), "only from processing");
        assert!(r.advance(Processing, StatusUpdate::default(), t0));
        let failure = StatusUpdate { reason: Some("validator: gave up".into()), ..Default::default() };
        assert!(!r.advance(ValidationFailed, failure, t0), "a stage's failure never goes back");
        assert!(r.advance(ValidationFailed, conflict, t0), "a conflict found while storing is a verdict");
        assert!(r.is_rejected());
        assert!(!Validating.is_at_or_past(Validated));
    }

    fn failed(reason: String) -> StatusUpdate {
        StatusUpdate { reason: Some(reason), ..Default::default() }
    }

    #[test]
    fn a_file_retried_after_a_failure_no_longer_shows_the_failures_reason() {
        let t0 = Utc::now();
        let mut r = StatusRecord::uploaded(FileId::new(), "uploads/x.csv".into(), 10, t0);
        for to in [Validating, Validated, Processing] {
            assert!(r.advance(to, StatusUpdate::default(), t0));
        }
        assert!(r.advance(ProcessingFailed, failed("transformer: gave up".into()), t0));
        assert_eq!(r.reason.as_deref(), Some("transformer: gave up"));
        // `txpipe retry`: the stage's working status again, then on to the end
        for to in [Processing, Processed, Completed] {
            assert!(r.advance(to, StatusUpdate::default(), t0), "{to}");
        }
        assert_eq!(r.reason, None, "{r:?}");
        let failure = r.history.iter().find(|h| h.status == ProcessingFailed).unwrap();
        assert_eq!(failure.reason.as_deref(), Some("transformer: gave up"), "the history keeps it");
    }

    #[test]
    fn a_record_at_every_bound_at_once_fits_a_dynamodb_item_with_room() {
        let t0 = Utc::now();
        let mut r = StatusRecord::uploaded(FileId::new(), "uploads/x.csv".into(), 10, t0);
        r.uploaded_by = Some("k".repeat(64));
        // a file retried for ever, each failure with a long reason full of what JSON escapes
        let nasty: String = "\u{1}\"\\é".repeat(2000);
        for _ in 0..200 {
            assert!(r.advance(Validating, StatusUpdate::default(), t0));
            assert!(r.advance(ValidationFailed, failed(nasty.clone()), t0));
        }
        let errors: Vec<RowError> = (0..5000)
            .map(|i| RowError { row: u64::MAX - i, column: Some(nasty.clone()), message: nasty.clone() })
            .collect();
        let update = StatusUpdate {
            row_count: Some(u64::MAX),
            error_count: Some(5000),
            errors: Some(errors),
            reason: Some(nasty.clone()),
            ..Default::default()
        };
        assert!(r.advance(Validating, StatusUpdate::default(), t0));
        assert!(r.advance(ValidationFailed, update, t0));

        let size = serde_json::to_vec(&r).unwrap().len();
        assert!(size <= MAX_STATUS_RECORD_BYTES, "{size} bytes");
        assert!(size < 230_000, "the bounds alone keep it near 220 KB: {size} bytes");
        assert_eq!(r.errors.len(), MAX_RECORDED_ERRORS, "the per-field bounds suffice: no error dropped for size");
        assert_eq!(r.error_count, Some(5000), "every error is still counted");
        assert_eq!(r.history.len(), MAX_HISTORY);
        assert_eq!(r.history_omitted, 402 + 1 - MAX_HISTORY as u64);
        assert_eq!(r.history[0].status, Uploaded, "the first entry stays");
        assert_eq!(r.history.last().unwrap().status, ValidationFailed, "and the latest");
        for text in r.errors.iter().map(|e| &e.message).chain(r.reason.iter()) {
            assert!(text.ends_with('…'), "a cut is marked");
            assert!(serde_json::to_string(text).unwrap().len() <= MAX_REASON_BYTES + 2);
        }
        let back: StatusRecord = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r, "a bounded record reads back as it is");
    }

    #[test]
    fn the_byte_budget_holds_whatever_the_fields_hold() {
        let t0 = Utc::now();
        let mut r = StatusRecord::uploaded(FileId::new(), "k".repeat(400_000), 10, t0);
        let errors = vec![RowError { row: 1, column: None, message: "m".into() }; 10];
        assert!(r.advance(ValidationFailed, StatusUpdate { errors: Some(errors), ..Default::default() }, t0));
        // nothing bounds object_key but the budget: errors then history go first, the key stays
        assert!(r.errors.is_empty());
        assert_eq!(r.object_key.len(), 400_000);
        assert_eq!(r.history.len(), 2);
    }

    #[test]
    fn short_values_are_kept_as_they_are() {
        let mut s = "a \"short\" reason".to_owned();
        clip(&mut s, 64);
        assert_eq!(s, "a \"short\" reason");
        let mut s = "é".repeat(10);
        clip(&mut s, 8);
        assert_eq!(s, "éé…", "cut on a character boundary, the mark counted");
    }
}
