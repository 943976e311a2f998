//! The transformer: consumes `file.validated`, streams the object again and writes every row
//! to the transactions table in batches (keyed by transaction_id, so a repeat overwrites the
//! same rows); the loop in `txpipe_common::worker` then records `processed` and publishes
//! `file.processed`.

use async_trait::async_trait;
use tokio::sync::mpsc;
use txpipe_common::csv_schema::{ErrorLog, ScanError, Scanner};
use txpipe_common::messages::StageMessage;
use txpipe_common::metrics::{InternalEvent, RowsStored};
use txpipe_common::stage::Stage;
use txpipe_common::status::{FileStatus, StatusRecord, StatusUpdate};
use txpipe_common::storage::{open_blocking, Transaction};
use txpipe_common::worker::{Failure, Handler, Step};
use txpipe_common::{Deps, FileId};

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

    /// Streams the object on the blocking pool, sending batches to this task, which writes them.
    async fn store_rows(&self, file_id: FileId, key: &str) -> Result<u64, Failure> {
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
        let read = reader.await.map_err(|e| Failure::Retry(format!("reading task failed: {e}")))?;
        if let Some(e) = write_error {
            return Err(Failure::storage("writing transactions", &e));
        }
        match read {
            Ok(()) => Ok(written),
            Err(ReadError::Io(e)) => Err(Failure::read("reading the validated file", &e)),
            Err(ReadError::Invalid(why)) => {
                Err(Failure::DeadLetter(format!("the stored file changed after validation: {why}")))
            }
        }
    }
}

#[async_trait]
impl Handler for Transformer {
    fn stage(&self) -> Stage {
        Stage::Transformer
    }

    async fn work(&self, _msg: &StageMessage, record: &StatusRecord) -> Result<Step, Failure> {
        let file_id = record.file_id;
        let written = self.store_rows(file_id, &record.object_key).await?;
        RowsStored { file_id, rows: written }.emit();
        let update = StatusUpdate { records_processed: Some(written), ..Default::default() };
        Ok(Step::Advance(FileStatus::Processed, update))
    }
}
