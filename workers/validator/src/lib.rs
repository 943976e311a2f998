//! The validator: consumes `file.uploaded`, streams the object through the CSV contract, and
//! records `validated` (publishing `file.validated`) or `validation_failed` with every row
//! error counted (publishing `file.rejected`).

use async_trait::async_trait;
use std::sync::Arc;
use txpipe_common::csv_schema::{self, ValidationReport};
use txpipe_common::messages::{FileEvent, Stage, FILE_REJECTED, FILE_VALIDATED};
use txpipe_common::metrics::{FileValidated, InternalEvent};
use txpipe_common::status::{FileStatus, StatusRecord, StatusUpdate};
use txpipe_common::storage::{open_blocking, Advance};
use txpipe_common::worker::{read_failure, storage_failure, Handler, Incoming, Outcome};
use txpipe_common::Deps;

/// How long the validator waits for the gateway to confirm an upload it has recorded.
pub const ANNOUNCE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The validator stage.
pub struct Validator {
    deps: Deps,
}

impl Validator {
    pub fn new(deps: Deps) -> Self {
        Self { deps }
    }

    /// The message that follows from where the file now stands: a file already validated or
    /// rejected gets its message again (a crash may have lost it; the id makes it harmless).
    fn follow_up(&self, record: &StatusRecord) -> Vec<txpipe_common::amqp::Outgoing> {
        let mut event = FileEvent::new(record.file_id, record.object_key.clone());
        event.row_count = record.row_count;
        match record.status {
            FileStatus::Validated => vec![self.deps.stage_message(FILE_VALIDATED, &event)],
            // a rejection has its error count; a failure from a dead-lettered message does not
            FileStatus::ValidationFailed if record.error_count.is_some() => {
                event.error_count = record.error_count;
                vec![self.deps.stage_message(FILE_REJECTED, &event)]
            }
            _ => Vec::new(),
        }
    }

    /// The file's record once the gateway has confirmed the upload. The gateway records an
    /// upload before publishing and marks it announced after the broker's confirm; until then
    /// it may still withdraw it (answering 503), so the validator waits for one or the other.
    async fn announced_record(&self, msg: &Incoming) -> Result<StatusRecord, Outcome> {
        let file_id = msg.event.file_id;
        let deadline = tokio::time::Instant::now() + ANNOUNCE_GRACE;
        loop {
            match self.deps.storage.statuses.get(file_id).await {
                Ok(Some(r)) if r.announced => return Ok(r),
                Ok(Some(_)) if tokio::time::Instant::now() >= deadline => {
                    return Err(Outcome::DeadLetter(format!(
                        "the gateway never confirmed the upload of file {file_id} within {ANNOUNCE_GRACE:?}"
                    )))
                }
                Ok(Some(_)) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                Ok(None) => return Err(self.unknown_file(msg).await),
                Err(e) => return Err(storage_failure("reading the file's status", &e)),
            }
        }
    }

    /// A file.uploaded whose file has no status record. The gateway withdraws an upload it
    /// could not announce (it deletes the object, then the record) and answers 503; if the
    /// broker took the message but its confirm was lost, the message still arrives. With the
    /// object gone too, that is such a withdrawn upload: nothing to do. Anything else is an
    /// inconsistency for a person to look at in the DLQ.
    async fn unknown_file(&self, msg: &Incoming) -> Outcome {
        let file_id = msg.event.file_id;
        match self.deps.storage.objects.get(&msg.event.object_key).await {
            Err(txpipe_common::storage::StorageError::NotFound(_)) => {
                tracing::info!(%file_id, "dropping the announcement of an upload the gateway withdrew");
                Outcome::Done(Vec::new())
            }
            Ok(_) => Outcome::DeadLetter(format!(
                "no status record for file {file_id}, though its object {} exists",
                msg.event.object_key
            )),
            Err(e) => storage_failure("checking the object of an unknown file", &e),
        }
    }

    async fn validate(&self, key: &str) -> Result<ValidationReport, Outcome> {
        let objects = self.deps.storage.objects.clone();
        let key = key.to_owned();
        let cap = self.deps.settings.max_reported_errors;
        let handle = tokio::runtime::Handle::current();
        let result =
            tokio::task::spawn_blocking(move || csv_schema::validate(|| open_blocking(&objects, &key, &handle), cap))
                .await
                .map_err(|e| Outcome::Retry(format!("validation task failed: {e}")))?;
        result.map_err(|e| read_failure("reading the uploaded file", &e))
    }
}

#[async_trait]
impl Handler for Validator {
    fn stage(&self) -> Stage {
        Stage::Validator
    }

    async fn handle(&self, msg: &Incoming) -> Outcome {
        let statuses = &self.deps.storage.statuses;
        let file_id = msg.event.file_id;
        let record = match self.announced_record(msg).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        // a validation_failed without row errors failed for a fault, not for its contents:
        // a replayed or retried message tries it again
        let retry = record.status == FileStatus::ValidationFailed && record.error_count.is_none();
        if !(matches!(record.status, FileStatus::Uploaded | FileStatus::Validating) || retry) {
            tracing::info!(%file_id, status = %record.status, "already validated; passing on its result");
            return Outcome::Done(self.follow_up(&record));
        }
        if let Err(e) =
            statuses.advance(file_id, FileStatus::Validating, StatusUpdate::default(), chrono::Utc::now()).await
        {
            return storage_failure("recording status validating", &e);
        }
        let report = match self.validate(&record.object_key).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        let (to, update) = if report.is_valid() {
            (FileStatus::Validated, StatusUpdate { row_count: Some(report.row_count), ..Default::default() })
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
        FileValidated { file_id, rows: report.row_count, errors: report.error_count, status: to }.emit();
        match statuses.advance(file_id, to, update, chrono::Utc::now()).await {
            Ok(Advance::Moved(r) | Advance::Refused(r)) => Outcome::Done(self.follow_up(&r)),
            Err(e) => storage_failure("recording the validation result", &e),
        }
    }
}

/// Runs the validator until `shutdown`: declares its queues, then consumes.
pub async fn run(
    deps: Deps,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), txpipe_common::amqp::AmqpError> {
    let handler = Arc::new(Validator::new(deps.clone()));
    txpipe_common::worker::run(&deps, handler, shutdown).await
}
