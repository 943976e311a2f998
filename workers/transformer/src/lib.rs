//! The transformer: consumes `file.validated`, reads the file (the copy a small file's message
//! carries, else the stored object, streamed) and stores every row
//! as the file's version of its transaction by the ledger rules (`txpipe_common::ledger`):
//! conditional writes in batches, so no other file's row is overwritten unseen. The loop in
//! `txpipe_common::worker` then records `processed` and publishes `file.processed`; a file
//! whose rows conflict with stored transactions is refused instead (`validation_failed` with
//! one error per row, `file.rejected`), its rows reverted. In partial mode the rows the
//! validator refused are skipped and conflicting rows are refused one by one.

use async_trait::async_trait;
use bytes::Bytes;
use rustc_hash::FxHashSet;
use tokio::sync::mpsc;
use txpipe_common::csv_schema::{id_hash, ErrorLog, ScanError, Scanner};
use txpipe_common::ledger::{self, Ledger, LedgerError, Row, Tally};
use txpipe_common::messages::StageMessage;
use txpipe_common::metrics::{InternalEvent, RowsStored};
use txpipe_common::stage::Stage;
use txpipe_common::status::{FileStatus, Mode, StatusRecord, StatusUpdate};
use txpipe_common::storage::{open_file_blocking, Advance, StatusChange, Transaction};
use txpipe_common::worker::{Failure, Handler, Passed, Step};
use txpipe_common::{Deps, FileId};

/// Times a file starts over after yielding to an older upload before the attempt is given up
/// (as a transient failure, retried later).
const MAX_RESTARTS: usize = 20;

/// Carried files up to this size are read on the task that received them (a few hundred rows
/// at most); larger ones on the blocking pool.
const READ_IN_PLACE_BYTES: usize = 64 * 1024;

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

    /// One pass over the file: reads its rows in batches and stores them through the ledger.
    /// A small carried file is read right here (less work than a hop to the blocking pool);
    /// anything else streams on the blocking pool, sending batches to this task. A file of one
    /// batch is moved to `processed` in the same write as its rows when they all go in (one
    /// round trip instead of two, where the store can: see `TransactionStore::write_then`).
    async fn store_rows(&self, record: &StatusRecord, carried: Option<Bytes>, passed: Passed) -> Result<Pass, Failure> {
        let partial = record.options.mode == Mode::Partial;
        let storage = &self.deps.storage;
        let mut ledger = Ledger::new(
            storage.transactions.clone(),
            storage.statuses.clone(),
            record.file_id,
            record.uploaded_by.clone(),
            record.options.on_conflict,
            !partial,
            self.deps.settings.max_reported_errors,
        );
        let (file_id, batch_size) = (record.file_id, self.deps.settings.batch_size);
        let mut stop = None;
        let mut moved = None;
        let read = match carried {
            Some(bytes) if bytes.len() <= READ_IN_PLACE_BYTES => {
                let mut batches = Vec::new();
                let read = scan_rows(&bytes[..], file_id, partial, batch_size, |b| {
                    batches.push(b);
                    true
                });
                if batches.len() == 1 && read.is_ok() {
                    let batch = batches.pop().unwrap_or_default();
                    let max_errors = self.deps.settings.max_reported_errors;
                    let all_in = Tally { stored: batch.len() as u64, ..Tally::default() };
                    let then = StatusChange {
                        file_id,
                        to: FileStatus::Processed,
                        update: StatusUpdate { passed, ..stored(record, &all_in, max_errors) },
                        at: chrono::Utc::now(),
                    };
                    match ledger.store_then(batch, Some(then)).await {
                        Ok(m) => moved = m.map(Box::new),
                        Err(e) => stop = Some(e),
                    }
                }
                for batch in batches {
                    if let Err(e) = ledger.store(batch).await {
                        stop = Some(e);
                        break;
                    }
                }
                read
            }
            carried => {
                let (tx, mut rx) = mpsc::channel::<Vec<Row>>(2);
                let reader = self.read_rows(file_id, &record.object_key, carried, partial, tx);
                while let Some(batch) = rx.recv().await {
                    if let Err(e) = ledger.store(batch).await {
                        stop = Some(e);
                        break;
                    }
                }
                drop(rx);
                reader.await.map_err(|e| Failure::Retry(format!("reading task failed: {e}")))?
            }
        };
        match stop {
            Some(LedgerError::Storage(e)) => return Err(Failure::storage("writing transactions", &e)),
            Some(LedgerError::Yield { holder, transaction_id }) => return Ok(Pass::Yield(holder, transaction_id)),
            Some(stuck @ LedgerError::Stuck { .. }) => return Err(Failure::Retry(stuck.to_string())),
            None => {}
        }
        match read {
            Ok(()) => Ok(Pass::Done(ledger, moved)),
            Err(ReadError::Io(e)) => Err(Failure::read("reading the validated file", &e)),
            Err(ReadError::Invalid(why)) => {
                Err(Failure::DeadLetter(format!("the stored file changed after validation: {why}")))
            }
        }
    }

    /// Streams the file on the blocking pool, sending its batches of rows on `tx`.
    fn read_rows(
        &self,
        file_id: FileId,
        key: &str,
        carried: Option<Bytes>,
        partial: bool,
        tx: mpsc::Sender<Vec<Row>>,
    ) -> tokio::task::JoinHandle<Result<(), ReadError>> {
        let objects = self.deps.storage.objects.clone();
        let key = key.to_owned();
        let batch_size = self.deps.settings.batch_size;
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || -> Result<(), ReadError> {
            let source = open_file_blocking(&objects, &key, carried.as_ref(), &handle).map_err(ReadError::Io)?;
            // false: the writer stopped; its error is the one to report
            scan_rows(source, file_id, partial, batch_size, |batch| tx.blocking_send(batch).is_ok())
        })
    }

    /// Stores the file's rows, starting over each time it yields to an older upload that is
    /// storing one of the same transactions (after releasing every row it wrote).
    async fn store_all(
        &self,
        record: &StatusRecord,
        carried: Option<Bytes>,
        passed: Passed,
    ) -> Result<(Ledger, Option<Advance>), Failure> {
        let storage = &self.deps.storage;
        for _ in 0..MAX_RESTARTS {
            let (holder, transaction_id) = match self.store_rows(record, carried.clone(), passed).await? {
                Pass::Done(ledger, moved) => return Ok((ledger, moved.map(|m| *m))),
                Pass::Yield(holder, transaction_id) => (holder, transaction_id),
            };
            tracing::info!(file_id = %record.file_id, %holder, %transaction_id,
                "an older upload is storing the same transaction; releasing this file's rows until it is done");
            ledger::release(&storage.transactions, record.file_id)
                .await
                .map_err(|e| Failure::storage("releasing rows to an older upload", &e))?;
            let settled = ledger::wait_settled(&storage.statuses, holder)
                .await
                .map_err(|e| Failure::storage("waiting for an older upload", &e))?;
            if !settled {
                return Err(Failure::Retry(format!(
                    "file {holder} has been storing transaction '{transaction_id}' for too long"
                )));
            }
        }
        Err(Failure::Retry("kept yielding to other uploads of the same transactions".into()))
    }
}

/// Reads the file's rows from `source` in batches of `batch_size`, handing each to `emit`
/// (which says false to stop early: the writer stopped, and its error is the one to report).
/// In partial mode the rows the validator refused are skipped; in all-or-nothing mode a row
/// that no longer passes means the file changed after validation.
fn scan_rows(
    source: impl std::io::Read,
    file_id: FileId,
    partial: bool,
    batch_size: usize,
    mut emit: impl FnMut(Vec<Row>) -> bool,
) -> Result<(), ReadError> {
    let mut scanner = match Scanner::new(source) {
        Ok(s) => s,
        Err(ScanError::Io(e)) => return Err(ReadError::Io(e)),
        Err(ScanError::Header(errors)) => {
            return Err(ReadError::Invalid(format!("the header no longer passes: {}", errors[0].message)))
        }
    };
    let now = chrono::Utc::now();
    // partial mode: the later rows with an id already seen are the duplicates the
    // validator refused (it marks every occurrence after the first)
    let mut seen: FxHashSet<u64> = FxHashSet::default();
    let mut batch = Vec::with_capacity(batch_size);
    while scanner.advance().map_err(ReadError::Io)? {
        let mut log = ErrorLog::new(1);
        let parsed = scanner.parse(&mut log);
        if partial {
            let first = scanner.raw_id().map(|id| seen.insert(id_hash(id))).unwrap_or(true);
            if parsed.is_none() || !first {
                continue;
            }
        }
        let Some(row) = parsed else {
            let (errors, _) = log.into_parts();
            return Err(ReadError::Invalid(format!("row {} no longer passes: {}", scanner.row(), errors[0].message)));
        };
        batch.push(Row { row: scanner.row(), tx: Transaction::from_row(&row, file_id, now) });
        if batch.len() == batch_size && !emit(std::mem::replace(&mut batch, Vec::with_capacity(batch_size))) {
            return Ok(());
        }
    }
    if let Some(e) = scanner.too_long() {
        return Err(ReadError::Invalid(format!("row {} no longer passes: {}", e.row, e.message)));
    }
    if !batch.is_empty() {
        emit(batch);
    }
    Ok(())
}

/// How one pass over the file ended.
enum Pass {
    /// Stored; with the move to `processed` if it was made in the rows' write.
    Done(Ledger, Option<Box<Advance>>),
    /// An older upload holds this transaction: release, wait for it, start over.
    Yield(FileId, String),
}

/// The status update for a file refused for conflicts (all-or-nothing mode).
fn refusal(tally: &Tally) -> StatusUpdate {
    let first = tally.conflict_errors.first().map(|e| e.message.as_str()).unwrap_or("unknown");
    StatusUpdate {
        error_count: Some(tally.conflicts),
        errors: Some(tally.conflict_errors.clone()),
        records_processed: Some(0),
        reason: Some(format!(
            "{} row(s) conflict with transactions other files stored; nothing was stored; the first: {first}",
            tally.conflicts
        )),
        ..Default::default()
    }
}

/// The status update for a stored file; in partial mode its conflicts join the rows the
/// validator refused.
fn stored(record: &StatusRecord, tally: &Tally, max_errors: usize) -> StatusUpdate {
    let mut update = StatusUpdate {
        records_processed: Some(tally.stored),
        already_stored: Some(tally.already_stored),
        ..Default::default()
    };
    if record.options.mode == Mode::Partial {
        let mut errors = record.errors.clone();
        errors.extend(tally.conflict_errors.iter().cloned());
        errors.sort_by_key(|e| e.row);
        errors.truncate(max_errors);
        update.rejected_rows = Some(record.rejected_rows.unwrap_or(0) + tally.conflicts);
        update.error_count = Some(record.error_count.unwrap_or(0) + tally.conflicts);
        update.errors = Some(errors);
    }
    update
}

#[async_trait]
impl Handler for Transformer {
    fn stage(&self) -> Stage {
        Stage::Transformer
    }

    async fn work(&self, msg: &StageMessage, record: &StatusRecord, passed: Passed) -> Result<Step, Failure> {
        let file_id = record.file_id;
        let (ledger, moved) = self.store_all(record, msg.carried(record), passed).await?;
        let tally = ledger.tally();
        if ledger.refused() {
            // refused: none of its rows may stay
            let reverted = ledger::release(&self.deps.storage.transactions, file_id)
                .await
                .map_err(|e| Failure::storage("reverting a refused file's rows", &e))?;
            tracing::info!(%file_id, conflicts = tally.conflicts, reverted, "refused for conflicting transactions");
            return Ok(Step::Advance(FileStatus::ValidationFailed, refusal(tally)));
        }
        RowsStored { file_id, rows: tally.stored }.emit();
        if let Some(moved) = moved {
            return Ok(Step::Moved(moved));
        }
        Ok(Step::Advance(FileStatus::Processed, stored(record, tally, self.deps.settings.max_reported_errors)))
    }
}
