//! The AWS adapters: the object store on S3 and both tables on DynamoDB, through the official
//! SDK. They work against AWS and anything that speaks the same APIs (MinIO, LocalStack,
//! DynamoDB Local, moto); the endpoint, region and credentials come from the SDK's own
//! settings (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, profiles, roles...).

use super::listing::{cursor_after, listing_key};
use super::recent::Recent;
use super::{
    decode_cursor, encode_cursor, stale, Advance, ByteStream, Change, FilePage, FileQuery, ObjectReader, ObjectStore,
    StatusStore, StorageError, StorageErrorKind, Transaction, TransactionPage, TransactionStore, VersionRef,
    WriteOutcome,
};
use crate::config::Settings;
use crate::csv_schema::TxStatus;
use crate::file_id::FileId;
use crate::metrics::{InternalEvent, StorageCall};
use crate::names::Names;
use crate::status::{FileStatus, StatusRecord, StatusUpdate, StoredRecord};
use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, KeysAndAttributes, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_types::error::display::DisplayErrorContext;
use backon::BackoffBuilder;
use bytes::BytesMut;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::time::Duration;

/// Keys per BatchGetItem call: DynamoDB's limit.
const BATCH_GET_MAX: usize = 100;
/// Tries of a transaction that DynamoDB cancelled for a concurrent one on the same items.
const TRANSACT_ATTEMPTS: usize = 8;
/// The status table's sparse index of uploads recorded but not yet announced: only such items
/// carry its key attributes ([`UNANNOUNCED_KEY`] = [`UNANNOUNCED_VALUE`], [`UNANNOUNCED_SINCE`]),
/// so the sweeper reads just them, never the whole table.
pub const UNANNOUNCED_INDEX: &str = "unannounced-index";
pub const UNANNOUNCED_KEY: &str = "unannounced";
pub const UNANNOUNCED_VALUE: &str = "1";
/// The attribute the gateway's mark adds to a status item, leaving its `record` and version
/// as they are (see `mark_announced`): the record reads as announced while it is there. The
/// next write of the item (a claim, which announces it) replaces the whole item.
pub const ANNOUNCED_MARK: &str = "announced";
pub const UNANNOUNCED_SINCE: &str = "unannounced_since";
/// The sparse index of files in a working status, for the stuck-file sweep: only such items
/// carry [`WORKING_KEY`] (the status) and [`WORKING_SINCE`] (their last sign of life), so the
/// sweep of one stage reads just the files in flight there.
pub const WORKING_INDEX: &str = "working-index";
pub const WORKING_KEY: &str = "working";
pub const WORKING_SINCE: &str = "working_since";
/// The status table's indexes for `GET /files`, both sparse (only announced files carry their
/// attributes) and keys-only (written once, when a file is announced, not on every status
/// change): by owner ([`OWNER_KEY`] = the key's name) and of every file ([`LISTED_KEY`] =
/// [`LISTED_VALUE`]), each sorted by [`LISTING_KEY`] (`{created_at}#{file_id}`).
pub const OWNER_INDEX: &str = "owner-index";
pub const OWNER_KEY: &str = "owner";
pub const LISTING_INDEX: &str = "listing-index";
pub const LISTED_KEY: &str = "listed";
pub const LISTED_VALUE: &str = "1";
pub const LISTING_KEY: &str = "listed_key";
/// Index pages one listing request reads at most while filtering (by status) to fill a page;
/// past that it answers a shorter page with a cursor.
const LISTING_ROUNDS: usize = 8;
/// Optimistic-concurrency attempts for one status change before giving up (transient).
const STATUS_CAS_ATTEMPTS: usize = 16;

/// Loads the SDK's configuration from its usual sources, with txpipe's call timeouts.
pub async fn load_sdk_config(settings: &Settings) -> SdkConfig {
    let op = Duration::from_millis(settings.aws_operation_timeout_ms);
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(op / 2)
        .operation_timeout(op)
        .build();
    aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts).load().await
}

/// Error codes of throttling and timeouts: they pass on a later try though some come back as
/// 4xx (DynamoDB throttles with 400). The list the SDK's own retry classifier uses.
const RETRYABLE_CODES: [&str; 16] = [
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Error codes that mean the credentials are wrong or lack a permission.
const CREDENTIAL_CODES: [&str; 9] = [
    "AccessDenied",
    "AccessDeniedException",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "MissingAuthenticationToken",
];

const CHECK_CREDENTIALS: &str =
    "check the AWS credentials and their permissions: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or a role";

/// Turns an SDK failure into a [`StorageError`] that says what to do about it, with the SDK
/// error as its source. Callers handle the answers they expect (a missing key, a failed
/// condition) before this; what is left is classified by code and HTTP status.
pub(crate) fn classify<E>(what: &str, err: aws_sdk_s3::error::SdkError<E, HttpResponse>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    use aws_sdk_s3::error::SdkError;
    use StorageErrorKind::{Misconfigured, Rejected, Unavailable};
    let (kind, hint) = match &err {
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or_default();
            let status = ctx.raw().status().as_u16();
            match code {
                "ResourceNotFoundException" | "NoSuchBucket" => {
                    (Misconfigured, Some("the bucket or table does not exist: create it with `txpipe provision`"))
                }
                c if CREDENTIAL_CODES.contains(&c) => (Misconfigured, Some(CHECK_CREDENTIALS)),
                // HEAD answers carry no error code: a bare 403 is a credentials or permissions problem
                "" if status == 403 => (Misconfigured, Some(CHECK_CREDENTIALS)),
                c if RETRYABLE_CODES.contains(&c) => (Unavailable, None),
                // any other client error (a ValidationException...) gets the same answer next time
                _ if (400..500).contains(&status) && !matches!(status, 408 | 429) => (Rejected, None),
                _ => (Unavailable, None),
            }
        }
        SdkError::DispatchFailure(_) if DisplayErrorContext(&err).to_string().contains("credential") => {
            (Misconfigured, Some(CHECK_CREDENTIALS))
        }
        SdkError::ConstructionFailure(_) => {
            (Misconfigured, Some("check AWS_REGION, AWS_ENDPOINT_URL and the credentials"))
        }
        // timeouts, connections refused or cut, unreadable responses
        _ => (Unavailable, None),
    };
    let context = match hint {
        Some(hint) => format!("{what} ({hint})"),
        None => what.to_owned(),
    };
    StorageError::new(kind, context).with_source(err)
}

pub(super) fn is_code<E: ProvideErrorMetadata, R>(err: &aws_sdk_s3::error::SdkError<E, R>, code: &str) -> bool {
    err.as_service_error().and_then(|e| e.code()) == Some(code)
}

/// Counts every request the SDK sends (each retry too: each is billed), by service and
/// operation, as `txpipe_storage_calls_total`.
#[derive(Debug)]
struct CountCalls;

impl aws_smithy_runtime_api::client::interceptors::Intercept for CountCalls {
    fn name(&self) -> &'static str {
        "txpipe-count-calls"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        if let Some(op) = cfg.load::<aws_smithy_runtime_api::client::orchestrator::Metadata>() {
            StorageCall { service: op.service(), operation: op.name() }.emit();
        }
        Ok(())
    }
}

/// Objects in the `{ns}-csv-files` bucket.
pub struct S3ObjectStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    sse: Option<ServerSideEncryption>,
    threshold: u64,
    part_size: usize,
}

impl S3ObjectStore {
    pub fn new(sdk: &SdkConfig, settings: &Settings) -> Self {
        let path_style = settings.s3_force_path_style.unwrap_or(sdk.endpoint_url().is_some());
        let conf = aws_sdk_s3::config::Builder::from(sdk).force_path_style(path_style).interceptor(CountCalls).build();
        Self {
            client: aws_sdk_s3::Client::from_conf(conf),
            bucket: settings.names().bucket(),
            sse: settings.s3_sse.as_deref().map(ServerSideEncryption::from),
            threshold: settings.s3_multipart_threshold_bytes,
            part_size: settings.s3_part_size_bytes as usize,
        }
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Reads from the stream until `want` bytes are buffered or it ends.
    async fn fill(body: &mut ByteStream, buf: &mut BytesMut, want: usize) -> Result<bool, StorageError> {
        while buf.len() < want {
            match body.next().await {
                Some(chunk) => buf.extend_from_slice(&chunk.map_err(StorageError::upload_failed)?),
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    async fn multipart(&self, key: &str, mut buf: BytesMut, mut body: ByteStream) -> Result<u64, StorageError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type("text/csv")
            .set_server_side_encryption(self.sse.clone())
            .send()
            .await
            .map_err(|e| classify("starting a multipart upload", e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let result = async {
            let mut parts = Vec::new();
            let mut size = 0u64;
            loop {
                let more = Self::fill(&mut body, &mut buf, self.part_size).await?;
                if buf.is_empty() {
                    break;
                }
                let take = buf.len().min(self.part_size);
                let part = buf.split_to(take).freeze();
                size += part.len() as u64;
                let number = parts.len() as i32 + 1;
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(part.into())
                    .send()
                    .await
                    .map_err(|e| classify("uploading a part", e))?;
                parts.push(
                    CompletedPart::builder().part_number(number).set_e_tag(out.e_tag().map(str::to_owned)).build(),
                );
                if !more && buf.is_empty() {
                    break;
                }
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
                .map_err(|e| classify("completing a multipart upload", e))?;
            Ok(size)
        }
        .await;
        if result.is_err() {
            // leave no parts behind to be billed for
            let _ =
                self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(&upload_id).send().await;
        }
        result
    }
}

#[async_trait]
impl ObjectStore for S3ObjectStore {
    async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, StorageError> {
        let mut buf = BytesMut::new();
        let threshold = self.threshold as usize;
        if Self::fill(&mut body, &mut buf, threshold + 1).await? {
            return self.multipart(key, buf, body).await;
        }
        let size = buf.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("text/csv")
            .set_server_side_encryption(self.sse.clone())
            .body(buf.freeze().into())
            .send()
            .await
            .map_err(|e| classify("storing the object", e))?;
        Ok(size)
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => Ok(Box::new(Box::pin(out.body.into_async_read()))),
            Err(e) if is_code(&e, "NoSuchKey") => {
                Err(StorageError::not_found(format!("object {key} in bucket {}", self.bucket)).with_source(e))
            }
            Err(e) => Err(classify("reading the object", e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("deleting the object", e))
    }

    async fn check(&self) -> Result<(), StorageError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Err(StorageError::misconfigured(
                format!("the S3 bucket {} does not exist (create it with `txpipe provision`)", self.bucket),
            )
            .with_source(e)),
            Err(e) => Err(classify(&format!("reaching S3 bucket {}", self.bucket), e)),
        }
    }
}

/// Both tables on DynamoDB.
pub struct DynamoStore {
    pub(super) client: aws_sdk_dynamodb::Client,
    status_table: String,
    tx_table: String,
    versions_table: String,
    pub(super) keys_table: String,
    pub(super) idem_table: String,
    /// The status records this process last read or wrote, with their versions: the base of
    /// its next conditional write, so a status change is one request instead of a read and a
    /// write. Never trusted for more: a stale entry only fails the write's condition, whose
    /// answer carries the item as it is (`ReturnValuesOnConditionCheckFailure`).
    known: std::sync::Mutex<Recent<(StatusRecord, u64)>>,
    /// Records that messages carried ([`StoredRecord`]) for files this process does not know:
    /// the base of its next change to each (taken by it), checked by that change's condition.
    carried: std::sync::Mutex<Recent<StoredRecord>>,
    /// Conditional writes of a batch in flight at once (each a TransactWriteItems of up to
    /// [`super::MAX_WRITE`] versions): `TXPIPE_DYNAMODB_WRITE_CONCURRENCY`.
    write_concurrency: usize,
}

/// Where the record a status change starts from came from.
enum Base {
    /// Read from the table (or returned by a refused write): a refusal on it is final.
    Read,
    /// What this process last read or wrote: a write on it is conditional on its version.
    Remembered,
    /// What a message carried ([`StoredRecord`]), with its JSON: a write on it is conditional
    /// on its version and on that exact JSON.
    Carried(String),
}

/// Carried records kept until their claim: a worker holds at most its prefetch of messages
/// (the records' size is bounded too, [`CARRIED_JSON_MAX`]), so a flood of messages from a
/// hostile publisher cannot grow this past a few MB.
const CARRIED_RECORDS: usize = 512;
/// A carried record larger than this is not kept (the claim reads the record instead).
const CARRIED_JSON_MAX: usize = 16 * 1024;

/// A record larger than this as JSON (one carrying row errors, or a long history) is not
/// remembered: its next change reads it instead. Records are bounded only by
/// [`crate::status::MAX_STATUS_RECORD_BYTES`] (256 KB), so 4,096 rejected files full of errors
/// would otherwise hold about a GB; at this size the map holds at most 16 MB.
const KNOWN_JSON_MAX: usize = 4 * 1024;

/// The length of a status item's record JSON (as [`DynamoStore::status_item`] stores it).
fn record_len(item: &HashMap<String, AttributeValue>) -> usize {
    item.get("record").and_then(|v| v.as_s().ok()).map_or(0, String::len)
}

fn sortable_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(super) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(super) fn get_s<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Result<&'a str, StorageError> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
        .ok_or_else(|| StorageError::corrupt(format!("item lacks string attribute {name}")))
}

fn to_item(t: &Transaction) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::from([
        ("transaction_id".into(), s(&t.transaction_id)),
        ("file_id".into(), s(t.file_id.to_string())),
        // a string keeps the exact decimal as written (a DynamoDB number would drop "10.50"'s zero)
        ("amount".into(), s(t.amount.to_string())),
        ("currency".into(), s(&t.currency)),
        ("timestamp".into(), s(t.timestamp.to_rfc3339())),
        ("timestamp_epoch".into(), AttributeValue::N(t.timestamp_epoch.to_string())),
        ("merchant".into(), s(&t.merchant)),
        ("status".into(), s(t.status.as_str())),
        ("processed_at".into(), s(t.processed_at.to_rfc3339())),
    ]);
    item.insert("version".into(), AttributeValue::N(t.version.to_string()));
    if let Some(r) = t.replaces {
        item.insert("replaces_file".into(), s(r.file_id.to_string()));
        item.insert("replaces_version".into(), AttributeValue::N(r.version.to_string()));
    }
    item
}

fn get_n(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    item.get(name).and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok())
}

fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Transaction, StorageError> {
    let corrupt = |what: &str| StorageError::corrupt(format!("transaction {what}"));
    Ok(Transaction {
        transaction_id: get_s(item, "transaction_id")?.to_owned(),
        amount: get_s(item, "amount")?.parse().map_err(|_| corrupt("amount"))?,
        currency: get_s(item, "currency")?.to_owned(),
        timestamp: DateTime::parse_from_rfc3339(get_s(item, "timestamp")?).map_err(|_| corrupt("timestamp"))?,
        timestamp_epoch: item
            .get("timestamp_epoch")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| corrupt("timestamp_epoch"))?,
        merchant: get_s(item, "merchant")?.to_owned(),
        status: TxStatus::parse(get_s(item, "status")?).ok_or_else(|| corrupt("status"))?,
        file_id: get_s(item, "file_id")?.parse().map_err(|_| corrupt("file_id"))?,
        processed_at: DateTime::parse_from_rfc3339(get_s(item, "processed_at")?)
            .map_err(|_| corrupt("processed_at"))?
            .with_timezone(&Utc),
        // rows written before versions existed are first versions
        version: get_n(item, "version").unwrap_or(1),
        replaces: match (item.get("replaces_file"), get_n(item, "replaces_version")) {
            (Some(f), Some(version)) => Some(VersionRef {
                file_id: f.as_s().ok().and_then(|f| f.parse().ok()).ok_or_else(|| corrupt("replaces_file"))?,
                version,
            }),
            _ => None,
        },
    })
}

impl DynamoStore {
    pub fn new(sdk: &SdkConfig, names: &Names, write_concurrency: usize) -> Self {
        Self {
            client: aws_sdk_dynamodb::Client::from_conf(
                aws_sdk_dynamodb::config::Builder::from(sdk).interceptor(CountCalls).build(),
            ),
            status_table: names.status_table(),
            tx_table: names.transactions_table(),
            versions_table: names.transaction_versions_table(),
            keys_table: names.api_keys_table(),
            idem_table: names.idempotency_table(),
            known: std::sync::Mutex::new(Recent::with_capacity(super::recent::KNOWN_RECORDS)),
            carried: std::sync::Mutex::new(Recent::with_capacity(CARRIED_RECORDS)),
            write_concurrency: write_concurrency.max(1),
        }
    }

    pub fn client(&self) -> &aws_sdk_dynamodb::Client {
        &self.client
    }

    /// Remembers `record` at `version` as this process's latest view of its file, unless its
    /// JSON (`json_len` bytes, as in its item: never serialized again here) is too large to
    /// keep ([`KNOWN_JSON_MAX`]).
    fn remember(&self, record: &StatusRecord, version: u64, json_len: usize) {
        if json_len <= KNOWN_JSON_MAX {
            self.known().put(record.file_id, (record.clone(), version));
        } else {
            self.known().forget(record.file_id);
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Recent<(StatusRecord, u64)>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn carried(&self) -> std::sync::MutexGuard<'_, Recent<StoredRecord>> {
        self.carried.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record a message carried for `file_id`, taken: the base of one change.
    fn take_carried(&self, file_id: FileId) -> Option<(StatusRecord, u64, String)> {
        let stored = self.carried().forget(file_id)?;
        let record: StatusRecord = serde_json::from_str(&stored.json).ok()?;
        (record.file_id == file_id).then_some((record, stored.version, stored.json))
    }

    async fn read_status(&self, file_id: FileId) -> Result<Option<(StatusRecord, String)>, StorageError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.status_table)
            .key("file_id", s(file_id.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("reading a status", e))?;
        let Some(item) = out.item else {
            self.known().forget(file_id);
            return Ok(None);
        };
        let (record, version) = self.remember_item(&item)?;
        Ok(Some((record, version.to_string())))
    }

    /// A status item's record and version, remembered (see [`Self::remember`]).
    fn remember_item(&self, item: &HashMap<String, AttributeValue>) -> Result<(StatusRecord, u64), StorageError> {
        let (record, version) = Self::status_of(item)?;
        self.remember(&record, version, record_len(item));
        Ok((record, version))
    }

    /// A status item's record and version.
    fn status_of(item: &HashMap<String, AttributeValue>) -> Result<(StatusRecord, u64), StorageError> {
        Ok((Self::record_of(item)?, get_n(item, "version").unwrap_or(0)))
    }

    /// A status item's record; announced also if the gateway's mark is on the item
    /// ([`ANNOUNCED_MARK`]).
    fn record_of(item: &HashMap<String, AttributeValue>) -> Result<StatusRecord, StorageError> {
        let mut record: StatusRecord = serde_json::from_str(get_s(item, "record")?)
            .map_err(|e| StorageError::corrupt("status record").with_source(e))?;
        record.announced |= item.contains_key(ANNOUNCED_MARK);
        Ok(record)
    }

    fn status_item(record: &StatusRecord, version: u64) -> HashMap<String, AttributeValue> {
        let mut item = HashMap::from([
            ("file_id".into(), s(record.file_id.to_string())),
            ("status".into(), s(record.status.as_str())),
            ("updated_at".into(), s(record.updated_at.to_rfc3339())),
            ("version".into(), AttributeValue::N(version.to_string())),
            ("record".into(), s(serde_json::to_string(record).expect("a status record always serializes"))),
        ]);
        if !record.announced {
            // the sparse index's keys, present only while unannounced (a put without them drops
            // the item from the index); fixed-width UTC times sort as text
            item.insert(UNANNOUNCED_KEY.into(), s(UNANNOUNCED_VALUE));
            item.insert(UNANNOUNCED_SINCE.into(), s(sortable_time(record.created_at)));
        } else {
            // the listing indexes' keys: an upload is listed once it is announced (accepted)
            item.insert(LISTED_KEY.into(), s(LISTED_VALUE));
            item.insert(LISTING_KEY.into(), s(listing_key(record)));
            if let Some(owner) = &record.uploaded_by {
                item.insert(OWNER_KEY.into(), s(owner));
            }
        }
        if record.status.is_working() {
            item.insert(WORKING_KEY.into(), s(record.status.as_str()));
            item.insert(WORKING_SINCE.into(), s(sortable_time(record.last_sign_of_life())));
        }
        item
    }

    /// A put of `t` into `table`, on the condition that the table's current version of the
    /// item is `expected` (none: no such item). Rows from before versions carry no version:
    /// they are first versions.
    fn put(table: &str, t: &Transaction, expected: Option<Option<VersionRef>>) -> Put {
        let put = Put::builder().table_name(table).set_item(Some(to_item(t)));
        match expected {
            None => put,
            Some(None) => put.condition_expression("attribute_not_exists(transaction_id)"),
            Some(Some(r)) => {
                let version = if r.version == 1 { "(#v = :v OR attribute_not_exists(#v))" } else { "#v = :v" };
                put.condition_expression(format!("file_id = :f AND {version}"))
                    .expression_attribute_names("#v", "version")
                    .expression_attribute_values(":f", s(r.file_id.to_string()))
                    .expression_attribute_values(":v", AttributeValue::N(r.version.to_string()))
            }
        }
        .build()
        .expect("table and item are set")
    }

    /// One TransactWriteItems of at most [`super::MAX_WRITE`] versions: each version into the
    /// versions table, and into the transactions table on the condition of what it replaces.
    async fn write_chunk(&self, versions: &[Transaction]) -> Result<WriteOutcome, StorageError> {
        debug_assert!(versions.len() <= super::MAX_WRITE);
        let items: Vec<TransactWriteItem> = versions
            .iter()
            .flat_map(|v| {
                [
                    TransactWriteItem::builder().put(Self::put(&self.versions_table, v, None)).build(),
                    TransactWriteItem::builder().put(Self::put(&self.tx_table, v, Some(v.replaces))).build(),
                ]
            })
            .collect();
        let mut backoff = contention_backoff();
        loop {
            match self.client.transact_write_items().set_transact_items(Some(items.clone())).send().await {
                Ok(_) => return Ok(WriteOutcome::Written),
                Err(e) if is_code(&e, "TransactionCanceledException") => {
                    // a condition failed, or another transaction held an item: read what is there
                    let ids: Vec<String> = versions.iter().map(|v| v.transaction_id.clone()).collect();
                    let refused = stale(versions, &self.current(&ids).await?);
                    if !refused.is_empty() {
                        return Ok(WriteOutcome::Stale(refused));
                    }
                    let Some(wait) = backoff.next() else {
                        return Err(classify("writing transactions (kept colliding with other writes)", e));
                    };
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(classify("writing transactions", e)),
            }
        }
    }

    /// Reads one item by its key, consistently.
    async fn get_item(
        &self,
        table: &str,
        key: HashMap<String, AttributeValue>,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StorageError> {
        let out = self
            .client
            .get_item()
            .table_name(table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("reading a transaction", e))?;
        Ok(out.item)
    }

    fn version_key(file_id: FileId, id: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([("file_id".to_owned(), s(file_id.to_string())), ("transaction_id".to_owned(), s(id))])
    }

    /// Changes a status record with optimistic concurrency: the write lands only if nobody
    /// changed the item since this process last saw it (a condition on its version). The base
    /// is the record this process last read or wrote, if it has one (then a status change is
    /// one request), else a consistent read. A failed condition answers with the item as it is
    /// now, the base of the next try; a change refused on a remembered record is tried again on
    /// a fresh read, so a refusal is always about the record as it is.
    async fn modify(
        &self,
        file_id: FileId,
        change: impl Fn(&mut StatusRecord) -> bool,
    ) -> Result<Advance, StorageError> {
        let not_found = || StorageError::not_found(format!("file {file_id}"));
        // the base: the record as this process last saw it, else as a message carried it, else
        // as read; a refusal or a not-found is only concluded on a record read
        let mut base = match self.known().get(file_id) {
            Some((r, v)) => Some((r, v, Base::Remembered)),
            None => self.take_carried(file_id).map(|(r, v, json)| (r, v, Base::Carried(json))),
        };
        for _ in 0..STATUS_CAS_ATTEMPTS {
            let (mut record, version, seen) = match base.take() {
                Some(b) => b,
                None => {
                    let (r, v) = self.read_status(file_id).await?.ok_or_else(not_found)?;
                    (r, v.parse().unwrap_or(0), Base::Read)
                }
            };
            let remembered = !matches!(seen, Base::Read);
            if !change(&mut record) {
                if remembered {
                    continue;
                }
                return Ok(Advance::Refused(record));
            }
            // a whole-item put of a record left unannounced would drop the gateway's separate
            // mark: not made on a carried record (only the validator's claim is, and it announces)
            if matches!(seen, Base::Carried(_)) && !record.announced {
                continue;
            }
            // saturating: a version is only ever compared, and a carried one is client input (a
            // forged u64::MAX must not overflow; its write is refused like any forged copy)
            let next = version.saturating_add(1);
            let item = Self::status_item(&record, next);
            let json_len = record_len(&item);
            let mut put = self
                .client
                .put_item()
                .table_name(&self.status_table)
                .set_item(Some(item))
                .condition_expression(if matches!(seen, Base::Carried(_)) { "#v = :v AND #r = :r" } else { "#v = :v" })
                .expression_attribute_names("#v", "version")
                .expression_attribute_values(":v", AttributeValue::N(version.to_string()))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
            if let Base::Carried(json) = seen {
                // the copy is checked whole: its exact JSON joins the version in the condition
                put = put.expression_attribute_names("#r", "record").expression_attribute_values(":r", s(json));
            }
            let result = put.send().await;
            match result {
                Ok(_) => {
                    self.remember(&record, next, json_len);
                    return Ok(Advance::Moved(record));
                }
                Err(e) if is_code(&e, "ConditionalCheckFailedException") => {
                    // the item as it is now came with the refusal (none: it is gone)
                    let now = match e.into_service_error() {
                        PutItemError::ConditionalCheckFailedException(c) => c.item,
                        _ => None,
                    };
                    match now {
                        Some(item) => {
                            let (r, v) = self.remember_item(&item)?;
                            base = Some((r, v, Base::Read));
                        }
                        None => {
                            self.known().forget(file_id);
                            if !remembered {
                                return Err(not_found());
                            }
                        }
                    }
                }
                Err(e) => return Err(classify("changing a status", e)),
            }
        }
        Err(StorageError::unavailable(format!("status of file {file_id} kept changing under us")))
    }

    /// Status records by id, in one BatchGetItem per 100 ids (unprocessed keys asked again);
    /// ids without a record are left out.
    async fn statuses_by_id(&self, ids: &[String]) -> Result<HashMap<String, StatusRecord>, StorageError> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(100) {
            let keys = chunk.iter().map(|id| HashMap::from([("file_id".to_owned(), s(id))])).collect::<Vec<_>>();
            let mut pending = Some(
                aws_sdk_dynamodb::types::KeysAndAttributes::builder()
                    .set_keys(Some(keys))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| StorageError::misconfigured("building a batch read").with_source(e))?,
            );
            let mut tries = 0;
            while let Some(ask) = pending.take() {
                tries += 1;
                let got = self
                    .client
                    .batch_get_item()
                    .request_items(&self.status_table, ask)
                    .send()
                    .await
                    .map_err(|e| classify("reading statuses", e))?;
                for item in got.responses.and_then(|mut r| r.remove(&self.status_table)).unwrap_or_default() {
                    let record = Self::record_of(&item)?;
                    out.insert(record.file_id.to_string(), record);
                }
                pending = got.unprocessed_keys.and_then(|mut u| u.remove(&self.status_table));
                if pending.is_some() {
                    if tries >= 10 {
                        return Err(StorageError::unavailable("DynamoDB kept status reads unprocessed (throttled?)"));
                    }
                    tokio::time::sleep(Duration::from_millis(50 * tries)).await;
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn describe(&self, table: &str) -> Result<(), StorageError> {
        match self.client.describe_table().table_name(table).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "ResourceNotFoundException") => Err(StorageError::misconfigured(format!(
                "the DynamoDB table {table} does not exist (create it with `txpipe provision`)"
            ))
            .with_source(e)),
            Err(e) => Err(classify(&format!("reaching DynamoDB table {table}"), e)),
        }
    }
}

#[async_trait]
impl StatusStore for DynamoStore {
    async fn create(&self, record: &StatusRecord) -> Result<(), StorageError> {
        let item = Self::status_item(record, 1);
        let json_len = record_len(&item);
        match self
            .client
            .put_item()
            .table_name(&self.status_table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(file_id)")
            .send()
            .await
        {
            Ok(_) => {
                self.remember(record, 1, json_len);
                Ok(())
            }
            Err(e) if is_code(&e, "ConditionalCheckFailedException") => {
                Err(StorageError::already_exists(format!("file {}", record.file_id)))
            }
            Err(e) => Err(classify("recording a new file", e)),
        }
    }

    async fn get(&self, file_id: FileId) -> Result<Option<StatusRecord>, StorageError> {
        Ok(self.read_status(file_id).await?.map(|(r, _)| r))
    }

    async fn advance(
        &self,
        file_id: FileId,
        to: FileStatus,
        update: StatusUpdate,
        at: DateTime<Utc>,
    ) -> Result<Advance, StorageError> {
        self.modify(file_id, |r| r.advance(to, update.clone(), at)).await
    }

    async fn mark_announced(&self, file_id: FileId) -> Result<(), StorageError> {
        // a file once announced stays announced: if this process saw the mark made (a validator
        // in it claimed the file first), there is nothing to write or read
        let Some((record, version)) = self.known().get(file_id) else {
            return self.modify(file_id, |r| !std::mem::replace(&mut r.announced, true)).await.map(|_| ());
        };
        if record.announced {
            return Ok(());
        }
        // The mark races the validator's claim, which marks too. So that neither has to try
        // again, the mark leaves the record and its version alone: it adds the
        // [`ANNOUNCED_MARK`] attribute and the listing indexes' keys and drops the unannounced
        // index's, on the condition that the item is still the version this gateway recorded.
        // A claim on that version then still lands (and writes the item whole, announced); a
        // mark after the claim finds another version: refused, with the item, announced.
        let mut update = String::from("SET #m = :t, #lk = :lv, #lsk = :lsk REMOVE #uk, #us");
        let mut ask = self
            .client
            .update_item()
            .table_name(&self.status_table)
            .key("file_id", s(file_id.to_string()))
            .condition_expression("#v = :v")
            .expression_attribute_names("#v", "version")
            .expression_attribute_names("#m", ANNOUNCED_MARK)
            .expression_attribute_names("#lk", LISTED_KEY)
            .expression_attribute_names("#lsk", LISTING_KEY)
            .expression_attribute_names("#uk", UNANNOUNCED_KEY)
            .expression_attribute_names("#us", UNANNOUNCED_SINCE)
            .expression_attribute_values(":v", AttributeValue::N(version.to_string()))
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .expression_attribute_values(":lv", s(LISTED_VALUE))
            .expression_attribute_values(":lsk", s(listing_key(&record)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if let Some(owner) = &record.uploaded_by {
            update = update.replacen(" REMOVE", ", #ow = :ow REMOVE", 1);
            ask = ask.expression_attribute_names("#ow", OWNER_KEY).expression_attribute_values(":ow", s(owner));
        }
        match ask.update_expression(update).send().await {
            Ok(_) => {
                let mut marked = record;
                marked.announced = true;
                // it was remembered, so it is small enough, and marking does not grow its JSON
                self.known().put(file_id, (marked, version));
                Ok(())
            }
            Err(e) if is_code(&e, "ConditionalCheckFailedException") => {
                let now = match e.into_service_error() {
                    UpdateItemError::ConditionalCheckFailedException(c) => c.item,
                    _ => None,
                };
                let Some(item) = now else {
                    self.known().forget(file_id);
                    return Err(StorageError::not_found(format!("file {file_id}")));
                };
                let (r, _) = self.remember_item(&item)?;
                // changed since it was recorded: by a claim, which announced it, or else (by
                // nothing this gateway knows of) marked the usual way
                if r.announced {
                    Ok(())
                } else {
                    self.modify(file_id, |r| !std::mem::replace(&mut r.announced, true)).await.map(|_| ())
                }
            }
            Err(e) => Err(classify("marking an upload announced", e)),
        }
    }

    async fn withdraw(&self, file_id: FileId) -> Result<bool, StorageError> {
        for _ in 0..STATUS_CAS_ATTEMPTS {
            let Some((record, version)) = self.read_status(file_id).await? else { return Ok(false) };
            if record.announced {
                return Ok(false);
            }
            let result = self
                .client
                .delete_item()
                .table_name(&self.status_table)
                .key("file_id", s(file_id.to_string()))
                // the mark leaves the version as it is: check for it too
                .condition_expression("#v = :v AND attribute_not_exists(#m)")
                .expression_attribute_names("#v", "version")
                .expression_attribute_names("#m", ANNOUNCED_MARK)
                .expression_attribute_values(":v", AttributeValue::N(version))
                .send()
                .await;
            match result {
                Ok(_) => {
                    self.known().forget(file_id);
                    return Ok(true);
                }
                Err(e) if is_code(&e, "ConditionalCheckFailedException") => continue,
                Err(e) => return Err(classify("withdrawing a file", e)),
            }
        }
        Err(StorageError::unavailable(format!("status of file {file_id} kept changing under us")))
    }

    async fn unannounced(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<FileId>, StorageError> {
        let out = self
            .client
            .query()
            .table_name(&self.status_table)
            .index_name(UNANNOUNCED_INDEX)
            .key_condition_expression("#k = :k AND #t < :t")
            .expression_attribute_names("#k", UNANNOUNCED_KEY)
            .expression_attribute_names("#t", UNANNOUNCED_SINCE)
            .expression_attribute_values(":k", s(UNANNOUNCED_VALUE))
            .expression_attribute_values(":t", s(sortable_time(before)))
            .limit(limit.clamp(1, 1000) as i32)
            .send()
            .await
            .map_err(|e| classify("listing unannounced uploads", e))?;
        out.items()
            .iter()
            .map(|item| {
                get_s(item, "file_id")?.parse().map_err(|_| StorageError::corrupt("a file_id in the status table"))
            })
            .collect()
    }

    async fn update(&self, file_id: FileId, change: Change) -> Result<Advance, StorageError> {
        self.modify(file_id, |r| change(r)).await
    }

    fn remembered(&self, file_id: FileId) -> Option<StatusRecord> {
        self.known().get(file_id).map(|(r, _)| r)
    }

    fn stored(&self, file_id: FileId) -> Option<StoredRecord> {
        let (record, version) = self.known().get(file_id)?;
        let json = serde_json::to_string(&record).ok()?;
        Some(StoredRecord { version, json })
    }

    fn hint(&self, file_id: FileId, stored: StoredRecord) {
        // a record this process knows is the better base (one it wrote or read itself)
        if stored.json.len() <= CARRIED_JSON_MAX && !self.known().contains(file_id) {
            self.carried().put(file_id, stored);
        }
    }

    async fn stalled(
        &self,
        status: FileStatus,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<FileId>, StorageError> {
        let out = self
            .client
            .query()
            .table_name(&self.status_table)
            .index_name(WORKING_INDEX)
            .key_condition_expression("#k = :k AND #t < :t")
            .expression_attribute_names("#k", WORKING_KEY)
            .expression_attribute_names("#t", WORKING_SINCE)
            .expression_attribute_values(":k", s(status.as_str()))
            .expression_attribute_values(":t", s(sortable_time(before)))
            .limit(limit.clamp(1, 1000) as i32)
            .send()
            .await
            .map_err(|e| {
                let missing = is_code(&e, "ValidationException");
                let err = classify("listing files stalled in a working status", e);
                if missing {
                    StorageError::misconfigured(format!(
                        "the status table has no index {WORKING_INDEX} (an older txpipe made it): run `txpipe provision`"
                    ))
                    .with_source(err)
                } else {
                    err
                }
            })?;
        out.items()
            .iter()
            .map(|item| {
                get_s(item, "file_id")?.parse().map_err(|_| StorageError::corrupt("a file_id in the status table"))
            })
            .collect()
    }

    async fn list(&self, query: &FileQuery) -> Result<FilePage, StorageError> {
        let (index, hash, value) = match &query.owner {
            Some(owner) => (OWNER_INDEX, OWNER_KEY, owner.as_str()),
            None => (LISTING_INDEX, LISTED_KEY, LISTED_VALUE),
        };
        // the cursor is the listing key of the last file shown: the index item to start after
        let mut start = query.after()?.map(|key| {
            let id = key.rsplit_once('#').map(|(_, id)| id.to_owned()).unwrap_or_default();
            HashMap::from([
                ("file_id".to_owned(), s(id)),
                (hash.to_owned(), s(value)),
                (LISTING_KEY.to_owned(), s(key)),
            ])
        });
        let limit = query.limit.clamp(1, 1000);
        let mut items = Vec::new();
        let mut more = false;
        for _ in 0..LISTING_ROUNDS {
            let mut ask = self
                .client
                .query()
                .table_name(&self.status_table)
                .index_name(index)
                .expression_attribute_names("#h", hash)
                .expression_attribute_values(":h", s(value))
                .scan_index_forward(false)
                .limit((limit + 1 - items.len()) as i32)
                .set_exclusive_start_key(start.take());
            ask = match query.since_key() {
                Some(since) => ask
                    .key_condition_expression("#h = :h AND #k >= :since")
                    .expression_attribute_names("#k", LISTING_KEY)
                    .expression_attribute_values(":since", s(since)),
                None => ask.key_condition_expression("#h = :h"),
            };
            let out = ask.send().await.map_err(|e| classify("listing files", e))?;
            let ids = out
                .items()
                .iter()
                .map(|item| get_s(item, "file_id").map(str::to_owned))
                .collect::<Result<Vec<_>, _>>()?;
            let mut found = self.statuses_by_id(&ids).await?;
            items.extend(ids.iter().filter_map(|id| found.remove(id)).filter(|r| query.admits(r)));
            start = out.last_evaluated_key;
            more = start.is_some();
            if items.len() > limit || !more {
                break;
            }
        }
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(cursor_after)
        } else if more {
            // the rounds ran out while filtering: go on from the last index item read
            match &start {
                Some(k) => Some(encode_cursor(get_s(k, LISTING_KEY)?)),
                None => None,
            }
        } else {
            None
        };
        Ok(FilePage { items, next_cursor })
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.describe(&self.status_table).await
    }
}

/// Backoff between tries of a DynamoDB transaction that collided with another.
fn contention_backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(TRANSACT_ATTEMPTS)
        .with_jitter()
        .build()
}

#[async_trait]
impl TransactionStore for DynamoStore {
    async fn current(&self, ids: &[String]) -> Result<Vec<Transaction>, StorageError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH_GET_MAX) {
            let mut keys: Vec<HashMap<String, AttributeValue>> =
                chunk.iter().map(|id| HashMap::from([("transaction_id".to_owned(), s(id))])).collect();
            let mut backoff = contention_backoff();
            while !keys.is_empty() {
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut keys)))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| StorageError::misconfigured("building a read").with_source(e))?;
                let got = self
                    .client
                    .batch_get_item()
                    .request_items(&self.tx_table, request)
                    .send()
                    .await
                    .map_err(|e| classify("reading transactions", e))?;
                for item in got.responses.as_ref().and_then(|r| r.get(&self.tx_table)).into_iter().flatten() {
                    out.push(from_item(item)?);
                }
                keys =
                    got.unprocessed_keys.and_then(|mut u| u.remove(&self.tx_table)).map(|k| k.keys).unwrap_or_default();
                if !keys.is_empty() {
                    let wait = backoff.next().ok_or_else(|| {
                        StorageError::unavailable("DynamoDB kept transactions unread after retries (throttled?)")
                    })?;
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok(out)
    }

    async fn write(&self, versions: &[Transaction]) -> Result<WriteOutcome, StorageError> {
        let chunks: Vec<Vec<Transaction>> = versions.chunks(super::MAX_WRITE).map(<[_]>::to_vec).collect();
        let outcomes: Vec<WriteOutcome> = futures::stream::iter(chunks)
            .map(|chunk| async move { self.write_chunk(&chunk).await })
            .buffered(self.write_concurrency)
            .try_collect()
            .await?;
        let mut refused = Vec::new();
        for o in outcomes {
            if let WriteOutcome::Stale(s) = o {
                refused.extend(s);
            }
        }
        // a call over MAX_WRITE may be written in part: the caller sees which ids were refused
        Ok(if refused.is_empty() { WriteOutcome::Written } else { WriteOutcome::Stale(refused) })
    }

    async fn revert(&self, file_id: FileId, transaction_id: &str) -> Result<(), StorageError> {
        let Some(mine) = self.version(file_id, transaction_id).await? else { return Ok(()) };
        let earlier = match mine.replaces {
            Some(r) => self.version(r.file_id, transaction_id).await?,
            None => None,
        };
        let current_key = HashMap::from([("transaction_id".to_owned(), s(transaction_id))]);
        let forget = Delete::builder()
            .table_name(&self.versions_table)
            .set_key(Some(Self::version_key(file_id, transaction_id)));
        let (cond_names, cond_values) = (
            HashMap::from([("#v".to_owned(), "version".to_owned())]),
            HashMap::from([
                (":f".to_owned(), s(file_id.to_string())),
                (":v".to_owned(), AttributeValue::N(mine.version.to_string())),
            ]),
        );
        let restore = match &earlier {
            Some(e) => TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.tx_table)
                        .set_item(Some(to_item(e)))
                        .condition_expression("file_id = :f AND #v = :v")
                        .set_expression_attribute_names(Some(cond_names))
                        .set_expression_attribute_values(Some(cond_values))
                        .build()
                        .expect("table and item are set"),
                )
                .build(),
            None => TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.tx_table)
                        .set_key(Some(current_key))
                        .condition_expression("file_id = :f AND (#v = :v OR attribute_not_exists(#v))")
                        .set_expression_attribute_names(Some(cond_names))
                        .set_expression_attribute_values(Some(cond_values))
                        .build()
                        .expect("table and key are set"),
                )
                .build(),
        };
        let both = [restore, TransactWriteItem::builder().delete(forget.clone().build().expect("key set")).build()];
        let mut backoff = contention_backoff();
        loop {
            match self.client.transact_write_items().set_transact_items(Some(both.to_vec())).send().await {
                Ok(_) => return Ok(()),
                Err(e) if is_code(&e, "TransactionCanceledException") => {
                    let current = self.current(&[transaction_id.to_owned()]).await?;
                    if current.first().map(Transaction::version_ref) != Some(mine.version_ref()) {
                        // not current (any more): only the file's own version is left to forget
                        let key = Self::version_key(file_id, transaction_id);
                        self.client
                            .delete_item()
                            .table_name(&self.versions_table)
                            .set_key(Some(key))
                            .send()
                            .await
                            .map_err(|e| classify("forgetting a transaction version", e))?;
                        return Ok(());
                    }
                    let Some(wait) = backoff.next() else {
                        return Err(classify("reverting a transaction (kept colliding with other writes)", e));
                    };
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(classify("reverting a transaction", e)),
            }
        }
    }

    async fn version(&self, file_id: FileId, transaction_id: &str) -> Result<Option<Transaction>, StorageError> {
        let item = self.get_item(&self.versions_table, Self::version_key(file_id, transaction_id)).await?;
        item.as_ref().map(from_item).transpose()
    }

    async fn list_by_file(
        &self,
        file_id: FileId,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<TransactionPage, StorageError> {
        let start = cursor.map(decode_cursor).transpose()?.map(|after| Self::version_key(file_id, &after));
        let out = self
            .client
            .query()
            .table_name(&self.versions_table)
            .key_condition_expression("file_id = :f")
            .expression_attribute_values(":f", s(file_id.to_string()))
            .limit(limit.clamp(1, 1000) as i32)
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| match e {
                e if is_code(&e, "ValidationException") && cursor.is_some() => {
                    StorageError::invalid_cursor().with_source(e)
                }
                e => classify("listing transactions", e),
            })?;
        let items = out.items().iter().map(from_item).collect::<Result<Vec<_>, _>>()?;
        let next_cursor = match out.last_evaluated_key() {
            Some(k) => Some(encode_cursor(get_s(k, "transaction_id")?)),
            None => None,
        };
        Ok(TransactionPage { items, next_cursor })
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.describe(&self.tx_table).await?;
        self.describe(&self.versions_table).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn tx(id: &str) -> Transaction {
        let ts = DateTime::parse_from_rfc3339("2024-01-15T10:30:00Z").unwrap();
        Transaction {
            transaction_id: id.into(),
            amount: Decimal::new(1050, 2),
            currency: "USD".into(),
            timestamp: ts,
            timestamp_epoch: ts.timestamp(),
            merchant: "m".into(),
            status: TxStatus::Completed,
            file_id: FileId::new(),
            processed_at: Utc::now(),
            version: 1,
            replaces: None,
        }
    }

    #[tokio::test]
    async fn a_record_too_large_to_keep_is_not_remembered_and_its_older_copy_is_forgotten() {
        let sdk = SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .build();
        let store = DynamoStore::new(&sdk, &Names::new("unit").unwrap(), 1);
        let mut r = StatusRecord::uploaded(FileId::new(), "uploads/x.csv".into(), 1, Utc::now());
        store.remember(&r, 1, serde_json::to_string(&r).unwrap().len());
        assert_eq!(store.known().get(r.file_id).map(|(_, v)| v), Some(1));
        r.errors = (1..=100)
            .map(|row| crate::csv_schema::RowError { row, column: Some("amount".into()), message: "x".repeat(200) })
            .collect();
        let json_len = serde_json::to_string(&r).unwrap().len();
        assert!(json_len > KNOWN_JSON_MAX);
        store.remember(&r, 2, json_len);
        assert!(!store.known().contains(r.file_id), "a stale version 1 would fail the next write's condition");
    }

    /// `classify` of a service's answer with this code and HTTP status.
    fn answer(code: &str, status: u16) -> StorageError {
        use aws_sdk_dynamodb::operation::get_item::GetItemError;
        let meta = aws_smithy_types::error::ErrorMetadata::builder().code(code).message("the service says").build();
        let raw = HttpResponse::new(status.try_into().unwrap(), aws_smithy_types::body::SdkBody::empty());
        classify("reading a status", aws_sdk_s3::error::SdkError::service_error(GetItemError::generic(meta), raw))
    }

    #[test]
    fn service_answers_are_classified_by_code_then_status() {
        use StorageErrorKind::*;
        let cases = [
            ("ValidationException", 400, Rejected),
            ("SerializationException", 400, Rejected),
            ("", 404, Rejected),
            // DynamoDB throttles with 400: still worth another try
            ("ProvisionedThroughputExceededException", 400, Unavailable),
            ("ThrottlingException", 400, Unavailable),
            ("SlowDown", 503, Unavailable),
            ("", 429, Unavailable),
            ("InternalServerError", 500, Unavailable),
            ("", 502, Unavailable),
            ("ResourceNotFoundException", 400, Misconfigured),
            ("NoSuchBucket", 404, Misconfigured),
            ("AccessDeniedException", 400, Misconfigured),
            ("", 403, Misconfigured),
        ];
        for (code, status, kind) in cases {
            let e = answer(code, status);
            assert_eq!(e.kind(), kind, "{code} {status}: {e}");
            assert!(std::error::Error::source(&e).is_some(), "the SDK error is kept");
        }
        let e = answer("UnrecognizedClientException", 400);
        assert!(e.to_string().contains("check the AWS credentials"), "{e}");
        assert!(answer("ResourceNotFoundException", 400).to_string().contains("txpipe provision"));
    }

    #[test]
    fn a_timeout_is_transient() {
        let err: aws_sdk_s3::error::SdkError<aws_sdk_dynamodb::operation::get_item::GetItemError, HttpResponse> =
            aws_sdk_s3::error::SdkError::timeout_error(std::io::Error::other("too slow"));
        assert_eq!(classify("reading a status", err).kind(), StorageErrorKind::Unavailable);
    }

    #[test]
    fn items_round_trip_with_exact_amounts() {
        let t = tx("x");
        let back = from_item(&to_item(&t)).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.amount.to_string(), "10.50");
        let later = tx("x").replacing(&t);
        assert_eq!(from_item(&to_item(&later)).unwrap(), later, "a later version keeps what it replaced");
        let mut old = to_item(&t);
        old.remove("version");
        assert_eq!(from_item(&old).unwrap().version, 1, "rows from before versions are first versions");
    }
}
