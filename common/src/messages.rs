//! The messages on the broker, typed: stage events on `{ns}.pipeline` and notifications on
//! `{ns}.notifications`. Bodies are parsed into these types at the edge; a body that does not
//! parse is dead-lettered at once.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Routing key of the event the gateway publishes after storing an upload.
pub const FILE_UPLOADED: &str = "file.uploaded";
/// Routing key of the event the validator publishes for a valid file.
pub const FILE_VALIDATED: &str = "file.validated";
/// Routing key of the event the validator publishes for an invalid file.
pub const FILE_REJECTED: &str = "file.rejected";
/// Routing key of the event the transformer publishes after storing every row.
pub const FILE_PROCESSED: &str = "file.processed";
/// Notification routing key: a file went through the whole pipeline.
pub const NOTIFY_COMPLETED: &str = "file.completed";
/// Notification routing key: a file failed validation.
pub const NOTIFY_REJECTED: &str = "file.rejected";
/// Notification routing key: a file failed in a stage after validation.
pub const NOTIFY_FAILED: &str = "file.failed";

/// A worker stage; its name is also its queue's suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Gateway,
    Validator,
    Transformer,
    Notifier,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Gateway => "gateway",
            Stage::Validator => "validator",
            Stage::Transformer => "transformer",
            Stage::Notifier => "notifier",
        }
    }

    /// The routing keys a worker stage's queue is bound to.
    pub fn bindings(self) -> &'static [&'static str] {
        match self {
            Stage::Gateway => &[],
            Stage::Validator => &[FILE_UPLOADED],
            Stage::Transformer => &[FILE_VALIDATED],
            Stage::Notifier => &[FILE_PROCESSED, FILE_REJECTED],
        }
    }

    /// The stage whose queue receives messages published with `routing_key`.
    pub fn consuming(routing_key: &str) -> Option<Stage> {
        [Stage::Validator, Stage::Transformer, Stage::Notifier]
            .into_iter()
            .find(|s| s.bindings().contains(&routing_key))
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A file's id: a UUID the gateway assigns (v7, so ids sort by upload time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FileId(uuid::Uuid);

impl FileId {
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl Default for FileId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::str::FromStr for FileId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The body of every stage message: a claim check that points at the stored object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEvent {
    pub file_id: FileId,
    /// Key of the CSV object in the bucket.
    pub object_key: String,
    /// Data rows in the file (file.validated, file.processed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_count: Option<u64>,
    /// Row errors found (file.rejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_count: Option<u64>,
    /// Rows written to the transactions table (file.processed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_processed: Option<u64>,
    /// When the event was first produced.
    pub at: DateTime<Utc>,
}

impl FileEvent {
    pub fn new(file_id: FileId, object_key: String) -> Self {
        Self { file_id, object_key, row_count: None, error_count: None, records_processed: None, at: Utc::now() }
    }

    /// Parses a body; the error says what is wrong with it.
    pub fn from_body(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| format!("malformed file event: {e}"))
    }

    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a file event always serializes")
    }

    /// The AMQP message id of this event on `routing_key`: the same for every copy, so a
    /// consumer can tell a redelivered or republished message from a new one.
    pub fn message_id(&self, routing_key: &str) -> String {
        format!("{}:{routing_key}", self.file_id)
    }
}

/// The JSON body published to `{ns}.notifications`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub file_id: FileId,
    /// `completed`, `validation_failed`, ...: the file's final status.
    pub status: crate::status::FileStatus,
    pub records_processed: u64,
    pub error_count: u64,
    pub row_count: u64,
    pub timestamp: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_garbage_is_refused() {
        let e = FileEvent::new(FileId::new(), "uploads/x.csv".into());
        assert_eq!(FileEvent::from_body(&e.to_body()).unwrap(), e);
        assert!(FileEvent::from_body(b"not json").unwrap_err().contains("malformed"));
        assert!(FileEvent::from_body(br#"{"file_id":"nope","object_key":"k","at":"2024-01-01T00:00:00Z"}"#).is_err());
    }

    #[test]
    fn routing_keys_map_to_stages() {
        assert_eq!(Stage::consuming(FILE_UPLOADED), Some(Stage::Validator));
        assert_eq!(Stage::consuming(FILE_VALIDATED), Some(Stage::Transformer));
        assert_eq!(Stage::consuming(FILE_REJECTED), Some(Stage::Notifier));
        assert_eq!(Stage::consuming(FILE_PROCESSED), Some(Stage::Notifier));
        assert_eq!(Stage::consuming("other"), None);
    }
}
