//! The messages on the broker, typed: one struct per stage routing key on `{ns}.pipeline`,
//! the notification on `{ns}.notifications`, and [`Outgoing`], the envelope every publish
//! takes. Bodies are parsed into these types once, at the edge, by their routing key; a body
//! that does not parse is dead-lettered at once. Messages are built here too, from a file's
//! status record, so what a stage publishes and what `txpipe retry` re-publishes are the same.

use crate::file_id::FileId;
use crate::names::Names;
use crate::stage::{NotificationKey, RoutingKey};
use crate::status::{FileStatus, StatusRecord, StoredRecord};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `file.uploaded`: the gateway stored an upload (a claim check for its object).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileUploaded {
    pub file_id: FileId,
    /// Key of the CSV object in the bucket.
    pub object_key: String,
    /// The API key that uploaded the file (so a dead-lettered copy names its tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_by: Option<String>,
    /// When the event was first produced.
    pub at: DateTime<Utc>,
    /// The file itself, when it is small (see [`Content`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// The file's status record as the gateway stored it (see [`StoredRecord`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<StoredRecord>,
}

/// A small file's bytes, carried in its stage messages (up to `TXPIPE_INLINE_MAX_BYTES`) so
/// the validator and the transformer need not read the object again: with S3, two GetObject
/// calls a file fewer. The object is stored all the same (it is the record of the upload, and
/// what a replay or `txpipe retry` reads); a stage uses the carried copy only when its size
/// and SHA-256 are the status record's. Text only: a file that is not UTF-8 is not carried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Content(pub String);

impl Content {
    /// `bytes` as carried content, if they are UTF-8.
    pub fn of(bytes: Vec<u8>) -> Option<Self> {
        String::from_utf8(bytes).ok().map(Self)
    }

    /// The bytes, if they are the file `record` describes (its size and SHA-256).
    pub fn of_file(&self, record: &StatusRecord) -> Option<bytes::Bytes> {
        let bytes = self.0.as_bytes();
        let same_size = record.size_bytes == bytes.len() as u64;
        let same_digest = record
            .sha256
            .as_deref()
            .is_some_and(|d| d.eq_ignore_ascii_case(&hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))));
        (same_size && same_digest).then(|| bytes::Bytes::copy_from_slice(bytes))
    }
}

/// `file.validated`: every row passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileValidated {
    pub file_id: FileId,
    pub object_key: String,
    /// Data rows in the file.
    pub row_count: u64,
    /// The API key that uploaded the file (so a dead-lettered copy names its tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_by: Option<String>,
    pub at: DateTime<Utc>,
    /// The file itself, passed on from `file.uploaded` (see [`Content`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// The file's status record as the validator stored it (see [`StoredRecord`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<StoredRecord>,
}

/// `file.rejected`: the file was refused for its contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRejected {
    pub file_id: FileId,
    pub object_key: String,
    pub row_count: u64,
    /// Row errors found.
    pub error_count: u64,
    /// The API key that uploaded the file (so a dead-lettered copy names its tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_by: Option<String>,
    pub at: DateTime<Utc>,
}

/// `file.processed`: every row is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileProcessed {
    pub file_id: FileId,
    pub object_key: String,
    pub row_count: u64,
    /// Rows written to the transactions table.
    pub records_processed: u64,
    /// The API key that uploaded the file (so a dead-lettered copy names its tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_by: Option<String>,
    pub at: DateTime<Utc>,
}

/// A stage message: the type follows from the routing key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StageMessage {
    Uploaded(FileUploaded),
    Validated(FileValidated),
    Rejected(FileRejected),
    Processed(FileProcessed),
}

/// A body that is not the message its routing key says.
#[derive(Debug, thiserror::Error)]
#[error("malformed file event ({routing_key}): {why}")]
pub struct MalformedMessage {
    pub routing_key: String,
    pub why: String,
}

impl StageMessage {
    /// Parses a body published with `routing_key`.
    pub fn parse(routing_key: &str, body: &[u8]) -> Result<Self, MalformedMessage> {
        let fail = |why: String| MalformedMessage { routing_key: routing_key.to_owned(), why };
        let key = RoutingKey::parse(routing_key).ok_or_else(|| fail("not a txpipe routing key".into()))?;
        let parsed = match key {
            RoutingKey::FileUploaded => serde_json::from_slice(body).map(Self::Uploaded),
            RoutingKey::FileValidated => serde_json::from_slice(body).map(Self::Validated),
            RoutingKey::FileRejected => serde_json::from_slice(body).map(Self::Rejected),
            RoutingKey::FileProcessed => serde_json::from_slice(body).map(Self::Processed),
        };
        parsed.map_err(|e| fail(e.to_string()))
    }

    /// A new `file.uploaded` for an object the gateway stored.
    pub fn uploaded(file_id: FileId, object_key: String) -> Self {
        Self::Uploaded(FileUploaded {
            file_id,
            object_key,
            at: Utc::now(),
            uploaded_by: None,
            content: None,
            stored: None,
        })
    }

    /// The message on `key` about the file `record` describes (what a stage publishes when it
    /// is done, and what `txpipe retry` publishes to re-drive a stage).
    pub fn from_record(key: RoutingKey, record: &StatusRecord) -> Self {
        let (file_id, object_key, at) = (record.file_id, record.object_key.clone(), Utc::now());
        let uploaded_by = record.uploaded_by.clone();
        let row_count = record.row_count.unwrap_or(0);
        match key {
            RoutingKey::FileUploaded => {
                Self::Uploaded(FileUploaded { file_id, object_key, at, uploaded_by, content: None, stored: None })
            }
            RoutingKey::FileValidated => Self::Validated(FileValidated {
                file_id,
                object_key,
                row_count,
                at,
                uploaded_by,
                content: None,
                stored: None,
            }),
            RoutingKey::FileRejected => Self::Rejected(FileRejected {
                file_id,
                object_key,
                row_count,
                error_count: record.error_count.unwrap_or(0),
                at,
                uploaded_by,
            }),
            RoutingKey::FileProcessed => Self::Processed(FileProcessed {
                file_id,
                object_key,
                row_count,
                records_processed: record.records_processed.unwrap_or(0),
                at,
                uploaded_by,
            }),
        }
    }

    /// The message that announces where the file now stands, if its status has one.
    pub fn announcing(record: &StatusRecord) -> Option<Self> {
        let key = match record.status {
            FileStatus::Validated => RoutingKey::FileValidated,
            FileStatus::ValidationFailed if record.is_rejected() => RoutingKey::FileRejected,
            FileStatus::Processed => RoutingKey::FileProcessed,
            _ => return None,
        };
        Some(Self::from_record(key, record))
    }

    /// The bytes of the file `record` describes, if this message carries them (and they are
    /// that file's: same size and SHA-256).
    pub fn carried(&self, record: &StatusRecord) -> Option<bytes::Bytes> {
        self.content().and_then(|c| c.of_file(record))
    }

    /// What only the messages of the claiming stages (`file.uploaded`, `file.validated`)
    /// carry: the file's bytes and its stored record. The stages after them do not read the
    /// file, and the notifier reads its record (it announces before it writes).
    fn riders(&self) -> Option<(&Option<Content>, &Option<StoredRecord>)> {
        match self {
            Self::Uploaded(m) => Some((&m.content, &m.stored)),
            Self::Validated(m) => Some((&m.content, &m.stored)),
            Self::Rejected(_) | Self::Processed(_) => None,
        }
    }

    fn riders_mut(&mut self) -> Option<(&mut Option<Content>, &mut Option<StoredRecord>)> {
        match self {
            Self::Uploaded(m) => Some((&mut m.content, &mut m.stored)),
            Self::Validated(m) => Some((&mut m.content, &mut m.stored)),
            Self::Rejected(_) | Self::Processed(_) => None,
        }
    }

    /// The file's bytes, if this message carries them.
    pub fn content(&self) -> Option<&Content> {
        self.riders().and_then(|(content, _)| content.as_ref())
    }

    /// This message carrying `content`, if it is one that carries the file.
    pub fn with_content(mut self, content: Option<Content>) -> Self {
        if let Some((slot, _)) = self.riders_mut() {
            *slot = content;
        }
        self
    }

    /// The status record this message carries, if any (see [`StoredRecord`]).
    pub fn stored(&self) -> Option<&StoredRecord> {
        self.riders().and_then(|(_, stored)| stored.as_ref())
    }

    /// This message carrying the record `stored` gives, if it is one that carries it (only
    /// then is `stored` called: it serializes the record).
    pub fn with_stored(mut self, stored: impl FnOnce() -> Option<StoredRecord>) -> Self {
        if let Some((_, slot)) = self.riders_mut() {
            *slot = stored();
        }
        self
    }

    pub fn routing_key(&self) -> RoutingKey {
        match self {
            Self::Uploaded(_) => RoutingKey::FileUploaded,
            Self::Validated(_) => RoutingKey::FileValidated,
            Self::Rejected(_) => RoutingKey::FileRejected,
            Self::Processed(_) => RoutingKey::FileProcessed,
        }
    }

    pub fn file_id(&self) -> FileId {
        match self {
            Self::Uploaded(m) => m.file_id,
            Self::Validated(m) => m.file_id,
            Self::Rejected(m) => m.file_id,
            Self::Processed(m) => m.file_id,
        }
    }

    pub fn object_key(&self) -> &str {
        match self {
            Self::Uploaded(m) => &m.object_key,
            Self::Validated(m) => &m.object_key,
            Self::Rejected(m) => &m.object_key,
            Self::Processed(m) => &m.object_key,
        }
    }

    pub fn to_body(&self) -> Vec<u8> {
        let body = match self {
            Self::Uploaded(m) => serde_json::to_vec(m),
            Self::Validated(m) => serde_json::to_vec(m),
            Self::Rejected(m) => serde_json::to_vec(m),
            Self::Processed(m) => serde_json::to_vec(m),
        };
        body.expect("a stage message always serializes")
    }

    /// The same for every copy of this message, so a consumer can tell a redelivered or
    /// republished message from a new one.
    pub fn message_id(&self) -> String {
        message_id(self.file_id(), self.routing_key().as_str())
    }

    /// The message for the pipeline exchange. Mandatory: a stage message no queue takes is an
    /// error, never silently dropped.
    pub fn outgoing(&self, names: &Names) -> Outgoing {
        Outgoing {
            exchange: names.pipeline_exchange(),
            routing_key: self.routing_key().as_str().to_owned(),
            body: self.to_body(),
            message_id: self.message_id(),
            mandatory: true,
            headers: Vec::new(),
        }
    }
}

/// The file id of a body that looks like a stage message, whatever its routing key (for the
/// DLQ tooling, which shows what it can of any message).
pub fn file_id_of(body: &[u8]) -> Option<FileId> {
    #[derive(Deserialize)]
    struct AnyFile {
        file_id: FileId,
    }
    serde_json::from_slice::<AnyFile>(body).ok().map(|m| m.file_id)
}

fn message_id(file_id: FileId, routing_key: &str) -> String {
    format!("{file_id}:{routing_key}")
}

/// The JSON body published to `{ns}.notifications`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub file_id: FileId,
    /// `completed`, `validation_failed`, ...: the file's final status.
    pub status: FileStatus,
    pub records_processed: u64,
    pub error_count: u64,
    pub row_count: u64,
    /// Rows whose transaction was already stored with the same values by another file.
    #[serde(default)]
    pub already_stored: u64,
    /// In partial mode, the rows refused while the rest were stored.
    #[serde(default)]
    pub rejected_rows: u64,
    pub timestamp: DateTime<Utc>,
    /// The name of the API key that uploaded the file (absent when it had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_by: Option<String>,
}

impl Notification {
    /// The notification about `record` (as it is, or as it will be once the notification is
    /// confirmed: the notifier announces `completed` before recording it).
    pub fn of(record: &StatusRecord, status: FileStatus) -> Self {
        Self {
            file_id: record.file_id,
            status,
            records_processed: record.records_processed.unwrap_or(0),
            error_count: record.error_count.unwrap_or(0),
            row_count: record.row_count.unwrap_or(0),
            already_stored: record.already_stored.unwrap_or(0),
            rejected_rows: record.rejected_rows.unwrap_or(0),
            timestamp: Utc::now(),
            uploaded_by: record.uploaded_by.clone(),
        }
    }

    /// The message for the notifications exchange. Its id is the same for every copy
    /// (`{file_id}:{routing_key}`), so subscribers can drop duplicates.
    pub fn outgoing(&self, key: NotificationKey, names: &Names) -> Outgoing {
        Outgoing {
            exchange: names.notifications_exchange(),
            routing_key: key.as_str().to_owned(),
            body: serde_json::to_vec(self).expect("a notification always serializes"),
            message_id: message_id(self.file_id, key.as_str()),
            // like an SNS topic, a notification with no subscriber is not an error
            mandatory: false,
            headers: Vec::new(),
        }
    }
}

/// One message to publish.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// The same for every copy of the same message, so consumers can drop duplicates.
    pub message_id: String,
    /// Fail unless a queue receives it (pipeline messages); notifications may have no subscriber.
    pub mandatory: bool,
    pub headers: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_by_routing_key_and_garbage_is_refused() {
        let mut r = StatusRecord::uploaded(FileId::new(), "uploads/x.csv".into(), 1, Utc::now());
        r.row_count = Some(3);
        r.records_processed = Some(3);
        r.error_count = Some(1);
        r.uploaded_by = Some("acme".into());
        for key in RoutingKey::ALL {
            let m = StageMessage::from_record(key, &r);
            assert!(String::from_utf8(m.to_body()).unwrap().contains(r#""uploaded_by":"acme""#), "{key}");
            assert_eq!(m.routing_key(), key);
            assert_eq!(StageMessage::parse(key.as_str(), &m.to_body()).unwrap(), m);
            assert_eq!(m.message_id(), format!("{}:{key}", r.file_id));
            assert_eq!(file_id_of(&m.to_body()), Some(r.file_id));
        }
        assert!(StageMessage::parse("file.uploaded", b"not json").unwrap_err().to_string().contains("malformed"));
        assert!(StageMessage::parse("other", &StageMessage::uploaded(r.file_id, "k".into()).to_body()).is_err());
        let no_id = br#"{"file_id":"nope","object_key":"k","at":"2024-01-01T00:00:00Z"}"#;
        assert!(StageMessage::parse("file.uploaded", no_id).is_err());
        let no_count =
            br#"{"file_id":"0190a4b6-0000-7000-8000-000000000000","object_key":"k","at":"2024-01-01T00:00:00Z"}"#;
        assert!(StageMessage::parse("file.uploaded", no_count).is_ok());
        assert!(StageMessage::parse("file.validated", no_count).is_err(), "file.validated carries its row count");
        let note = Notification::of(&r, FileStatus::Completed);
        assert_eq!(note.uploaded_by.as_deref(), Some("acme"), "notifications name the tenant");
    }

    #[test]
    fn a_status_is_announced_by_the_message_of_the_stage_that_reached_it() {
        let mut r = StatusRecord::uploaded(FileId::new(), "uploads/x.csv".into(), 1, Utc::now());
        let key = |r: &StatusRecord| StageMessage::announcing(r).map(|m| m.routing_key());
        assert_eq!(key(&r), None);
        r.status = FileStatus::Validated;
        assert_eq!(key(&r), Some(RoutingKey::FileValidated));
        r.status = FileStatus::ValidationFailed;
        assert_eq!(key(&r), None, "a failure for a fault is not a rejection");
        r.error_count = Some(2);
        assert_eq!(key(&r), Some(RoutingKey::FileRejected));
        r.status = FileStatus::Processed;
        assert_eq!(key(&r), Some(RoutingKey::FileProcessed));
        r.status = FileStatus::Completed;
        assert_eq!(key(&r), None);
    }

    #[test]
    fn a_carried_copy_counts_only_when_it_is_the_recorded_file() {
        let csv = "transaction_id,amount\nt1,1\n";
        let mut r = StatusRecord::uploaded(FileId::new(), "uploads/x.csv".into(), csv.len() as u64, Utc::now());
        let msg = StageMessage::from_record(RoutingKey::FileUploaded, &r).with_content(Content::of(csv.into()));
        let parsed = StageMessage::parse("file.uploaded", &msg.to_body()).unwrap();
        assert_eq!(parsed.content().map(|c| c.0.as_str()), Some(csv), "carried in the JSON body");
        assert_eq!(parsed.carried(&r), None, "a record without a digest trusts no copy");
        r.sha256 = Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(csv.as_bytes())).to_uppercase());
        assert_eq!(parsed.carried(&r).as_deref(), Some(csv.as_bytes()));
        r.size_bytes += 1;
        assert_eq!(parsed.carried(&r), None, "another size");
        r.size_bytes -= 1;
        r.sha256 = Some(hex::encode([0u8; 32]));
        assert_eq!(parsed.carried(&r), None, "another digest");
        assert!(Content::of(vec![0xff, 0xfe]).is_none(), "only UTF-8 is carried");
        let processed = StageMessage::from_record(RoutingKey::FileProcessed, &r).with_content(Content::of(csv.into()));
        assert!(processed.content().is_none() && !String::from_utf8(processed.to_body()).unwrap().contains("content"));
        let plain = StageMessage::from_record(RoutingKey::FileValidated, &r);
        assert!(!String::from_utf8(plain.to_body()).unwrap().contains("content"), "absent, not null");
    }

    #[test]
    fn a_stored_record_travels_in_the_messages_of_the_claiming_stages_only() {
        let r = StatusRecord::uploaded(FileId::new(), "uploads/x.csv".into(), 3, Utc::now());
        let stored = StoredRecord { version: 4, json: serde_json::to_string(&r).unwrap() };
        for key in [RoutingKey::FileUploaded, RoutingKey::FileValidated] {
            let msg = StageMessage::from_record(key, &r).with_stored(|| Some(stored.clone()));
            let parsed = StageMessage::parse(key.as_str(), &msg.to_body()).unwrap();
            assert_eq!(parsed.stored(), Some(&stored), "{key:?}: the JSON exactly, and its version");
            // a message from before the field (or from txpipe retry) has none
            let plain = StageMessage::from_record(key, &r).to_body();
            assert!(!String::from_utf8(plain.clone()).unwrap().contains("stored"), "absent, not null");
            assert_eq!(StageMessage::parse(key.as_str(), &plain).unwrap().stored(), None);
        }
        // the notifier reads its record (it announces before it writes): nothing carried to it
        let processed = StageMessage::from_record(RoutingKey::FileProcessed, &r).with_stored(|| Some(stored));
        assert!(processed.stored().is_none() && !String::from_utf8(processed.to_body()).unwrap().contains("stored"));
    }
}
