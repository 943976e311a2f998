//! The validator: consumes `file.uploaded`, runs the file (the copy a small file's message
//! carries, else the stored object, streamed) through the CSV contract, and
//! records `validated` (publishing `file.validated`) or `validation_failed` with every row
//! error counted (publishing `file.rejected`). The loop in `txpipe_common::worker` does the
//! rest; this crate adds what a message about an unknown (withdrawn) file means, and the check
//! itself.

use async_trait::async_trait;
use bytes::Bytes;
use txpipe_common::csv_schema::{self, ValidationReport};
use txpipe_common::messages::StageMessage;
use txpipe_common::metrics::{InternalEvent, ValidationFinished};
use txpipe_common::stage::Stage;
use txpipe_common::status::{FileStatus, Mode, StatusRecord, StatusUpdate};
use txpipe_common::storage::{open_file_blocking, StorageErrorKind};
use txpipe_common::worker::{Failure, Handler, Passed, Step};
use txpipe_common::Deps;

/// Carried files up to this size are checked on the task that received them (about 0.1 ms
/// of work at most); larger ones on the blocking pool.
const CHECK_IN_PLACE_BYTES: usize = 64 * 1024;

/// The validator stage.
pub struct Validator {
    deps: Deps,
}

impl Validator {
    pub fn new(deps: Deps) -> Self {
        Self { deps }
    }

    /// A file.uploaded whose file has no status record. The gateway withdraws an upload it
    /// could not announce (the record, then the object) and answers 503; if the broker took
    /// the message but its confirm was lost, the message still arrives. With the object gone
    /// too, that is such a withdrawn upload: nothing to do. An object without a record may be
    /// a withdrawal halfway done: tried again; one that stays is an inconsistency for a person
    /// to look at in the DLQ.
    async fn unknown_file(&self, msg: &StageMessage) -> Result<Option<StatusRecord>, Failure> {
        let file_id = msg.file_id();
        match self.deps.storage.objects.get(msg.object_key()).await {
            Err(e) if e.kind() == StorageErrorKind::NotFound => {
                tracing::info!(%file_id, "dropping the announcement of an upload the gateway withdrew");
                Ok(None)
            }
            Ok(_) => Err(Failure::Retry(format!(
                "no status record for file {file_id}, though its object {} exists",
                msg.object_key()
            ))),
            Err(e) => Err(Failure::storage("checking the object of an unknown file", &e)),
        }
    }

    /// Checks the file: the bytes its message carried if any (a small one is checked right
    /// here: it takes less time than a hop to the blocking pool), else the stored object,
    /// streamed on the blocking pool.
    async fn validate(&self, key: &str, carried: Option<Bytes>) -> Result<ValidationReport, Failure> {
        let cap = self.deps.settings.max_reported_errors;
        let result = match carried {
            Some(bytes) if bytes.len() <= CHECK_IN_PLACE_BYTES => csv_schema::validate(|| Ok(&bytes[..]), cap),
            carried => {
                let objects = self.deps.storage.objects.clone();
                let key = key.to_owned();
                let handle = tokio::runtime::Handle::current();
                let open = move || open_file_blocking(&objects, &key, carried.as_ref(), &handle);
                tokio::task::spawn_blocking(move || csv_schema::validate(open, cap))
                    .await
                    .map_err(|e| Failure::Retry(format!("validation task failed: {e}")))?
            }
        };
        result.map_err(|e| Failure::read("reading the uploaded file", &e))
    }
}

#[async_trait]
impl Handler for Validator {
    fn stage(&self) -> Stage {
        Stage::Validator
    }

    /// The file's record, announced or not: the gateway records an upload before publishing
    /// and marks it announced after the broker's confirm, but the message may arrive first.
    /// There is no waiting for that mark: claiming the file marks it announced (atomically, in
    /// the same write), after which the gateway can no longer withdraw it: a gateway whose
    /// confirm failed withdraws the record only while it is unannounced, and otherwise answers
    /// 202 (the file is being processed). A record already withdrawn reads as unknown.
    async fn record(&self, deps: &Deps, msg: &StageMessage) -> Result<Option<StatusRecord>, Failure> {
        match deps.storage.statuses.get(msg.file_id()).await {
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => self.unknown_file(msg).await,
            Err(e) => Err(Failure::storage("reading the file's status", &e)),
        }
    }

    async fn work(&self, msg: &StageMessage, record: &StatusRecord, _passed: Passed) -> Result<Step, Failure> {
        let file_id = record.file_id;
        let report = self.validate(&record.object_key, msg.carried(record)).await?;
        let partial = record.options.mode == Mode::Partial;
        let (to, update) = if report.is_valid() {
            (FileStatus::Validated, StatusUpdate { row_count: Some(report.row_count), ..Default::default() })
        } else if partial && report.has_valid_rows() {
            // partial mode: the valid rows go on; the others are reported and counted
            let update = StatusUpdate {
                row_count: Some(report.row_count),
                error_count: Some(report.error_count),
                rejected_rows: Some(report.rejected_rows),
                errors: Some(report.errors),
                ..Default::default()
            };
            (FileStatus::Validated, update)
        } else {
            let reason = format!(
                "{} problem(s) found in {} row(s); the first: {}",
                report.error_count,
                report.row_count,
                report.errors.first().map(|e| e.message.as_str()).unwrap_or("unknown")
            );
            let update = StatusUpdate {
                row_count: Some(report.row_count),
                error_count: Some(report.error_count),
                errors: Some(report.errors),
                reason: Some(reason),
                ..Default::default()
            };
            (FileStatus::ValidationFailed, update)
        };
        ValidationFinished { file_id, rows: report.row_count, errors: report.error_count, status: to }.emit();
        Ok(Step::Advance(to, update))
    }
}
