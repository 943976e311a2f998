//! The ledger rules: how one file's rows become transactions when other files may carry the
//! same transaction ids, at the same time or earlier.
//!
//! Every row is written as the file's *version* of its transaction, conditionally: only if the
//! transaction's current version is the one the write expects to replace (none, for a new
//! transaction). When the condition fails, the current version decides, by the state of the
//! file that wrote it (its *holder*):
//!
//! - the file itself (an earlier delivery wrote it): already done;
//! - a file that finished storing (`processed` or later: *committed*): the same values are
//!   `already_stored` and written no more; other values are a conflict (refused, one error per
//!   row naming the columns and the file), or with `on_conflict=update` the next version, if
//!   the file that wrote it has the same owner (tenants never change each other's rows);
//! - a file that gave up (failed, or gone): its rows were never committed; its version is
//!   reverted and the row tried again;
//! - a file still storing: the older upload waits for the row to settle; the younger one
//!   releases every row it wrote and starts over once the other is done ("wait-die": waits only
//!   ever go from older to younger, so two files can never wait for each other).
//!
//! So of two files racing with conflicting rows exactly one is stored, and a refused file
//! leaves no row behind (its versions are reverted before it is marked rejected).

use crate::csv_schema::RowError;
use crate::file_id::FileId;
use crate::status::{FileStatus, OnConflict};
use crate::storage::{Advance, StatusChange, StatusStore, StorageError, Transaction, TransactionStore, WriteOutcome};
use futures::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a file waits for another file still storing the same transaction before it gives
/// up this attempt (the message is then retried as a transient failure).
pub const SETTLE_WAIT: Duration = Duration::from_secs(300);

/// Why storing a file's rows stopped.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A storage call failed; its class says whether to retry.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An older upload is storing one of this file's transactions: this file has released its
    /// rows and starts over once `holder` is done.
    #[error("file {holder} is storing transaction '{transaction_id}' too; starting over when it is done")]
    Yield { holder: FileId, transaction_id: String },
    /// A file storing one of the transactions did not finish within [`SETTLE_WAIT`].
    #[error("file {holder} has been storing transaction '{transaction_id}' for too long")]
    Stuck { holder: FileId, transaction_id: String },
}

/// What storing a file's rows came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Rows stored as this file's versions.
    pub stored: u64,
    /// Rows another committed file had stored with the same values.
    pub already_stored: u64,
    /// Rows refused for a conflict, and the first of their errors.
    pub conflicts: u64,
    pub conflict_errors: Vec<RowError>,
}

/// A row of the file: its number and its version of the transaction.
#[derive(Clone, Debug)]
pub struct Row {
    pub row: u64,
    pub tx: Transaction,
}

/// What to do about a row whose write was refused.
enum Decision {
    /// Write it again as this version (of the new current state).
    Write(Transaction),
    Mine,
    AlreadyStored,
    Conflict(RowError),
    /// Revert the holder's uncommitted version, then try again.
    TakeOver(FileId),
    /// Wait for the holder to settle, keeping this file's rows.
    Wait,
    /// Release this file's rows; start over when the holder is done.
    Yield(FileId),
}

/// One file's writer.
pub struct Ledger {
    transactions: Arc<dyn TransactionStore>,
    statuses: Arc<dyn StatusStore>,
    writer: FileId,
    /// The key that uploaded the file (`uploaded_by`; none without keys): an update replaces
    /// only versions written by files of the same owner.
    owner: Option<String>,
    on_conflict: OnConflict,
    max_errors: usize,
    /// After a conflict in all-or-nothing mode: nothing more is written, rows are only checked
    /// so every conflict is reported.
    refusing: bool,
    refuse_on_conflict: bool,
    /// Files known to have committed, with their owners.
    committed: HashMap<FileId, Option<String>>,
    tally: Tally,
}

impl Ledger {
    /// A writer for `writer`'s rows, uploaded by `owner`. `refuse_on_conflict`: a conflict
    /// refuses the whole file (all-or-nothing mode), so writing stops at the first and the rest
    /// is only checked.
    pub fn new(
        transactions: Arc<dyn TransactionStore>,
        statuses: Arc<dyn StatusStore>,
        writer: FileId,
        owner: Option<String>,
        on_conflict: OnConflict,
        refuse_on_conflict: bool,
        max_errors: usize,
    ) -> Self {
        Self {
            transactions,
            statuses,
            writer,
            owner,
            on_conflict,
            max_errors,
            refusing: false,
            refuse_on_conflict,
            committed: HashMap::new(),
            tally: Tally::default(),
        }
    }

    /// True once a conflict refused the file (all-or-nothing mode).
    pub fn refused(&self) -> bool {
        self.refusing
    }

    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Stores a batch of the file's rows (distinct transaction ids).
    pub async fn store(&mut self, rows: Vec<Row>) -> Result<(), LedgerError> {
        self.store_then(rows, None).await.map(|_| ())
    }

    /// [`Self::store`], and if the first write stores every row, the status change `then` in
    /// that same write where the store can (see [`TransactionStore::write_then`]): `Some` is
    /// what the change came to; `None`, that it is still the caller's to make.
    pub async fn store_then(
        &mut self,
        rows: Vec<Row>,
        then: Option<StatusChange>,
    ) -> Result<Option<Advance>, LedgerError> {
        let mut then = then;
        // row numbers and versions side by side, so the write borrows the versions as they are
        // (no copy of the batch on the way to every write)
        let (mut nums, mut ready) = split(rows);
        let mut waiting: Vec<Row> = Vec::new();
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            if ready.is_empty() {
                if waiting.is_empty() {
                    return Ok(None);
                }
                if started.elapsed() > SETTLE_WAIT {
                    let row = &waiting[0].tx;
                    let holder = self.transactions.current(std::slice::from_ref(&row.transaction_id)).await?;
                    return Err(LedgerError::Stuck {
                        holder: holder.first().map(|t| t.file_id).unwrap_or(self.writer),
                        transaction_id: row.transaction_id.clone(),
                    });
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
                (nums, ready) = split(std::mem::take(&mut waiting));
            }
            if self.refusing {
                self.check_only(join(&mut nums, &mut ready)).await?;
                continue;
            }
            let outcome = match then.take() {
                Some(change) => match self.transactions.write_then(&ready, change).await? {
                    (WriteOutcome::Written, Some(moved)) => {
                        self.tally.stored += ready.len() as u64;
                        return Ok(Some(moved));
                    }
                    (outcome, _) => outcome,
                },
                None => self.transactions.write(&ready).await?,
            };
            match outcome {
                WriteOutcome::Written => {
                    self.tally.stored += ready.len() as u64;
                    (nums, ready) = (Vec::new(), Vec::new());
                }
                WriteOutcome::Stale(stale) => {
                    let current: HashMap<String, Option<Transaction>> = stale.into_iter().collect();
                    let mut left = Vec::new();
                    for row in join(&mut nums, &mut ready) {
                        match current.get(&row.tx.transaction_id) {
                            // not refused itself: unwritten (or written in a part of the call
                            // that went through, which the next try finds to be this file's)
                            None => left.push(row),
                            Some(now) => {
                                if let Some(again) = self.settle(&row, now.as_ref(), &mut waiting).await? {
                                    left.push(again);
                                }
                            }
                        }
                    }
                    (nums, ready) = split(left);
                }
            }
            if self.refusing {
                let (n, r) = split(std::mem::take(&mut waiting));
                nums.extend(n);
                ready.extend(r);
            }
        }
    }

    /// Decides about one refused row; returns it when it is to be written again now.
    async fn settle(
        &mut self,
        row: &Row,
        current: Option<&Transaction>,
        waiting: &mut Vec<Row>,
    ) -> Result<Option<Row>, LedgerError> {
        match self.decide(row, current).await? {
            Decision::Write(tx) => Ok(Some(Row { row: row.row, tx })),
            Decision::Mine => {
                self.tally.stored += 1;
                Ok(None)
            }
            Decision::AlreadyStored => {
                self.tally.already_stored += 1;
                Ok(None)
            }
            Decision::Conflict(e) => {
                self.conflict(e);
                Ok(None)
            }
            Decision::TakeOver(holder) => {
                tracing::info!(file_id = %self.writer, %holder, transaction_id = %row.tx.transaction_id,
                    "reverting an unfinished file's version of a transaction");
                self.transactions.revert(holder, &row.tx.transaction_id).await?;
                Ok(Some(Row { row: row.row, tx: fresh(&row.tx) }))
            }
            Decision::Wait => {
                waiting.push(Row { row: row.row, tx: fresh(&row.tx) });
                Ok(None)
            }
            Decision::Yield(holder) => {
                Err(LedgerError::Yield { holder, transaction_id: row.tx.transaction_id.clone() })
            }
        }
    }

    fn conflict(&mut self, e: RowError) {
        self.tally.conflicts += 1;
        if self.tally.conflict_errors.len() < self.max_errors {
            self.tally.conflict_errors.push(e);
        }
        if self.refuse_on_conflict {
            self.refusing = true;
        }
    }

    /// After the file was refused: only finds the rest of its conflicts.
    async fn check_only(&mut self, rows: Vec<Row>) -> Result<(), LedgerError> {
        let ids: Vec<String> = rows.iter().map(|r| r.tx.transaction_id.clone()).collect();
        let current: HashMap<String, Transaction> =
            self.transactions.current(&ids).await?.into_iter().map(|t| (t.transaction_id.clone(), t)).collect();
        for row in rows {
            let Some(now) = current.get(&row.tx.transaction_id) else { continue };
            if now.file_id == self.writer {
                continue;
            }
            if self.is_committed(now.file_id).await? != Holder::Committed || row.tx.differing_columns(now).is_empty() {
                continue;
            }
            if let Some(e) = self.conflict_of(&row, now) {
                self.conflict(e);
            }
        }
        Ok(())
    }

    async fn decide(&mut self, row: &Row, current: Option<&Transaction>) -> Result<Decision, StorageError> {
        let Some(now) = current else { return Ok(Decision::Write(fresh(&row.tx))) };
        if now.file_id == self.writer {
            return Ok(Decision::Mine);
        }
        Ok(match self.is_committed(now.file_id).await? {
            Holder::Committed if row.tx.differing_columns(now).is_empty() => Decision::AlreadyStored,
            Holder::Committed => match self.conflict_of(row, now) {
                Some(e) => Decision::Conflict(e),
                None => Decision::Write(fresh(&row.tx).replacing(now)),
            },
            Holder::Abandoned => Decision::TakeOver(now.file_id),
            // file ids are UUIDv7: the smaller one was uploaded first
            Holder::Storing if self.writer < now.file_id => Decision::Wait,
            Holder::Storing => Decision::Yield(now.file_id),
        })
    }

    /// Of a row whose transaction a committed file stored with other values: the conflict, or
    /// none when this file is to write the next version (`on_conflict=update`, and the stored
    /// version's file has this file's owner).
    fn conflict_of(&self, row: &Row, now: &Transaction) -> Option<RowError> {
        if self.on_conflict != OnConflict::Update {
            return Some(conflict_error(row, now, false));
        }
        let same_owner = self.committed.get(&now.file_id) == Some(&self.owner);
        (!same_owner).then(|| conflict_error(row, now, true))
    }

    async fn is_committed(&mut self, holder: FileId) -> Result<Holder, StorageError> {
        if self.committed.contains_key(&holder) {
            return Ok(Holder::Committed);
        }
        let Some(record) = self.statuses.get(holder).await? else { return Ok(Holder::Abandoned) };
        Ok(match record.status {
            s if s.is_at_or_past(FileStatus::Processed) => {
                // a committed file stays committed (and its owner its owner): no need to ask again
                self.committed.insert(holder, record.uploaded_by);
                Holder::Committed
            }
            FileStatus::ProcessingFailed | FileStatus::ValidationFailed => Holder::Abandoned,
            _ => Holder::Storing,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    Committed,
    Abandoned,
    Storing,
}

/// Rows as their numbers and their versions.
fn split(rows: Vec<Row>) -> (Vec<u64>, Vec<Transaction>) {
    rows.into_iter().map(|r| (r.row, r.tx)).unzip()
}

/// The rows back from their numbers and versions (both left empty).
fn join(nums: &mut Vec<u64>, txs: &mut Vec<Transaction>) -> Vec<Row> {
    nums.drain(..).zip(txs.drain(..)).map(|(row, tx)| Row { row, tx }).collect()
}

/// The row as a first version again (what it replaces is learnt from the next refusal).
fn fresh(tx: &Transaction) -> Transaction {
    Transaction { version: 1, replaces: None, ..tx.clone() }
}

/// Short, printable quote of a value for an error message.
fn quote(v: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = v.chars().take(MAX).flat_map(char::escape_debug).collect();
    if v.chars().nth(MAX).is_some() {
        out.push('…');
    }
    format!("'{out}'")
}

/// The error for a row that conflicts with a stored transaction. It names the columns and the
/// file, not the stored values: that file may be another tenant's. `not_yours`: an update was
/// asked for, and the stored version is another owner's.
fn conflict_error(row: &Row, stored: &Transaction, not_yours: bool) -> RowError {
    let columns = row.tx.differing_columns(stored);
    let why = if not_yours { "; on_conflict=update replaces only transactions stored by your own files" } else { "" };
    RowError {
        row: row.row,
        column: columns.first().map(|c| (*c).to_owned()),
        message: format!(
            "transaction_id {} was already stored by file {} with a different {}{why}",
            quote(&row.tx.transaction_id),
            stored.file_id,
            columns.join(", ")
        ),
    }
}

/// Reverts of one file's versions in flight at once.
const REVERTS_IN_FLIGHT: usize = 8;

/// Reverts every version `file_id` wrote: what a refused or yielding file leaves behind.
pub async fn release(transactions: &Arc<dyn TransactionStore>, file_id: FileId) -> Result<u64, StorageError> {
    let mut reverted = 0;
    let mut cursor: Option<String> = None;
    loop {
        let page = transactions.list_by_file(file_id, 500, cursor.as_deref()).await?;
        // each revert is its own atomic step: several at once
        let ids: Vec<String> = page.items.into_iter().map(|t| t.transaction_id).collect();
        let reverts = ids.len() as u64;
        futures::stream::iter(ids)
            .map(|id| async move { transactions.revert(file_id, &id).await })
            .buffer_unordered(REVERTS_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        reverted += reverts;
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(reverted),
        }
    }
}

/// Waits until `holder` is no longer storing (committed, failed or gone), up to [`SETTLE_WAIT`].
pub async fn wait_settled(statuses: &Arc<dyn StatusStore>, holder: FileId) -> Result<bool, StorageError> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(20);
    while started.elapsed() < SETTLE_WAIT {
        match statuses.get(holder).await?.map(|r| r.status) {
            Some(s) if s.is_at_or_past(FileStatus::Processed) || s.is_final() => return Ok(true),
            None => return Ok(true),
            Some(_) => {}
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
    Ok(false)
}
