//! The transformer: consumes `file.validated`, streams the object again and writes every row
//! to the transactions table in batches (keyed by transaction_id, so a repeat overwrites the
//! same rows), then records `processed` and publishes `file.processed`.

use async_trait::async_trait;
use std::sync::Arc;
use tokio::sync::mpsc;
use txpipe_common::amqp::Outgoing;
use txpipe_common::csv_schema::{ErrorLog, ScanError, Scanner};
use txpipe_common::messages::{FileEvent, FileId, Stage, FILE_PROCESSED};
use txpipe_common::metrics::{InternalEvent, RowsStored};
use txpipe_common::status::{FileStatus, StatusRecord, StatusUpdate};
use txpipe_common::storage::{open_blocking, Advance, Transaction};
use txpipe_common::worker::{read_failure, status_of, storage_failure, Handler, Incoming, Outcome};
use txpipe_common::Deps;

/// The transformer stage.
pub struct Transformer {
    deps: Deps,
}

/// Why reading rows stopped early.
enum ReadError {
    Io(std::io::Error),
    /// The object no longer passes the contract it passed in validation.
    Invalid(String),
}

impl Transformer {
    pub fn new(deps: Deps) -> Self {
        Self { deps }
    }

    fn follow_up(&self, record: &StatusRecord) -> Vec<Outgoing> {
        if record.status != FileStatus::Processed {
            return Vec::new();
        }
        let mut event = FileEvent::new(record.file_id, record.object_key.clone());
        event.row_count = record.row_count;
        event.records_processed = record.records_processed;
        vec![self.deps.stage_message(FILE_PROCESSED, &event)]
    }

    /// Streams the object on the blocking pool, sending batches to this task, which writes them.
    async fn store_rows(&self, file_id: FileId, key: &str) -> Result<u64, Outcome> {
        let (tx, mut rx) = mpsc::channel::<Vec<Transaction>>(2);
        let objects = self.deps.storage.objects.clone();
        let key = key.to_owned();
        let batch_size = self.deps.settings.batch_size;
        let handle = tokio::runtime::Handle::current();
        let reader = tokio::task::spawn_blocking(move || -> Result<(), ReadError> {
            let source = open_blocking(&objects, &key, &handle).map_err(ReadError::Io)?;
            let mut scanner = match Scanner::new(source) {
                Ok(s) => s,
                Err(ScanError::Io(e)) => return Err(ReadError::Io(e)),
                Err(ScanError::Header(errors)) => {
                    return Err(ReadError::Invalid(format!("the header no longer passes: {}", errors[0].message)))
                }
            };
            let now = chrono::Utc::now();
            let mut log = ErrorLog::new(1);
            let mut batch = Vec::with_capacity(batch_size);
            while scanner.advance().map_err(ReadError::Io)? {
                let Some(row) = scanner.parse(&mut log) else {
                    let (errors, _) = log.into_parts();
                    return Err(ReadError::Invalid(format!(
                        "row {} no longer passes: {}",
                        scanner.row(),
                        errors[0].message
                    )));
                };
                batch.push(Transaction::from_row(&row, file_id, now));
                if batch.len() == batch_size
                    && tx.blocking_send(std::mem::replace(&mut batch, Vec::with_capacity(batch_size))).is_err()
                {
                    return Ok(()); // the writer stopped; its error is the one to report
                }
            }
            if let Some(e) = scanner.too_long() {
                return Err(ReadError::Invalid(format!("row {} no longer passes: {}", e.row, e.message)));
            }
            if !batch.is_empty() {
                let _ = tx.blocking_send(batch);
            }
            Ok(())
        });
        let mut written = 0u64;
        let mut write_error = None;
        while let Some(batch) = rx.recv().await {
            if let Err(e) = self.deps.storage.transactions.put_batch(&batch).await {
                write_error = Some(e);
                break;
            }
            written += batch.len() as u64;
        }
        drop(rx);
        let read = reader.await.map_err(|e| Outcome::Retry(format!("reading task failed: {e}")))?;
        if let Some(e) = write_error {
            return Err(storage_failure("writing transactions", &e));
        }
        match read {
            Ok(()) => Ok(written),
            Err(ReadError::Io(e)) => Err(read_failure("reading the validated file", &e)),
            Err(ReadError::Invalid(why)) => {
                Err(Outcome::DeadLetter(format!("the stored file changed after validation: {why}")))
            }
        }
    }
}

#[async_trait]
impl Handler for Transformer {
    fn stage(&self) -> Stage {
        Stage::Transformer
    }

    async fn handle(&self, msg: &Incoming) -> Outcome {
        let statuses = &self.deps.storage.statuses;
        let file_id = msg.event.file_id;
        let record = match status_of(&self.deps, file_id).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        match record.status {
            // processing_failed: a replayed or retried message tries again
            FileStatus::Validated | FileStatus::Processing | FileStatus::ProcessingFailed => {}
            s if s.is_at_or_past(FileStatus::Processed) || s.is_final() => {
                tracing::info!(%file_id, status = %s, "already processed; passing on its result");
                return Outcome::Done(self.follow_up(&record));
            }
            s => {
                return Outcome::DeadLetter(format!("file {file_id} is {s}, not validated: refusing to store its rows"))
            }
        }
        if let Err(e) =
            statuses.advance(file_id, FileStatus::Processing, StatusUpdate::default(), chrono::Utc::now()).await
        {
            return storage_failure("recording status processing", &e);
        }
        let written = match self.store_rows(file_id, &record.object_key).await {
            Ok(n) => n,
            Err(outcome) => return outcome,
        };
        RowsStored { file_id, rows: written }.emit();
        let update = StatusUpdate { records_processed: Some(written), ..Default::default() };
        match statuses.advance(file_id, FileStatus::Processed, update, chrono::Utc::now()).await {
            Ok(Advance::Moved(r) | Advance::Refused(r)) => Outcome::Done(self.follow_up(&r)),
            Err(e) => storage_failure("recording status processed", &e),
        }
    }
}

/// Runs the transformer until `shutdown`: declares its queues, then consumes.
pub async fn run(
    deps: Deps,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), txpipe_common::amqp::AmqpError> {
    let handler = Arc::new(Transformer::new(deps.clone()));
    txpipe_common::worker::run(&deps, handler, shutdown).await
}
