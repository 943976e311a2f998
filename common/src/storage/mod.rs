//! Storage ports: the object store (CSV files), the processing-status table, the
//! transactions table, the API-key table (keys and their daily upload counts) and the
//! idempotency-key table (uploads by `Idempotency-Key`), each a trait held as `Arc<dyn …>`. The embedded adapters (a local
//! directory and SQLite) live here; the S3/DynamoDB adapters implement the same traits, and
//! one contract test suite (`txpipe-tests`) runs against each. Every failure is a
//! [`StorageError`] whose [`StorageClass`] decides what callers do about it.

pub mod aws;
mod aws_idempotency;
mod aws_keys;
mod error;
mod group_commit;
pub mod listing;
pub mod local;
pub mod provision;
mod recent;
pub mod sqlite;

use crate::config::{Settings, StorageKind};
use crate::csv_schema::{Row, TxStatus};
use crate::file_id::FileId;
use crate::status::{FileStatus, StatusRecord, StatusUpdate, StoredRecord, UploadOptions};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
use futures::stream::BoxStream;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::{io, sync::Arc};
use tokio::io::AsyncRead;

pub use error::{BoxError, StorageClass, StorageError, StorageErrorKind};
pub use listing::{FilePage, FileQuery};

/// The body of an upload, as it arrives.
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;
/// A stored object, read as it streams.
pub type ObjectReader = Box<dyn AsyncRead + Send + Unpin>;

/// Holds CSV files under keys like `uploads/{file_id}.csv`.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Stores the stream under `key` whole or not at all; returns its size in bytes.
    async fn put(&self, key: &str, body: ByteStream) -> Result<u64, StorageError>;
    /// Opens `key` for streaming.
    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError>;
    /// Removes `key`; removing a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// Ok when the store can be reached and used.
    async fn check(&self) -> Result<(), StorageError>;
}

/// The outcome of asking for a status change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Advance {
    /// The change was made; the record as it now is.
    Moved(StatusRecord),
    /// The change would not move forward; the record as it is, unchanged.
    Refused(StatusRecord),
}

/// A status change to make with another write (see [`TransactionStore::write_then`]): what
/// [`StatusStore::advance`] takes.
#[derive(Clone, Debug)]
pub struct StatusChange {
    pub file_id: FileId,
    pub to: FileStatus,
    pub update: StatusUpdate,
    pub at: DateTime<Utc>,
}

/// The processing-status table, keyed by file_id.
#[async_trait]
pub trait StatusStore: Send + Sync + 'static {
    /// Records a new file; [`StorageErrorKind::AlreadyExists`] if the id is taken.
    async fn create(&self, record: &StatusRecord) -> Result<(), StorageError>;
    async fn get(&self, file_id: FileId) -> Result<Option<StatusRecord>, StorageError>;
    /// Moves the file to `to` only if that is forward, atomically; [`StorageErrorKind::NotFound`]
    /// for an unknown file.
    async fn advance(
        &self,
        file_id: FileId,
        to: FileStatus,
        update: StatusUpdate,
        at: DateTime<Utc>,
    ) -> Result<Advance, StorageError>;
    /// Marks the file's upload as announced (its `file.uploaded` was confirmed).
    async fn mark_announced(&self, file_id: FileId) -> Result<(), StorageError>;
    /// Forgets a file whose upload was never announced (the gateway undoing an upload it
    /// could not announce), atomically; true if it was forgotten, false if it is announced
    /// or unknown.
    async fn withdraw(&self, file_id: FileId) -> Result<bool, StorageError>;
    /// Files recorded but still unannounced, recorded before `before`, at most `limit`: the
    /// uploads a crash left between recording and announcing (the gateway's sweeper withdraws
    /// them). Reads only such records, not the whole table.
    async fn unannounced(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<FileId>, StorageError>;
    /// Applies `change` to the file's record atomically (across processes and replicas: a
    /// conditional write, read again if another writer got in between); `change` says whether
    /// it changed anything, and may run more than once. [`StorageErrorKind::NotFound`] for an
    /// unknown file. The attempt rules (`crate::attempt`) go through this.
    async fn update(&self, file_id: FileId, change: Change) -> Result<Advance, StorageError>;
    /// Files in the working status `status` that have shown no sign of life
    /// ([`StatusRecord::last_sign_of_life`]) since `before`, at most `limit`: what the stuck-file
    /// sweep resumes. Reads only files in that status, not the whole table.
    async fn stalled(
        &self,
        status: FileStatus,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<FileId>, StorageError>;
    /// Announced files, newest first (`created_at`, then `file_id`), of one owner or of all,
    /// optionally in one status and recorded since a time, at most `query.limit`, after
    /// `query.cursor` ([`listing`]). Reads an index by owner and time, never the whole table.
    async fn list(&self, query: &FileQuery) -> Result<FilePage, StorageError>;
    /// The record as this process last read or wrote it, if the store keeps that (DynamoDB
    /// does, as the base of its conditional writes): no request, and possibly stale, so only
    /// for a caller that can tell (a status only moves forward, and the fields a status sets
    /// do not change until the next one). None by default.
    fn remembered(&self, _file_id: FileId) -> Option<StatusRecord> {
        None
    }
    /// The record this process last wrote, as a message may carry it to a worker in another
    /// process (see [`StoredRecord`]), if the store has a use for that (DynamoDB: the base of
    /// a conditional change without a read). None by default.
    fn stored(&self, _file_id: FileId) -> Option<StoredRecord> {
        None
    }
    /// A record a message carried: the base of this process's next change to the file, which
    /// the change's own condition checks. Ignored by default.
    fn hint(&self, _file_id: FileId, _stored: StoredRecord) {}
    async fn check(&self) -> Result<(), StorageError>;
}

/// A change to a status record, for [`StatusStore::update`]: true if it changed the record.
pub type Change = Arc<dyn Fn(&mut StatusRecord) -> bool + Send + Sync>;

/// A version of a transaction that a later one replaced: the file that wrote it and its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionRef {
    pub file_id: FileId,
    pub version: u64,
}

/// One version of a transaction, as one file wrote it. The transactions table holds each
/// transaction's current version (keyed by transaction_id, as in the seed); the versions table
/// holds every version by the file that wrote it, so a file's rows and a transaction's history
/// survive later files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Transaction {
    pub transaction_id: String,
    /// Exact decimal, written and read as a string (never a float).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub currency: String,
    /// The timestamp as RFC 3339, with the offset the file gave.
    pub timestamp: DateTime<FixedOffset>,
    /// The same instant in seconds since the Unix epoch.
    pub timestamp_epoch: i64,
    pub merchant: String,
    pub status: TxStatus,
    /// The file that wrote this version.
    pub file_id: FileId,
    pub processed_at: DateTime<Utc>,
    /// 1 for the first version of the transaction, one more for each later one.
    #[serde(default = "first_version")]
    pub version: u64,
    /// The version this one replaced (absent for a first version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<VersionRef>,
}

fn first_version() -> u64 {
    1
}

/// The columns of a transaction that a file gives (the rest is bookkeeping).
pub const VALUE_COLUMNS: [&str; 5] = ["amount", "currency", "timestamp", "merchant", "status"];

impl Transaction {
    /// A first version of the row, written by `file_id`.
    pub fn from_row(row: &Row<'_>, file_id: FileId, processed_at: DateTime<Utc>) -> Self {
        Self {
            transaction_id: row.transaction_id.to_owned(),
            amount: row.amount,
            currency: row.currency.to_owned(),
            timestamp: row.timestamp,
            timestamp_epoch: row.timestamp.timestamp(),
            merchant: row.merchant.to_owned(),
            status: row.status,
            file_id,
            processed_at,
            version: 1,
            replaces: None,
        }
    }

    /// The columns whose values differ from `other`'s, in the contract's order. An amount is
    /// compared as a number (`1.0` is `1.00`), a timestamp as an instant with its offset.
    pub fn differing_columns(&self, other: &Transaction) -> Vec<&'static str> {
        let same = [
            self.amount == other.amount,
            self.currency == other.currency,
            self.timestamp == other.timestamp && self.timestamp.offset() == other.timestamp.offset(),
            self.merchant == other.merchant,
            self.status == other.status,
        ];
        VALUE_COLUMNS.iter().zip(same).filter(|(_, same)| !same).map(|(c, _)| *c).collect()
    }

    /// This row as the next version after `current`, which it replaces.
    pub fn replacing(mut self, current: &Transaction) -> Self {
        self.version = current.version + 1;
        self.replaces = Some(VersionRef { file_id: current.file_id, version: current.version });
        self
    }

    /// The reference to this version.
    pub fn version_ref(&self) -> VersionRef {
        VersionRef { file_id: self.file_id, version: self.version }
    }

    /// True when `current` (the table's current version of this id, if any) is what this
    /// version expects to replace.
    pub fn expects(&self, current: Option<&Transaction>) -> bool {
        match (self.replaces, current) {
            (None, None) => true,
            (Some(r), Some(c)) => r == c.version_ref(),
            _ => false,
        }
    }
}

/// One page of a file's transactions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TransactionPage {
    pub items: Vec<Transaction>,
    /// Pass back to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl TransactionPage {
    /// Keeps the longest prefix of the page whose items take at most `budget` bytes as JSON
    /// (always at least one item, so paging moves on); if items were dropped, the cursor
    /// points after the last one kept.
    pub fn truncate_to_bytes(&mut self, budget: usize) {
        let mut used = 0usize;
        let keep = self
            .items
            .iter()
            .position(|t| {
                used += serde_json::to_vec(t).map(|v| v.len() + 1).unwrap_or(usize::MAX / 2);
                used > budget
            })
            .map(|n| n.max(1))
            .unwrap_or(self.items.len());
        if keep < self.items.len() {
            self.items.truncate(keep);
            self.next_cursor = self.items.last().map(|t| encode_cursor(&t.transaction_id));
        }
    }
}

/// How a batch of versions was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Every version was written, each one now current.
    Written,
    /// Nothing was written: for these transaction ids the current version was not the one the
    /// write expected to replace; here is what is current (None: the id is not stored).
    Stale(Vec<(String, Option<Transaction>)>),
}

/// The transactions: the current version of each (the `{ns}-transactions` table, keyed by
/// transaction_id as in the seed) and every version by the file that wrote it (the
/// `{ns}-transaction-versions` table, keyed by file_id and transaction_id; on SQLite a view of
/// the current rows and the replaced ones, which keeps a new transaction one row). Writes are
/// conditional, so two files never overwrite each other's rows unseen (see `crate::ledger`).
#[async_trait]
pub trait TransactionStore: Send + Sync + 'static {
    /// The current versions of these ids (ids not stored are left out), in no order.
    async fn current(&self, ids: &[String]) -> Result<Vec<Transaction>, StorageError>;
    /// Makes each version current and records it with its file, all or nothing: only if, for
    /// every one, the current version is the one it [`Transaction::replaces`] (none: the id is
    /// not stored yet). Ids are distinct within a call. A backend may split a call into
    /// atomic parts of [`MAX_WRITE`] versions (DynamoDB): then the parts without a refused id
    /// may be written even when the outcome is `Stale`.
    async fn write(&self, versions: &[Transaction]) -> Result<WriteOutcome, StorageError>;
    /// [`Self::write`], and if every version was written, the status change `then` in the same
    /// write where the store can make both at once (the embedded store: one round trip and one
    /// commit instead of two). `Some`: what the change came to. `None`: no change was made
    /// (some version was refused, or the store keeps the two apart, as DynamoDB does), and
    /// it is the caller's to make.
    async fn write_then(
        &self,
        versions: &[Transaction],
        then: StatusChange,
    ) -> Result<(WriteOutcome, Option<Advance>), StorageError> {
        let _ = then;
        Ok((self.write(versions).await?, None))
    }
    /// Undoes one file's version of a transaction: if it is current, the version it replaced
    /// becomes current again (or the transaction is removed, for a first version), and the
    /// file's version is forgotten; if a later version replaced it, only the file's version is
    /// forgotten. Atomic; undoing what is not there is not an error.
    async fn revert(&self, file_id: FileId, transaction_id: &str) -> Result<(), StorageError>;
    /// The version `file_id` wrote of a transaction, if it wrote one.
    async fn version(&self, file_id: FileId, transaction_id: &str) -> Result<Option<Transaction>, StorageError>;
    /// The versions a file wrote, ordered by transaction_id, at most `limit`, after `cursor`.
    async fn list_by_file(
        &self,
        file_id: FileId,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<TransactionPage, StorageError>;
    async fn check(&self) -> Result<(), StorageError>;
}

/// The most versions one [`TransactionStore::write`] takes (a DynamoDB transaction holds 100
/// actions: two per version).
pub const MAX_WRITE: usize = 50;

/// The ids in `versions` whose expectation `current` (the current versions, as read) does not
/// meet, with what is current: what a refused conditional write reports.
pub fn stale(versions: &[Transaction], current: &[Transaction]) -> Vec<(String, Option<Transaction>)> {
    let by_id: std::collections::HashMap<&str, &Transaction> =
        current.iter().map(|t| (t.transaction_id.as_str(), t)).collect();
    versions
        .iter()
        .filter_map(|v| {
            let now = by_id.get(v.transaction_id.as_str()).copied();
            (!v.expects(now)).then(|| (v.transaction_id.clone(), now.cloned()))
        })
        .collect()
}

/// One API key as stored: never the secret, only its SHA-256 (see `crate::auth`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Unique, and kept after revocation: files name the key that uploaded them.
    pub name: String,
    /// Lower-case hex SHA-256 of the whole key (`txp_…`).
    pub hash: String,
    /// Reads every tenant's files.
    pub admin: bool,
    /// Uploads allowed per UTC day.
    pub daily_quota: u64,
    /// Requests per second, refilled continuously (a token bucket per gateway replica).
    pub rate_per_second: f64,
    /// Requests allowed at once above the rate (the bucket's size).
    pub burst: u32,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The outcome of counting one upload against a daily quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaUse {
    /// Counted: this many uploads are now counted for the day, this one included.
    Counted(u64),
    /// The day's quota is spent; nothing was counted.
    Exhausted,
}

/// The API-key table: keys by name and by hash, and one upload counter per key and UTC day,
/// shared by every gateway replica that uses the same storage.
#[async_trait]
pub trait ApiKeyStore: Send + Sync + 'static {
    /// Stores a new key; [`StorageErrorKind::AlreadyExists`] if the name is taken (a revoked
    /// key's name stays taken, so a file's owner never changes hands).
    async fn create(&self, key: &ApiKeyRecord) -> Result<(), StorageError>;
    /// The key whose hash this is, revoked or not.
    async fn get_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StorageError>;
    /// Every key, by name.
    async fn list(&self) -> Result<Vec<ApiKeyRecord>, StorageError>;
    /// Marks the key revoked (again is harmless); [`StorageErrorKind::NotFound`] for an unknown name.
    async fn revoke(&self, name: &str, at: DateTime<Utc>) -> Result<(), StorageError>;
    /// Counts one upload for `name` on `day` if fewer than `limit` are counted, atomically
    /// (one conditional write), so replicas never count past the limit together.
    async fn consume(&self, name: &str, day: NaiveDate, limit: u64) -> Result<QuotaUse, StorageError>;
    /// Uncounts one upload (one that was counted and then failed); never below zero.
    async fn give_back(&self, name: &str, day: NaiveDate) -> Result<(), StorageError>;
    async fn check(&self) -> Result<(), StorageError>;
}

/// The upload an `Idempotency-Key` stands for, once its first request is done: enough to give
/// a repeat the first request's answer, and to tell whether the repeat is the same request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotentUpload {
    pub file_id: FileId,
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the file's bytes (a repeat must carry the same).
    pub sha256: String,
    /// The upload's options (a repeat must ask for the same).
    pub options: UploadOptions,
}

/// Asking for an idempotency key: `key` is the record's key (the API key's name and the
/// SHA-256 of the `Idempotency-Key`, never the raw key), `token` names this request's claim.
#[derive(Clone, Debug)]
pub struct NewClaim {
    pub key: String,
    pub token: String,
    pub now: DateTime<Utc>,
    /// Until when an unfinished claim holds the key; after that (its gateway crashed, say) the
    /// next request takes it over.
    pub lease_until: DateTime<Utc>,
    /// When the record is forgotten (the window in which a repeat gets the first answer).
    pub expires_at: DateTime<Utc>,
}

/// What claiming an idempotency key found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key was free (never used, forgotten, or its holder's lease ran out): it is this
    /// request's now.
    Claimed,
    /// Another request holds it and has not finished.
    InFlight,
    /// A request with this key finished: its upload.
    Done(IdempotentUpload),
}

/// The idempotency-key table (`{ns}-idempotency-keys`): one record per key, shared by every
/// gateway replica, so a repeated upload is stored and announced once whichever replica it
/// reaches. A record is claimed (atomically, one conditional write), then completed with the
/// upload or released if the upload failed; it is forgotten after its `expires_at`.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `claim.key` for `claim.token` unless a live record holds it: atomically, so of
    /// requests racing for a key exactly one gets [`Claim::Claimed`].
    async fn claim(&self, claim: &NewClaim) -> Result<Claim, StorageError>;
    /// Records the claimed key's upload (keeping its `expires_at`); false if the claim was lost
    /// meanwhile (taken over after its lease, or released).
    async fn complete(&self, key: &str, token: &str, upload: &IdempotentUpload) -> Result<bool, StorageError>;
    /// Extends an unfinished claim of this token to `lease_until` (its upload is still
    /// streaming); false if the claim is no longer this token's, or is done.
    async fn renew(&self, key: &str, token: &str, lease_until: DateTime<Utc>) -> Result<bool, StorageError>;
    /// Frees a key this token claimed and did not complete (its upload failed); anything else
    /// is left as it is.
    async fn release(&self, key: &str, token: &str) -> Result<(), StorageError>;
    async fn check(&self) -> Result<(), StorageError>;
}

/// Every store a service may use.
#[derive(Clone)]
pub struct Storage {
    pub objects: Arc<dyn ObjectStore>,
    pub statuses: Arc<dyn StatusStore>,
    pub transactions: Arc<dyn TransactionStore>,
    pub keys: Arc<dyn ApiKeyStore>,
    pub idempotency: Arc<dyn IdempotencyStore>,
}

impl Storage {
    /// Opens the backend the settings name.
    pub async fn open(settings: &Settings) -> Result<Self, StorageError> {
        let names = settings.names();
        match settings.storage {
            StorageKind::Local => {
                let layout = local::LocalLayout::of(settings);
                let db = Arc::new(sqlite::SqliteStore::open(&layout.database(), &names).await?);
                let objects = local::LocalObjectStore::open(layout.objects_dir(), db.clone())?;
                Ok(Self {
                    objects: Arc::new(objects),
                    statuses: db.clone(),
                    transactions: db.clone(),
                    keys: db.clone(),
                    idempotency: db,
                })
            }
            StorageKind::Aws => {
                let sdk = aws::load_sdk_config(settings).await;
                let storage = Self::aws(&sdk, settings);
                // a missing bucket or table is a setup error: say so now, not on the first file
                storage.check().await?;
                Ok(storage)
            }
        }
    }

    /// S3 and DynamoDB stores for `settings`' namespace, from an SDK configuration.
    pub fn aws(sdk: &aws_config::SdkConfig, settings: &Settings) -> Self {
        let db = Arc::new(aws::DynamoStore::new(sdk, &settings.names(), settings.dynamodb_write_concurrency));
        let objects = Arc::new(aws::S3ObjectStore::new(sdk, settings));
        Self { objects, statuses: db.clone(), transactions: db.clone(), keys: db.clone(), idempotency: db }
    }

    /// Ok when every store answers.
    pub async fn check(&self) -> Result<(), StorageError> {
        self.objects.check().await?;
        self.statuses.check().await?;
        self.transactions.check().await?;
        self.keys.check().await?;
        self.idempotency.check().await
    }
}

/// Cursors are the last transaction_id of a page, hex-encoded so they travel in a URL as is.
pub(crate) fn encode_cursor(last_id: &str) -> String {
    last_id.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The longest cursor accepted: the hex of a 1024-byte id, DynamoDB's sort-key limit.
const MAX_CURSOR_CHARS: usize = 2048;
// every id the CSV contract accepts has a cursor that decodes
const _: () = assert!(2 * crate::csv_schema::MAX_TRANSACTION_ID_BYTES <= MAX_CURSOR_CHARS);

/// Works on bytes, never slicing the `&str`: a cursor is client input and may hold any UTF-8.
pub(crate) fn decode_cursor(cursor: &str) -> Result<String, StorageError> {
    if !cursor.len().is_multiple_of(2) || cursor.len() > MAX_CURSOR_CHARS {
        return Err(StorageError::invalid_cursor());
    }
    let digit = |b: u8| (b as char).to_digit(16).ok_or_else(StorageError::invalid_cursor);
    let bytes = cursor
        .as_bytes()
        .chunks(2)
        .map(|pair| Ok((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
        .collect::<Result<Vec<u8>, StorageError>>()?;
    String::from_utf8(bytes).map_err(|_| StorageError::invalid_cursor())
}

/// A file's bytes as a blocking reader: `carried`, the copy its message brought (see
/// [`crate::messages::Content`]), if any, else the object `key` ([`open_blocking`]).
pub fn open_file_blocking(
    objects: &Arc<dyn ObjectStore>,
    key: &str,
    carried: Option<&bytes::Bytes>,
    handle: &tokio::runtime::Handle,
) -> io::Result<Box<dyn io::Read + Send>> {
    Ok(match carried {
        Some(bytes) => Box::new(io::Cursor::new(bytes.clone())),
        None => Box::new(open_blocking(objects, key, handle)?),
    })
}

/// Opens `key` as a blocking reader, for CSV parsing on the blocking pool. Call it from a
/// `spawn_blocking` task, passing the runtime's handle. A storage failure comes back as an
/// `io::Error` carrying the [`StorageError`] (see [`StorageError::in_io`]), so its class
/// survives the parser; an error while reading the stream later is a plain `io::Error`.
pub fn open_blocking(
    objects: &Arc<dyn ObjectStore>,
    key: &str,
    handle: &tokio::runtime::Handle,
) -> io::Result<impl io::Read + use<>> {
    let reader = handle.block_on(objects.get(key))?;
    Ok(tokio_util::io::SyncIoBridge::new_with_handle(reader, handle.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let longest = "é".repeat(crate::csv_schema::MAX_TRANSACTION_ID_BYTES / 2);
        for id in ["t1", "ü/?&= x", "", &longest] {
            assert_eq!(decode_cursor(&encode_cursor(id)).unwrap(), id);
        }
        for bad in ["xyz", "zz", "0", "0é0", "é1", "+1", "0x"] {
            assert_eq!(decode_cursor(bad).unwrap_err().kind(), StorageErrorKind::InvalidCursor, "{bad}");
        }
    }

    #[test]
    fn a_page_stops_at_its_byte_budget_with_a_cursor_after_the_last_row_kept() {
        let at = Utc::now();
        let ts = DateTime::parse_from_rfc3339("2024-01-15T10:30:00Z").unwrap();
        let items: Vec<Transaction> = (0..10)
            .map(|i| Transaction {
                transaction_id: format!("t{i}"),
                amount: Decimal::ONE,
                currency: "USD".into(),
                timestamp: ts,
                timestamp_epoch: ts.timestamp(),
                merchant: "m".repeat(100),
                status: TxStatus::Completed,
                file_id: FileId::new(),
                processed_at: at,
                version: 1,
                replaces: None,
            })
            .collect();
        let one = serde_json::to_vec(&items[0]).unwrap().len() + 1;
        let mut page = TransactionPage { items: items.clone(), next_cursor: None };
        page.truncate_to_bytes(one * 3 + 1);
        assert_eq!(page.items.len(), 3);
        assert_eq!(decode_cursor(page.next_cursor.as_deref().unwrap()).unwrap(), "t2");
        let mut tiny = TransactionPage { items: items.clone(), next_cursor: None };
        tiny.truncate_to_bytes(1);
        assert_eq!(tiny.items.len(), 1, "always at least one row, so paging moves on");
        let mut whole = TransactionPage { items, next_cursor: Some("ab".into()) };
        whole.truncate_to_bytes(usize::MAX);
        assert_eq!((whole.items.len(), whole.next_cursor.as_deref()), (10, Some("ab")), "under budget: unchanged");
    }

    /// An object store whose `get` fails with a storage error, or whose object breaks mid-stream.
    #[derive(Debug)]
    enum Fake {
        Fails(StorageErrorKind),
        Breaks,
    }

    #[async_trait]
    impl ObjectStore for Fake {
        async fn put(&self, _: &str, _: ByteStream) -> Result<u64, StorageError> {
            unimplemented!("only read here")
        }
        async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
            match self {
                Fake::Fails(kind) => Err(StorageError::new(*kind, format!("the fake {key}"))),
                Fake::Breaks => {
                    let chunks = [Ok(Bytes::from_static(b"a,b\n")), Err(io::Error::other("connection reset"))];
                    Ok(Box::new(tokio_util::io::StreamReader::new(futures::stream::iter(chunks))))
                }
            }
        }
        async fn delete(&self, _: &str) -> Result<(), StorageError> {
            Ok(())
        }
        async fn check(&self) -> Result<(), StorageError> {
            Ok(())
        }
    }

    /// Reads `key` whole the way the workers do: on the blocking pool, through `open_blocking`.
    async fn read_blocking(objects: Arc<dyn ObjectStore>, key: &str) -> io::Result<Vec<u8>> {
        let (handle, key) = (tokio::runtime::Handle::current(), key.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            io::Read::read_to_end(&mut open_blocking(&objects, &key, &handle)?, &mut buf)?;
            Ok(buf)
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_streaming_path_keeps_the_storage_class() {
        use crate::worker::Failure;
        let cases = [
            (Fake::Fails(StorageErrorKind::NotFound), false),
            (Fake::Fails(StorageErrorKind::Misconfigured), false),
            (Fake::Fails(StorageErrorKind::Rejected), false),
            (Fake::Fails(StorageErrorKind::Unavailable), true),
            // a plain I/O error mid-stream (a dropped connection) is worth another try
            (Fake::Breaks, true),
        ];
        for (fake, retried) in cases {
            let name = format!("{fake:?}");
            let err = read_blocking(Arc::new(fake), "k").await.unwrap_err();
            match Failure::read("reading the file", &err) {
                Failure::Retry(reason) if retried => assert!(reason.starts_with("reading the file: "), "{reason}"),
                Failure::DeadLetter(reason) if !retried => assert!(reason.contains("the fake k"), "{reason}"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_local_object_is_not_found_through_the_blocking_reader() {
        let dir = tempfile::tempdir().unwrap();
        let objects: Arc<dyn ObjectStore> = Arc::new(local::tests::open_in(dir.path()).await);
        let err = read_blocking(objects, "uploads/missing.csv").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(StorageError::in_io(&err).map(StorageError::class), Some(StorageClass::NotFound));
    }
}
