//! The embedded table store: the processing-status, transactions, API-key (with the keys'
//! daily upload counts) and idempotency-key tables in one SQLite file, and the small objects
//! of the local object store (see [`super::local`]). WAL and a busy timeout
//! let several processes on one host share it. Writes go through one writer thread per store
//! that commits many callers' writes in one transaction ([`super::group_commit`]); reads run
//! on a connection of their own on the blocking pool (WAL readers see the last commit and
//! never wait for the writer), so the async workers never stall on the database. The API key
//! read of every request runs in place when SQLite can answer it without waiting
//! ([`SqliteStore::quick`]), and on the blocking pool otherwise.

use super::group_commit::Writer;
use super::listing::{cursor_after, listing_key};
use super::recent::Recent;
use super::{
    decode_cursor, encode_cursor, Advance, ApiKeyRecord, ApiKeyStore, Change, Claim, FilePage, FileQuery,
    IdempotencyStore, IdempotentUpload, NewClaim, QuotaUse, StatusChange, StatusStore, StorageError, Transaction,
    TransactionPage, TransactionStore, VersionRef, WriteOutcome,
};
use crate::csv_schema::TxStatus;
use crate::file_id::FileId;
use crate::names::Names;
use crate::status::{FileStatus, StatusRecord, StatusUpdate};
use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Both tables of one namespace in one SQLite database.
pub struct SqliteStore {
    /// For reads.
    conn: Arc<Mutex<Connection>>,
    /// For the one read every request makes (its API key), on the async worker itself: a
    /// connection without a busy timeout, so it never waits for a lock (see
    /// [`SqliteStore::quick`]).
    quick: Mutex<Connection>,
    /// For writes: group commit.
    writer: Writer,
    status_table: String,
    tx_table: String,
    /// `{ns}-transaction-versions`: a view of every version (the current ones in the
    /// transactions table, the replaced ones in `earlier_table`).
    versions_table: String,
    /// `{ns}-transaction-earlier-versions`: the versions a later one replaced, by file.
    earlier_table: String,
    keys_table: String,
    usage_table: String,
    idem_table: String,
    /// The local object store's small objects (`{ns}-csv-files`, named as the bucket).
    objects_table: String,
    /// The status records this process last wrote or read in a write, with their JSON as
    /// stored: a change whose row still holds that exact JSON starts from the remembered
    /// record instead of parsing it again on the writer thread (the comparison is made inside
    /// the write's transaction, so another process's change is never missed), and the
    /// notifier moves a file this process just moved without reading it
    /// ([`StatusStore::remembered`]).
    known: Arc<Mutex<Recent<Known>>>,
}

/// A status record as this process last saw it stored.
struct Known {
    json: String,
    record: StatusRecord,
}

/// Records remembered (each kept twice, as JSON and parsed: about 3 KB in all, measured, for a
/// file without errors): the files in flight between two stages, not a second copy of the
/// table. Enough for a backlog of a few thousand uploads waiting for the validator (a burst
/// faster than the stages): past it, each of the backlog's files is read again and parsed
/// twice.
const REMEMBERED_RECORDS: usize = 4096;
/// And at most about this much memory: each record counts three times its JSON's length (the
/// JSON, the record parsed from it and the map's own: ~3 KB for a ~900-byte record, measured),
/// so larger records (up to [`REMEMBERED_JSON_MAX`]) are kept fewer.
const REMEMBERED_BYTES: usize = 8 * 1024 * 1024;
/// A record larger than this (one carrying a list of row errors) is parsed when it is next
/// changed rather than kept: the memory it would hold is worth more than the parse.
const REMEMBERED_JSON_MAX: usize = 4 * 1024;

/// A status change made inside a write (see `SqliteStore::modify`): its statements and the
/// records this process remembers.
struct Changer {
    select: String,
    write: String,
    known: Arc<Mutex<Recent<Known>>>,
}

impl Changer {
    /// Reads the record, applies `change` and writes it back, in the writer's transaction
    /// (`IMMEDIATE`: the write lock taken up front, so read, check and write are atomic across
    /// processes). Returns what to remember once that transaction is committed.
    fn change(
        &self,
        c: &Connection,
        file_id: FileId,
        change: impl FnOnce(&mut StatusRecord) -> bool,
    ) -> Result<(Advance, Known), StorageError> {
        let json: Option<String> = c
            .prepare_cached(&self.select)
            .and_then(|mut st| st.query_row(params![file_id.to_string()], |r| r.get(0)).optional())
            .map_err(db_err)?;
        let json = json.ok_or_else(|| StorageError::not_found(format!("file {file_id}")))?;
        // the row as this process last saw it: no need to parse it again
        let seen = self
            .known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .peek(file_id)
            .filter(|k| k.json == json)
            .map(|k| k.record.clone());
        let mut record = match seen {
            Some(record) => record,
            None => from_json(&json)?,
        };
        if !change(&mut record) {
            return Ok((Advance::Refused(record.clone()), Known { json, record }));
        }
        let json = to_json(&record);
        c.prepare_cached(&self.write)
            .and_then(|mut st| {
                st.execute(params![file_id.to_string(), record.status.as_str(), record.updated_at.to_rfc3339(), json])
            })
            .map_err(db_err)?;
        Ok((Advance::Moved(record.clone()), Known { json, record }))
    }
}

impl SqliteStore {
    /// Remembers `seen` as the stored state of its file, if it is small enough to keep.
    fn remember(&self, file_id: FileId, seen: Known) {
        let mut known = self.known();
        if seen.json.len() <= REMEMBERED_JSON_MAX {
            let weight = 3 * seen.json.len();
            known.put_weighing(file_id, seen, weight);
        } else {
            known.forget(file_id);
        }
    }
}

fn db_err(e: rusqlite::Error) -> StorageError {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..) => {
            StorageError::corrupt("a value in the sqlite database").with_source(e)
        }
        // busy, locked, full disk, I/O: all worth another try later
        other => StorageError::unavailable("sqlite").with_source(other),
    }
}

/// Table names carry the namespace (`{ns}-transactions`), so they are always quoted.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with the tables of `names`.
    pub async fn open(path: &Path, names: &Names) -> Result<Self, StorageError> {
        let path = path.to_owned();
        let status_table = quoted(&names.status_table());
        let tx_table = quoted(&names.transactions_table());
        let by_file = quoted(&format!("{}-by-file", names.transactions_table()));
        let versions_table = quoted(&names.transaction_versions_table());
        let vt = versions_table.clone();
        let earlier_table = quoted(&names.transaction_earlier_versions_table());
        let et = earlier_table.clone();
        let of_file = quoted(&format!("{}-of-file", names.transactions_table()));
        let keys_table = quoted(&names.api_keys_table());
        let usage_table = quoted(&format!("{}-usage", names.api_keys_table()));
        let (st, tt, kt, ut) = (status_table.clone(), tx_table.clone(), keys_table.clone(), usage_table.clone());
        let idem_table = quoted(&names.idempotency_table());
        let it = idem_table.clone();
        let objects_table = quoted(&names.bucket());
        let ot = objects_table.clone();
        let idem_expiry = quoted(&format!("{}-expiry", names.idempotency_table()));
        let unannounced = quoted(&format!("{}-unannounced", names.status_table()));
        let working = quoted(&format!("{}-working", names.status_table()));
        let listing = ListingIndexes::of(names);
        let thread_name = format!("sqlite-writer-{}", names.namespace());
        let (conn, quick, writer) = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StorageError::unavailable(format!("cannot create {}", dir.display())).with_source(e)
                })?;
            }
            let open = || {
                Connection::open(&path)
                    .map_err(|e| StorageError::unavailable(format!("cannot open {}", path.display())).with_source(e))
            };
            let conn = open()?;
            conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db_err)?;
            conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
            conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
            // each write runs in a savepoint of its own (group_commit.rs), whose undo pages go
            // to a statement journal; past 64 KiB SQLite moves that journal to a temporary file
            // (created, written, deleted: a few a second under load). In memory instead: the
            // journal holds only the pages one write changes, emptied when its savepoint ends.
            conn.pragma_update(None, "temp_store", "MEMORY").map_err(db_err)?;
            conn.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {st} (
                    file_id TEXT PRIMARY KEY,
                    status TEXT NOT NULL,
                    updated_at TEXT NOT NULL,
                    record TEXT NOT NULL
                 ) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS {tt} (
                    transaction_id TEXT PRIMARY KEY, file_id TEXT NOT NULL, {TX_VALUE_DEFS}
                 ) WITHOUT ROWID;
                 -- an index of older databases, on file_id alone
                 DROP INDEX IF EXISTS {by_file};
                 -- a file's current rows, in id order (its replaced ones are in {et})
                 CREATE INDEX IF NOT EXISTS {of_file} ON {tt} (file_id, transaction_id);
                 CREATE TABLE IF NOT EXISTS {et} (
                    file_id TEXT NOT NULL, transaction_id TEXT NOT NULL, {TX_VALUE_DEFS},
                    PRIMARY KEY (file_id, transaction_id)
                 ) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS {kt} (
                    name TEXT PRIMARY KEY,
                    hash TEXT NOT NULL UNIQUE,
                    record TEXT NOT NULL
                 ) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS {ut} (
                    name TEXT NOT NULL,
                    day TEXT NOT NULL,
                    count INTEGER NOT NULL,
                    PRIMARY KEY (name, day)
                 ) WITHOUT ROWID;
                 -- lease_until in ms, expires_at in s since the epoch; upload: the JSON of the
                 -- finished upload (NULL while in flight)
                 CREATE TABLE IF NOT EXISTS {it} (
                    key TEXT PRIMARY KEY,
                    token TEXT NOT NULL,
                    lease_until INTEGER NOT NULL,
                    expires_at INTEGER NOT NULL,
                    upload TEXT
                 ) WITHOUT ROWID;
                 -- a rowid table: a body spans several pages, which WITHOUT ROWID suits badly
                 CREATE TABLE IF NOT EXISTS {ot} (
                    key TEXT PRIMARY KEY,
                    body BLOB NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS {idem_expiry} ON {it} (expires_at);
                 CREATE INDEX IF NOT EXISTS {unannounced} ON {st} (file_id)
                    WHERE json_extract(record, '$.announced') = 0;
                 CREATE INDEX IF NOT EXISTS {working} ON {st} (status, file_id) WHERE status IN {WORKING};"
            ))
            .map_err(db_err)?;
            upgrade_transactions(&conn, &tt)?;
            upgrade_versions(&conn, &tt, &vt, &et)?;
            listing.ensure(&conn)?;
            // the readers' connection: the schema is in place, WAL is a property of the file
            let reader = open()?;
            reader.busy_timeout(std::time::Duration::from_secs(10)).map_err(db_err)?;
            // SQLite's default: no busy handler, a lock it cannot take is SQLITE_BUSY at once
            let quick = open()?;
            Ok::<_, StorageError>((reader, quick, conn))
        })
        .await
        .map_err(|e| StorageError::unavailable("opening the database failed").with_source(e))??;
        let writer = Writer::start(writer, thread_name)
            .map_err(|e| StorageError::unavailable("cannot start the sqlite writer").with_source(e))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            quick: Mutex::new(quick),
            writer,
            status_table,
            tx_table,
            versions_table,
            earlier_table,
            keys_table,
            usage_table,
            idem_table,
            objects_table,
            known: Arc::new(Mutex::new(Recent::with_limits(REMEMBERED_RECORDS, REMEMBERED_BYTES))),
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Recent<Known>> {
        self.known.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` in the writer's next transaction (see [`super::group_commit`]): the answer
    /// comes once that transaction is committed and synced.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        self.writer.write(f).await
    }

    /// Ok when `table` (quoted) can be read: every store's `check`.
    async fn readable(&self, table: &str) -> Result<(), StorageError> {
        let sql = format!("SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT 1)");
        self.with(move |c| c.query_row(&sql, [], |_| Ok(())).map_err(db_err)).await
    }

    /// Runs `f`, a short read by key, on the calling async worker when that cannot wait: with
    /// the quick connection, if no other task holds it, and only if SQLite answers without a
    /// busy wait. Otherwise (another task has the connection, or SQLite answers busy: another
    /// process recovering the WAL, say) on the blocking pool ([`Self::with`]), where a wait of
    /// up to the busy timeout stalls no other request. Saves the hop to the blocking pool on
    /// every request (2–3 % of `txpipe up`'s CPU at high file rates, docs/benchmarks.md).
    async fn quick<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, StorageError> {
        if let Ok(mut conn) = self.quick.try_lock() {
            match f(&mut conn) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {}
                done => return done.map_err(db_err),
            }
        }
        self.with(move |c| f(c).map_err(db_err)).await
    }

    /// Runs `f` with the readers' connection on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StorageError::unavailable("storage task failed").with_source(e))?
    }
}

/// The working statuses, as SQL (the partial index of files in flight, for the stuck-file sweep).
const WORKING: &str = "('validating', 'processing', 'notifying')";

fn to_json(r: &StatusRecord) -> String {
    serde_json::to_string(r).expect("a status record always serializes")
}

fn from_json(s: &str) -> Result<StatusRecord, StorageError> {
    serde_json::from_str(s).map_err(|e| StorageError::corrupt("status record").with_source(e))
}

#[async_trait]
impl StatusStore for SqliteStore {
    async fn create(&self, record: &StatusRecord) -> Result<(), StorageError> {
        let sql = format!(
            "INSERT INTO {} (file_id, status, updated_at, record, owner, listed_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            self.status_table
        );
        let (id, status, at, json) =
            (record.file_id.to_string(), record.status.as_str(), record.updated_at.to_rfc3339(), to_json(record));
        let (owner, key) = (record.uploaded_by.clone(), listing_key(record));
        let json = self
            .write(move |c| {
                match c.prepare_cached(&sql).and_then(|mut st| st.execute(params![id, status, at, json, owner, key])) {
                    Ok(_) => Ok(json),
                    Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                        Err(StorageError::already_exists(format!("file {id}")))
                    }
                    Err(e) => Err(db_err(e)),
                }
            })
            .await?;
        self.remember(record.file_id, Known { json, record: record.clone() });
        Ok(())
    }

    async fn get(&self, file_id: FileId) -> Result<Option<StatusRecord>, StorageError> {
        let sql = format!("SELECT record FROM {} WHERE file_id = ?1", self.status_table);
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
            let json: Option<String> =
                stmt.query_row(params![file_id.to_string()], |r| r.get(0)).optional().map_err(db_err)?;
            json.as_deref().map(from_json).transpose()
        })
        .await
    }

    async fn advance(
        &self,
        file_id: FileId,
        to: FileStatus,
        update: StatusUpdate,
        at: DateTime<Utc>,
    ) -> Result<Advance, StorageError> {
        self.modify(file_id, move |r| r.advance(to, update, at)).await
    }

    async fn mark_announced(&self, file_id: FileId) -> Result<(), StorageError> {
        self.modify(file_id, |r| !std::mem::replace(&mut r.announced, true)).await.map(|_| ())
    }

    async fn withdraw(&self, file_id: FileId) -> Result<bool, StorageError> {
        let select = format!("SELECT record FROM {} WHERE file_id = ?1", self.status_table);
        let delete = format!("DELETE FROM {} WHERE file_id = ?1", self.status_table);
        self.known().forget(file_id);
        self.write(move |c| {
            let tx = c; // inside the writer's transaction
            let json: Option<String> =
                tx.query_row(&select, params![file_id.to_string()], |r| r.get(0)).optional().map_err(db_err)?;
            match json.as_deref().map(from_json).transpose()? {
                Some(record) if !record.announced => {
                    tx.execute(&delete, params![file_id.to_string()]).map_err(db_err)?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
        .await
    }

    async fn unannounced(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<FileId>, StorageError> {
        // the partial index on unannounced records keeps this from reading the whole table
        let sql =
            format!("SELECT record FROM {} WHERE json_extract(record, '$.announced') = 0 LIMIT ?1", self.status_table);
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
            let mut rows = stmt.query(params![limit as i64]).map_err(db_err)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(db_err)? {
                let record = from_json(&r.get::<_, String>(0).map_err(db_err)?)?;
                if !record.announced && record.created_at < before {
                    out.push(record.file_id);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn update(&self, file_id: FileId, change: Change) -> Result<Advance, StorageError> {
        self.modify(file_id, move |r| change(r)).await
    }

    async fn stalled(
        &self,
        status: FileStatus,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<FileId>, StorageError> {
        // the repeated IN lets SQLite use the partial index of files in flight (a bound
        // parameter alone does not prove the index's condition); the heartbeat lives in the
        // JSON, so the few rows in flight are filtered here
        let sql = format!("SELECT record FROM {} WHERE status = ?1 AND status IN {WORKING}", self.status_table);
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
            let mut rows = stmt.query(params![status.as_str()]).map_err(db_err)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(db_err)? {
                let record = from_json(&r.get::<_, String>(0).map_err(db_err)?)?;
                if record.last_sign_of_life() < before && out.len() < limit {
                    out.push(record.file_id);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn list(&self, query: &FileQuery) -> Result<FilePage, StorageError> {
        let after = query.after()?.unwrap_or_else(|| "~".into()); // '~' sorts after every key
        let since = query.since_key().unwrap_or_default();
        // one statement per case, so the planner sees `owner = ?` and takes the owner index
        let by_owner = if query.owner.is_some() { "owner = ?1 AND" } else { "?1 IS NULL AND" };
        let sql = format!(
            "SELECT record FROM {} WHERE {by_owner} listed_key < ?2 AND listed_key >= ?3
               AND (?4 IS NULL OR status = ?4) AND json_extract(record, '$.announced') IS NOT 0
             ORDER BY listed_key DESC LIMIT ?5",
            self.status_table
        );
        let (q, limit) = (query.clone(), query.limit.max(1));
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
            let status = q.status.map(|s| s.as_str());
            let mut rows = stmt.query(params![q.owner, after, since, status, (limit + 1) as i64]).map_err(db_err)?;
            let mut items = Vec::new();
            while let Some(r) = rows.next().map_err(db_err)? {
                let record = from_json(&r.get::<_, String>(0).map_err(db_err)?)?;
                if q.admits(&record) {
                    items.push(record);
                }
            }
            let next_cursor = if items.len() > limit {
                items.truncate(limit);
                items.last().map(cursor_after)
            } else {
                None
            };
            Ok(FilePage { items, next_cursor })
        })
        .await
    }

    fn remembered(&self, file_id: FileId) -> Option<StatusRecord> {
        self.known().peek(file_id).map(|k| k.record.clone())
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.readable(&self.status_table).await
    }
}

/// The columns both transaction tables have after their keys (the current version's and an
/// earlier version's rows are alike).
const TX_VALUE_DEFS: &str = "amount TEXT NOT NULL, currency TEXT NOT NULL, timestamp TEXT NOT NULL, \
     timestamp_epoch INTEGER NOT NULL, merchant TEXT NOT NULL, status TEXT NOT NULL, processed_at TEXT NOT NULL, \
     version INTEGER NOT NULL DEFAULT 1, replaces_file TEXT, replaces_version INTEGER";

/// The columns of both transaction tables, in the order [`TxValues::execute`] binds and [`tx_from_row`] reads.
const TX_COLUMNS: &str = "transaction_id, file_id, amount, currency, timestamp, timestamp_epoch, merchant, status, \
                          processed_at, version, replaces_file, replaces_version";

/// The columns of `{ns}-transaction-versions`, in its order (its keys first).
const VERSIONS_COLUMNS: &str = "file_id, transaction_id, amount, currency, timestamp, timestamp_epoch, merchant, \
                                status, processed_at, version, replaces_file, replaces_version";

/// One version's column values, formatted once (on the caller's thread, before the write
/// reaches the writer) and bound by reference (no box per value).
struct TxValues {
    t: Transaction,
    file_id: Arc<str>,
    amount: String,
    timestamp: String,
    processed_at: Arc<str>,
    replaces_file: Option<String>,
}

impl TxValues {
    fn of(t: Transaction) -> Self {
        let (file_id, processed_at) = (t.file_id.to_string().into(), t.processed_at.to_rfc3339().into());
        Self::with(t, file_id, processed_at)
    }

    fn with(t: Transaction, file_id: Arc<str>, processed_at: Arc<str>) -> Self {
        Self {
            file_id,
            amount: t.amount.to_string(),
            timestamp: t.timestamp.to_rfc3339(),
            processed_at,
            replaces_file: t.replaces.map(|v| v.file_id.to_string()),
            t,
        }
    }

    /// Every version's values; the file and the time, alike for all of a file's rows, are
    /// formatted once, not once a row.
    fn all(versions: &[Transaction]) -> Vec<Self> {
        let mut out: Vec<Self> = Vec::with_capacity(versions.len());
        for t in versions {
            let values = match out.last() {
                Some(p) if p.t.file_id == t.file_id && p.t.processed_at == t.processed_at => {
                    Self::with(t.clone(), p.file_id.clone(), p.processed_at.clone())
                }
                _ => Self::of(t.clone()),
            };
            out.push(values);
        }
        out
    }

    /// In [`TX_COLUMNS`] order, as `?1` to `?12`.
    fn execute(&self, stmt: &mut rusqlite::CachedStatement<'_>) -> rusqlite::Result<usize> {
        let (t, file_id, processed_at): (_, &str, &str) = (&self.t, &self.file_id, &self.processed_at);
        stmt.execute(params![
            t.transaction_id,
            file_id,
            self.amount,
            t.currency,
            self.timestamp,
            t.timestamp_epoch,
            t.merchant,
            t.status.as_str(),
            processed_at,
            t.version as i64,
            self.replaces_file,
            t.replaces.map(|v| v.version as i64),
        ])
    }
}

fn tx_from_row(r: &rusqlite::Row<'_>) -> Result<Transaction, StorageError> {
    let text = |i: usize| r.get::<_, String>(i).map_err(db_err);
    let corrupt = |what: &str| StorageError::corrupt(format!("transaction {what}"));
    let replaces = match (r.get::<_, Option<String>>(10).map_err(db_err)?, r.get::<_, Option<i64>>(11).map_err(db_err)?)
    {
        (Some(f), Some(v)) => {
            Some(VersionRef { file_id: f.parse().map_err(|_| corrupt("replaces_file"))?, version: v.max(0) as u64 })
        }
        _ => None,
    };
    Ok(Transaction {
        transaction_id: text(0)?,
        file_id: text(1)?.parse().map_err(|_| corrupt("file_id"))?,
        amount: text(2)?.parse().map_err(|_| corrupt("amount"))?,
        currency: text(3)?,
        timestamp: DateTime::parse_from_rfc3339(&text(4)?).map_err(|_| corrupt("timestamp"))?,
        timestamp_epoch: r.get(5).map_err(db_err)?,
        merchant: text(6)?,
        status: TxStatus::parse(&text(7)?).ok_or_else(|| corrupt("status"))?,
        processed_at: DateTime::parse_from_rfc3339(&text(8)?).map_err(|_| corrupt("processed_at"))?.with_timezone(&Utc),
        version: r.get::<_, i64>(9).map_err(db_err)?.max(1) as u64,
        replaces,
    })
}

/// A ledger write's rows, formatted on the caller's thread, and its statements: run on the
/// writer thread (see [`TransactionStore::write`] for the rules).
struct RowsWriter {
    versions: Vec<TxValues>,
    tt: String,
    new: String,
    next: String,
    keep: String,
}

impl SqliteStore {
    fn rows_writer(&self, versions: &[Transaction]) -> RowsWriter {
        let (tt, et) = (self.tx_table.clone(), self.earlier_table.clone());
        // formatted here, so the writer thread (every caller's writes in one line) only binds
        let versions = TxValues::all(versions);
        // the condition is in the write itself (a new transaction: insert unless the id exists;
        // a next version: update only the version it replaces, which its `replaces_*` columns,
        // ?11 and ?12, name), so the usual case costs one statement and no read. A new
        // transaction's version is only the current row (the file's rows are found through the
        // `-of-file` index); a next version first keeps the row it replaces as an earlier one.
        let new = format!(
            "INSERT INTO {tt} ({TX_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (transaction_id) DO NOTHING"
        );
        let next = format!(
            "UPDATE {tt} SET ({TX_COLUMNS}) = (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             WHERE transaction_id = ?1 AND file_id = ?11 AND version = ?12"
        );
        let keep = format!(
            "INSERT OR REPLACE INTO {et} ({TX_COLUMNS}) SELECT {TX_COLUMNS} FROM {tt}
             WHERE transaction_id = ?1 AND file_id = ?2 AND version = ?3"
        );
        RowsWriter { versions, tt, new, next, keep }
    }
}

impl RowsWriter {
    /// Writes the rows inside the writer's transaction; a refusal undoes them all and reads
    /// the refused rows as they are (the transaction is IMMEDIATE: no other process writes in
    /// between).
    fn write(&self, c: &Connection) -> Result<WriteOutcome, StorageError> {
        let (versions, tt) = (&self.versions, &self.tt);
        let statement = |sql: &str| c.prepare_cached(sql).map_err(db_err);
        statement("SAVEPOINT ledger")?.execute([]).map_err(db_err)?;
        let written = (|| -> Result<Vec<&Transaction>, StorageError> {
            let mut refused = Vec::new();
            // looked up in the statement cache once a call, not once a row
            let mut insert = statement(&self.new)?;
            for v in versions {
                if !refused.is_empty() {
                    // refused already: the rest are only checked
                    if !v.t.expects(SqliteStore::select_current(c, tt, &v.t.transaction_id)?.as_ref()) {
                        refused.push(&v.t);
                    }
                    continue;
                }
                let changed = match (v.t.replaces, &v.replaces_file) {
                    (Some(r), Some(file)) => {
                        // the row it replaces, if it is still the current one, kept first
                        let kept = statement(&self.keep)?
                            .execute(params![v.t.transaction_id, file, r.version as i64])
                            .map_err(db_err)?;
                        if kept == 1 {
                            v.execute(&mut statement(&self.next)?).map_err(db_err)?
                        } else {
                            0
                        }
                    }
                    _ => v.execute(&mut insert).map_err(db_err)?,
                };
                if changed != 1 {
                    refused.push(&v.t);
                }
            }
            Ok(refused)
        })();
        let refused = match written {
            Ok(r) if r.is_empty() => {
                statement("RELEASE ledger")?.execute([]).map_err(db_err)?;
                return Ok(WriteOutcome::Written);
            }
            Ok(r) => r,
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK TO ledger; RELEASE ledger");
                return Err(e);
            }
        };
        c.execute_batch("ROLLBACK TO ledger; RELEASE ledger").map_err(db_err)?;
        let mut stale = Vec::with_capacity(refused.len());
        for v in refused {
            stale.push((v.transaction_id.clone(), SqliteStore::select_current(c, tt, &v.transaction_id)?));
        }
        Ok(WriteOutcome::Stale(stale))
    }
}

/// Runs `f`'s reads in one read transaction: one snapshot of the database for all of them.
fn snapshot<T>(c: &mut Connection, f: impl FnOnce(&Connection) -> Result<T, StorageError>) -> Result<T, StorageError> {
    let tx = c.transaction().map_err(db_err)?;
    let out = f(&tx)?;
    tx.commit().map_err(db_err)?;
    Ok(out)
}

/// Brings a database from before versions up to date: adds the version columns to the
/// transactions table (each stored row is then its file's first version).
fn upgrade_transactions(conn: &Connection, tt: &str) -> Result<(), StorageError> {
    let has_version: bool = conn
        .prepare(&format!("SELECT 1 FROM pragma_table_info({}) WHERE name = 'version'", sql_text(tt)))
        .and_then(|mut s| s.exists([]))
        .map_err(db_err)?;
    if has_version {
        return Ok(());
    }
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         ALTER TABLE {tt} ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
         ALTER TABLE {tt} ADD COLUMN replaces_file TEXT;
         ALTER TABLE {tt} ADD COLUMN replaces_version INTEGER;
         COMMIT;"
    ))
    .map_err(db_err)
}

/// Makes `{ns}-transaction-versions` the view of every version: the current ones (the
/// transactions table) and the replaced ones (`et`), with the columns it had as a table. A
/// database from before, where it was a table holding every version again, keeps its replaced
/// versions in `et` (the others are the current rows), once, however many processes open it.
fn upgrade_versions(conn: &Connection, tt: &str, vt: &str, et: &str) -> Result<(), StorageError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(db_err)?;
    let kind: Option<String> = tx
        .query_row(&format!("SELECT type FROM sqlite_master WHERE name = {}", sql_text(vt)), [], |r| r.get(0))
        .optional()
        .map_err(db_err)?;
    if kind.as_deref() == Some("table") {
        tx.execute_batch(&format!(
            "INSERT OR REPLACE INTO {et} ({VERSIONS_COLUMNS}) SELECT {VERSIONS_COLUMNS} FROM {vt} AS v
              WHERE NOT EXISTS (SELECT 1 FROM {tt} AS t
                                WHERE t.transaction_id = v.transaction_id AND t.file_id = v.file_id);
             DROP TABLE {vt};"
        ))
        .map_err(db_err)?;
    }
    if kind.as_deref() != Some("view") {
        tx.execute_batch(&format!(
            // the versions table's own column order, so `SELECT *` on the view reads as it did
            "CREATE VIEW {vt} ({VERSIONS_COLUMNS}) AS SELECT {VERSIONS_COLUMNS} FROM {tt}
             UNION ALL SELECT {VERSIONS_COLUMNS} FROM {et};"
        ))
        .map_err(db_err)?;
    }
    tx.commit().map_err(db_err)
}

/// A quoted table name (`"ns-transactions"`) as an SQL string literal, for pragma functions.
fn sql_text(quoted_name: &str) -> String {
    let bare = quoted_name.trim_matches('"').replace("\"\"", "\"");
    format!("'{}'", bare.replace('\'', "''"))
}

impl SqliteStore {
    fn select_current(tx: &Connection, table: &str, id: &str) -> Result<Option<Transaction>, StorageError> {
        let sql = format!("SELECT {TX_COLUMNS} FROM {table} WHERE transaction_id = ?1");
        let mut stmt = tx.prepare_cached(&sql).map_err(db_err)?;
        let mut rows = stmt.query(params![id]).map_err(db_err)?;
        rows.next().map_err(db_err)?.map(tx_from_row).transpose()
    }

    fn select_version(
        c: &Connection,
        table: &str,
        file_id: FileId,
        id: &str,
    ) -> Result<Option<Transaction>, StorageError> {
        let sql = format!("SELECT {TX_COLUMNS} FROM {table} WHERE file_id = ?1 AND transaction_id = ?2");
        let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
        let mut rows = stmt.query(params![file_id.to_string(), id]).map_err(db_err)?;
        rows.next().map_err(db_err)?.map(tx_from_row).transpose()
    }

    fn delete_version(c: &Connection, table: &str, file_id: FileId, id: &str) -> Result<(), StorageError> {
        let sql = format!("DELETE FROM {table} WHERE file_id = ?1 AND transaction_id = ?2");
        c.prepare_cached(&sql).and_then(|mut st| st.execute(params![file_id.to_string(), id])).map_err(db_err)?;
        Ok(())
    }

    fn put_row(c: &Connection, table: &str, r: &Transaction) -> Result<(), StorageError> {
        let sql = format!(
            "INSERT OR REPLACE INTO {table} ({TX_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
        );
        let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
        TxValues::of(r.clone()).execute(&mut stmt).map_err(db_err)?;
        Ok(())
    }
}

#[async_trait]
impl TransactionStore for SqliteStore {
    async fn current(&self, ids: &[String]) -> Result<Vec<Transaction>, StorageError> {
        let (ids, table) = (ids.to_vec(), self.tx_table.clone());
        self.with(move |c| {
            let mut out = Vec::with_capacity(ids.len());
            for id in &ids {
                out.extend(Self::select_current(c, &table, id)?);
            }
            Ok(out)
        })
        .await
    }

    async fn write(&self, versions: &[Transaction]) -> Result<WriteOutcome, StorageError> {
        let rows = self.rows_writer(versions);
        self.write(move |c| rows.write(c)).await
    }

    async fn write_then(
        &self,
        versions: &[Transaction],
        then: StatusChange,
    ) -> Result<(WriteOutcome, Option<Advance>), StorageError> {
        let (rows, changer) = (self.rows_writer(versions), self.changer());
        let StatusChange { file_id, to, update, at } = then;
        let written = self
            .write(move |c| match rows.write(c)? {
                WriteOutcome::Written => {
                    // in the rows' savepoint: if the change fails, so does the whole write
                    let changed = changer.change(c, file_id, move |r| r.advance(to, update, at))?;
                    Ok((WriteOutcome::Written, Some(changed)))
                }
                stale => Ok((stale, None)),
            })
            .await;
        let (outcome, changed) = written.map_err(|e| self.forgotten(file_id, e))?;
        Ok((outcome, changed.map(|(advance, seen)| self.kept(file_id, advance, seen))))
    }

    async fn revert(&self, file_id: FileId, transaction_id: &str) -> Result<(), StorageError> {
        let (id, tt, et) = (transaction_id.to_owned(), self.tx_table.clone(), self.earlier_table.clone());
        self.write(move |c| {
            let tx = c; // inside the writer's transaction
            let current = Self::select_current(tx, &tt, &id)?;
            if let Some(mine) = current.filter(|t| t.file_id == file_id) {
                // the file's version is the current one: the one it replaced is current again
                let earlier = match mine.replaces {
                    Some(r) => Self::select_version(tx, &et, r.file_id, &id)?,
                    None => None,
                };
                match earlier {
                    Some(e) => {
                        Self::put_row(tx, &tt, &e)?;
                        Self::delete_version(tx, &et, e.file_id, &id)?;
                    }
                    None => {
                        tx.execute(&format!("DELETE FROM {tt} WHERE transaction_id = ?1"), params![id])
                            .map_err(db_err)?;
                    }
                }
            }
            // a version a later one replaced is forgotten
            Self::delete_version(tx, &et, file_id, &id)
        })
        .await
    }

    async fn version(&self, file_id: FileId, transaction_id: &str) -> Result<Option<Transaction>, StorageError> {
        let (id, tt, et) = (transaction_id.to_owned(), self.tx_table.clone(), self.earlier_table.clone());
        self.with(move |c| {
            snapshot(c, |c| match Self::select_current(c, &tt, &id)? {
                Some(current) if current.file_id == file_id => Ok(Some(current)),
                _ => Self::select_version(c, &et, file_id, &id),
            })
        })
        .await
    }

    async fn list_by_file(
        &self,
        file_id: FileId,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<TransactionPage, StorageError> {
        let after = cursor.map(decode_cursor).transpose()?.unwrap_or_default();
        let page = |table: &str| {
            format!(
                "SELECT {TX_COLUMNS} FROM {table} WHERE file_id = ?1 AND transaction_id > ?2
                 ORDER BY transaction_id LIMIT ?3"
            )
        };
        // a file's versions are its current rows (through the -of-file index) and its replaced
        // ones: a page of each, merged by id (a version is in one table or the other, never both)
        let (current, earlier) = (page(&self.tx_table), page(&self.earlier_table));
        let limit = limit.max(1);
        // one snapshot for both (a version can move from one table to the other meanwhile)
        let read_both = move |c: &Connection| {
            let read = |sql: &str| -> Result<Vec<Transaction>, StorageError> {
                let mut stmt = c.prepare_cached(sql).map_err(db_err)?;
                let mut rows = stmt.query(params![file_id.to_string(), after, (limit + 1) as i64]).map_err(db_err)?;
                let mut items = Vec::new();
                while let Some(r) = rows.next().map_err(db_err)? {
                    items.push(tx_from_row(r)?);
                }
                Ok(items)
            };
            Ok((read(&current)?, read(&earlier)?))
        };
        self.with(move |c| {
            let (mut items, earlier) = snapshot(c, read_both)?;
            // at most two pages: sorted in place rather than merged
            items.extend(earlier);
            items.sort_unstable_by(|a, b| a.transaction_id.cmp(&b.transaction_id));
            let next_cursor = if items.len() > limit {
                items.truncate(limit);
                items.last().map(|t| encode_cursor(&t.transaction_id))
            } else {
                None
            };
            Ok(TransactionPage { items, next_cursor })
        })
        .await
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.readable(&self.versions_table).await
    }
}

impl SqliteStore {
    /// Changes a status record atomically across processes: `change` says whether it changed it.
    async fn modify(
        &self,
        file_id: FileId,
        change: impl FnOnce(&mut StatusRecord) -> bool + Send + 'static,
    ) -> Result<Advance, StorageError> {
        let changer = self.changer();
        let written = self.write(move |c| changer.change(c, file_id, change)).await;
        self.settled(file_id, written)
    }

    /// What a status change needs on the writer thread.
    fn changer(&self) -> Changer {
        Changer {
            select: format!("SELECT record FROM {} WHERE file_id = ?1", self.status_table),
            write: format!(
                "UPDATE {} SET status = ?2, updated_at = ?3, record = ?4 WHERE file_id = ?1",
                self.status_table
            ),
            known: self.known.clone(),
        }
    }

    /// A status change's outcome once its write is committed (or not): the record is
    /// remembered only then, so an entry always describes a stored row.
    fn settled(
        &self,
        file_id: FileId,
        written: Result<(Advance, Known), StorageError>,
    ) -> Result<Advance, StorageError> {
        written.map(|(advance, seen)| self.kept(file_id, advance, seen)).map_err(|e| self.forgotten(file_id, e))
    }

    /// A committed change: its record remembered.
    fn kept(&self, file_id: FileId, advance: Advance, seen: Known) -> Advance {
        self.remember(file_id, seen);
        advance
    }

    /// A write that failed: what this process remembers of the file may be stale.
    fn forgotten(&self, file_id: FileId, e: StorageError) -> StorageError {
        self.known().forget(file_id);
        e
    }

    /// Drops every table of the namespace (`txpipe teardown` for local storage).
    pub async fn drop_tables(&self) -> Result<(), StorageError> {
        let tables = [
            &self.status_table,
            &self.tx_table,
            &self.earlier_table,
            &self.keys_table,
            &self.usage_table,
            &self.idem_table,
            &self.objects_table,
        ]
        .map(|t| format!("DROP TABLE IF EXISTS {t};"))
        .concat();
        let sql = format!("DROP VIEW IF EXISTS {};{tables}", self.versions_table);
        self.write(move |c| c.execute_batch(&sql).map_err(db_err)).await
    }
}

/// The local object store's objects kept in the database ([`super::local`] decides which).
impl SqliteStore {
    /// Stores `body` under `key` (replacing what was there) in the writer's next transaction,
    /// unless `abandoned` is set by the time the write runs (the put's caller went away).
    pub(crate) async fn put_object(
        &self,
        key: &str,
        body: Vec<u8>,
        abandoned: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<(), StorageError> {
        let sql = format!(
            "INSERT INTO {} (key, body) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET body = excluded.body",
            self.objects_table
        );
        let key = key.to_owned();
        self.write(move |c| {
            if abandoned.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StorageError::upload_failed(std::io::Error::other("the upload was abandoned")));
            }
            c.prepare_cached(&sql).and_then(|mut st| st.execute(params![key, body])).map(|_| ()).map_err(db_err)
        })
        .await
    }

    /// The body stored under `key`, if the database holds it.
    pub(crate) async fn get_object(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let sql = format!("SELECT body FROM {} WHERE key = ?1", self.objects_table);
        let key = key.to_owned();
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
            stmt.query_row(params![key], |r| r.get(0)).optional().map_err(db_err)
        })
        .await
    }

    /// Removes `key` if the database holds it.
    pub(crate) async fn delete_object(&self, key: &str) -> Result<(), StorageError> {
        let sql = format!("DELETE FROM {} WHERE key = ?1", self.objects_table);
        let key = key.to_owned();
        self.write(move |c| {
            c.prepare_cached(&sql).and_then(|mut st| st.execute(params![key])).map(|_| ()).map_err(db_err)
        })
        .await
    }

    /// How many objects under `prefix` the database holds.
    pub async fn object_count(&self, prefix: &str) -> Result<usize, StorageError> {
        // compared as text rather than with LIKE, whose _ and % a key may hold
        let sql = format!("SELECT count(*) FROM {} WHERE substr(key, 1, length(?1)) = ?1", self.objects_table);
        let prefix = prefix.to_owned();
        self.with(move |c| c.query_row(&sql, params![prefix], |r| r.get::<_, i64>(0)).map_err(db_err))
            .await
            .map(|n| n as usize)
    }

    /// Ok when the objects table can be read.
    pub(crate) async fn check_objects(&self) -> Result<(), StorageError> {
        self.readable(&self.objects_table).await
    }
}

fn key_from_json(s: &str) -> Result<ApiKeyRecord, StorageError> {
    serde_json::from_str(s).map_err(|e| StorageError::corrupt("API key record").with_source(e))
}

#[async_trait]
impl ApiKeyStore for SqliteStore {
    async fn create(&self, key: &ApiKeyRecord) -> Result<(), StorageError> {
        let sql = format!("INSERT INTO {} (name, hash, record) VALUES (?1, ?2, ?3)", self.keys_table);
        let (name, hash) = (key.name.clone(), key.hash.clone());
        let json = serde_json::to_string(key).expect("a key record always serializes");
        self.write(move |c| match c.execute(&sql, params![name, hash, json]) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StorageError::already_exists(format!("API key {name}")))
            }
            Err(e) => Err(db_err(e)),
        })
        .await
    }

    async fn get_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StorageError> {
        let sql = format!("SELECT record FROM {} WHERE hash = ?1", self.keys_table);
        let hash = hash.to_owned();
        let json: Option<String> = self
            .quick(move |c| {
                c.prepare_cached(&sql).and_then(|mut st| st.query_row(params![hash], |r| r.get(0)).optional())
            })
            .await?;
        json.as_deref().map(key_from_json).transpose()
    }

    async fn list(&self) -> Result<Vec<ApiKeyRecord>, StorageError> {
        let sql = format!("SELECT record FROM {} ORDER BY name", self.keys_table);
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(db_err)?;
            rows.map(|r| key_from_json(&r.map_err(db_err)?)).collect()
        })
        .await
    }

    async fn revoke(&self, name: &str, at: DateTime<Utc>) -> Result<(), StorageError> {
        let select = format!("SELECT record FROM {} WHERE name = ?1", self.keys_table);
        let write = format!("UPDATE {} SET record = ?2 WHERE name = ?1", self.keys_table);
        let name = name.to_owned();
        self.write(move |c| {
            let tx = c; // inside the writer's transaction
            let json: Option<String> = tx.query_row(&select, params![name], |r| r.get(0)).optional().map_err(db_err)?;
            let mut key = key_from_json(&json.ok_or_else(|| StorageError::not_found(format!("API key {name}")))?)?;
            if key.revoked_at.is_none() {
                key.revoked_at = Some(at);
                let json = serde_json::to_string(&key).expect("a key record always serializes");
                tx.execute(&write, params![name, json]).map_err(db_err)?;
            }
            Ok(())
        })
        .await
    }

    async fn consume(&self, name: &str, day: NaiveDate, limit: u64) -> Result<QuotaUse, StorageError> {
        let ut = &self.usage_table;
        // the conditional counter: counts only while under the limit, in one statement (the
        // only one an upload needs once the key has a row for the day)
        let count =
            format!("UPDATE {ut} SET count = count + 1 WHERE name = ?1 AND day = ?2 AND count < ?3 RETURNING count");
        let start = format!("INSERT INTO {ut} (name, day, count) VALUES (?1, ?2, 0) ON CONFLICT DO NOTHING");
        // earlier days are of no use any more: keep the table to a row or two per key
        let forget = format!("DELETE FROM {ut} WHERE name = ?1 AND day < ?2");
        let (name, day, limit) = (name.to_owned(), day.to_string(), i64::try_from(limit).unwrap_or(i64::MAX));
        self.write(move |c| {
            let tx = c; // inside the writer's transaction
            let counted = || -> Result<Option<i64>, StorageError> {
                tx.prepare_cached(&count)
                    .and_then(|mut st| st.query_row(params![name, day, limit], |r| r.get(0)).optional())
                    .map_err(db_err)
            };
            let mut n = counted()?;
            if n.is_none() {
                // no row for the day yet (else it is at the limit): the day's first upload
                let started =
                    tx.prepare_cached(&start).and_then(|mut st| st.execute(params![name, day])).map_err(db_err)?;
                if started == 1 {
                    tx.prepare_cached(&forget).and_then(|mut st| st.execute(params![name, day])).map_err(db_err)?;
                    n = counted()?;
                }
            }
            Ok(match n {
                Some(n) => QuotaUse::Counted(n.max(0) as u64),
                None => QuotaUse::Exhausted,
            })
        })
        .await
    }

    async fn give_back(&self, name: &str, day: NaiveDate) -> Result<(), StorageError> {
        let sql =
            format!("UPDATE {} SET count = count - 1 WHERE name = ?1 AND day = ?2 AND count > 0", self.usage_table);
        let (name, day) = (name.to_owned(), day.to_string());
        self.write(move |c| c.execute(&sql, params![name, day]).map(|_| ()).map_err(db_err)).await
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.readable(&self.keys_table).await
    }
}

fn upload_from_json(s: &str) -> Result<IdempotentUpload, StorageError> {
    serde_json::from_str(s).map_err(|e| StorageError::corrupt("idempotency record").with_source(e))
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn claim(&self, claim: &NewClaim) -> Result<Claim, StorageError> {
        let t = &self.idem_table;
        // records expire by time: whatever is past its window is deleted on the way (the index
        // on expires_at keeps that cheap), so the table holds a day of keys at most
        let forget = format!("DELETE FROM {t} WHERE expires_at <= ?1");
        let select = format!("SELECT lease_until, upload FROM {t} WHERE key = ?1");
        let put = format!(
            "INSERT OR REPLACE INTO {t} (key, token, lease_until, expires_at, upload) VALUES (?1, ?2, ?3, ?4, NULL)"
        );
        let c = claim.clone();
        self.write(move |tx| {
            // in the writer's IMMEDIATE transaction: the check and the claim are one step
            tx.execute(&forget, params![c.now.timestamp()]).map_err(db_err)?;
            let found: Option<(i64, Option<String>)> =
                tx.query_row(&select, params![c.key], |r| Ok((r.get(0)?, r.get(1)?))).optional().map_err(db_err)?;
            let outcome = match found {
                Some((_, Some(upload))) => return Ok(Claim::Done(upload_from_json(&upload)?)),
                Some((lease_until, None)) if lease_until > c.now.timestamp_millis() => return Ok(Claim::InFlight),
                // free, or held by a claim whose lease ran out
                _ => Claim::Claimed,
            };
            let row = params![c.key, c.token, c.lease_until.timestamp_millis(), c.expires_at.timestamp()];
            tx.execute(&put, row).map_err(db_err)?;
            Ok(outcome)
        })
        .await
    }

    async fn complete(&self, key: &str, token: &str, upload: &IdempotentUpload) -> Result<bool, StorageError> {
        let sql =
            format!("UPDATE {} SET upload = ?3 WHERE key = ?1 AND token = ?2 AND upload IS NULL", self.idem_table);
        let (key, token) = (key.to_owned(), token.to_owned());
        let json = serde_json::to_string(upload).expect("an upload always serializes");
        self.write(move |c| c.execute(&sql, params![key, token, json]).map(|n| n == 1).map_err(db_err)).await
    }

    async fn renew(&self, key: &str, token: &str, lease_until: DateTime<Utc>) -> Result<bool, StorageError> {
        let sql =
            format!("UPDATE {} SET lease_until = ?3 WHERE key = ?1 AND token = ?2 AND upload IS NULL", self.idem_table);
        let (key, token, until) = (key.to_owned(), token.to_owned(), lease_until.timestamp_millis());
        self.write(move |c| c.execute(&sql, params![key, token, until]).map(|n| n == 1).map_err(db_err)).await
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), StorageError> {
        let sql = format!("DELETE FROM {} WHERE key = ?1 AND token = ?2 AND upload IS NULL", self.idem_table);
        let (key, token) = (key.to_owned(), token.to_owned());
        self.write(move |c| c.execute(&sql, params![key, token]).map(|_| ()).map_err(db_err)).await
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.readable(&self.idem_table).await
    }
}

/// The status table's listing columns (`owner`, `listed_key`) and their indexes, for
/// `GET /files`: added to a table made before they existed, and filled in for its rows.
struct ListingIndexes {
    table: String,
    by_owner: String,
    by_time: String,
}

impl ListingIndexes {
    fn of(names: &Names) -> Self {
        Self {
            table: quoted(&names.status_table()),
            by_owner: quoted(&format!("{}-by-owner", names.status_table())),
            by_time: quoted(&format!("{}-by-time", names.status_table())),
        }
    }

    fn ensure(&self, conn: &Connection) -> Result<(), StorageError> {
        let t = &self.table;
        // IMMEDIATE, and the check inside it: two processes opening one database at once add
        // the columns once
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(db_err)?;
        let columns: Vec<String> = tx
            .prepare(&format!("SELECT name FROM pragma_table_info('{}')", t.trim_matches('"').replace('\'', "''")))
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(db_err)?;
        if !columns.iter().any(|c| c == "listed_key") {
            tx.execute_batch(&format!(
                "ALTER TABLE {t} ADD COLUMN owner TEXT; ALTER TABLE {t} ADD COLUMN listed_key TEXT;"
            ))
            .map_err(db_err)?;
            // records from before: their owner and time are in their JSON
            let old: Vec<(String, String)> = tx
                .prepare(&format!("SELECT file_id, record FROM {t}"))
                .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(db_err)?;
            for (id, json) in old {
                let record = from_json(&json)?;
                tx.execute(
                    &format!("UPDATE {t} SET owner = ?2, listed_key = ?3 WHERE file_id = ?1"),
                    params![id, record.uploaded_by, listing_key(&record)],
                )
                .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        let (o, b) = (&self.by_owner, &self.by_time);
        conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS {o} ON {t} (owner, listed_key);
             CREATE INDEX IF NOT EXISTS {b} ON {t} (listed_key);"
        ))
        .map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A short read runs on the calling worker when SQLite answers at once; when it answers busy
    /// (another process recovering the WAL, say), the read runs again on the blocking pool,
    /// where it may wait out the busy timeout without holding up the worker's other tasks.
    #[tokio::test(flavor = "current_thread")]
    // held on purpose: the read must go round the held connection, not wait for it
    #[allow(clippy::await_holding_lock)]
    async fn a_quick_read_that_meets_a_busy_database_waits_on_the_blocking_pool() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("txpipe.sqlite3"), &Names::new("unit").unwrap()).await.unwrap();
        let here = std::thread::current().id();
        let read = |c: &mut Connection| c.query_row("SELECT 7", [], |r| r.get::<_, i64>(0));

        let ran_on = store.quick(move |c| read(c).map(|v| (v, std::thread::current().id()))).await.unwrap();
        assert_eq!(ran_on, (7, here), "answered at once: read in place");

        let busy_once = Arc::new(AtomicBool::new(true));
        let flag = busy_once.clone();
        let ran_on = store
            .quick(move |c| {
                if flag.swap(false, Ordering::SeqCst) {
                    let busy = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY);
                    return Err(rusqlite::Error::SqliteFailure(busy, None));
                }
                read(c).map(|v| (v, std::thread::current().id()))
            })
            .await
            .unwrap();
        assert_eq!(ran_on.0, 7);
        assert_ne!(ran_on.1, here, "busy: read again on the blocking pool");

        // another task holding the quick connection: straight to the blocking pool
        let held = store.quick.lock().unwrap();
        let ran_on = store.quick(move |c| read(c).map(|v| (v, std::thread::current().id()))).await.unwrap();
        drop(held);
        assert_ne!(ran_on.1, here);

        // any other error is the answer, not a reason to read again
        let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = tries.clone();
        let _refused = store
            .quick(move |c| {
                counted.fetch_add(1, Ordering::SeqCst);
                c.query_row("SELECT * FROM no_such_table", [], |r| r.get::<_, i64>(0))
            })
            .await
            .unwrap_err();
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }
}
