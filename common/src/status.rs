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

/// One status change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    pub status: FileStatus,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Everything kept about one file in the processing-status table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusRecord {
    pub file_id: FileId,
    pub status: FileStatus,
    pub object_key: String,
    pub size_bytes: u64,
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
    #[serde(default)]
    pub records_processed: Option<u64>,
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
    pub reason: Option<String>,
}

impl StatusRecord {
    /// A new file, just stored by the gateway.
    pub fn uploaded(file_id: FileId, object_key: String, size_bytes: u64, at: DateTime<Utc>) -> Self {
        Self {
            file_id,
            status: FileStatus::Uploaded,
            object_key,
            size_bytes,
            created_at: at,
            updated_at: at,
            history: vec![HistoryEntry { status: FileStatus::Uploaded, at, reason: None }],
            row_count: None,
            error_count: None,
            errors: Vec::new(),
            records_processed: None,
            reason: None,
            announced: true,
            uploaded_by: None,
        }
    }

    /// True when the validator rejected the file for its contents: a verdict, not a failure,
    /// so it is never retried (a failure for a fault has no error count).
    pub fn is_rejected(&self) -> bool {
        self.status == FileStatus::ValidationFailed && self.error_count.is_some()
    }

    /// Moves to `to` if that is forward; returns false (and changes nothing) otherwise.
    pub fn advance(&mut self, to: FileStatus, update: StatusUpdate, at: DateTime<Utc>) -> bool {
        if !self.status.can_move_to(to) {
            return false;
        }
        self.status = to;
        self.updated_at = at;
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
        if update.reason.is_some() {
            self.reason = update.reason;
        }
        true
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
        assert!(!Validating.is_at_or_past(Validated));
    }
}
