//! Group commit for the embedded table store: one writer thread per database owns the write
//! connection and commits every caller's writes that queued up while its last commit was
//! being synced in one transaction, so many callers share one fsync instead of paying one each.
//!
//! Each write runs inside the batch's transaction in a savepoint of its own: a write that fails
//! is rolled back alone and its caller gets its error; the others still commit. A caller hears
//! back only after the whole batch is committed and synced (`synchronous=FULL`), so a message
//! acked after a write is acked after its effects are on disk. The transaction is `IMMEDIATE`:
//! other processes sharing the database file (separate binaries on one host) are serialised by
//! SQLite's own lock, as before.

use super::StorageError;
use rusqlite::Connection;
use std::panic::AssertUnwindSafe;
use tokio::sync::{mpsc, oneshot};

/// The most writes committed in one transaction: bounds how long one batch holds the lock.
const MAX_BATCH: usize = 1024;

/// What a queued write does once the batch is committed (or not): sends its caller the outcome.
type Finish = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A queued write: runs inside the batch's transaction (or is told why there is none) and
/// returns how to answer its caller.
type Job = Box<dyn FnOnce(Result<&Connection, &str>) -> Finish + Send>;

/// The handle callers write through; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Writer {
    /// Starts the writer thread on `conn` (already open and set up).
    pub fn start(conn: Connection, name: String) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::unbounded_channel();
        std::thread::Builder::new().name(name).spawn(move || serve(conn, queue))?;
        Ok(Self { jobs })
    }

    /// Runs `f` in the next batch's transaction; its result once that batch is durable.
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |conn: Result<&Connection, &str>| {
            let result = match conn {
                Ok(conn) => in_savepoint(conn, f),
                Err(why) => Err(StorageError::unavailable(format!("sqlite: cannot begin a write: {why}"))),
            };
            Box::new(move |committed: Result<(), String>| {
                let _ = answer.send(match committed {
                    Ok(()) => result,
                    // a refusal (not found, already exists, …) stands whatever became of the batch
                    Err(_) if result.as_ref().is_err_and(|e| !e.is_transient()) => result,
                    Err(why) => Err(StorageError::unavailable(format!("sqlite commit failed: {why}"))),
                });
            })
        });
        self.jobs.send(job).map_err(|_| StorageError::unavailable("the sqlite writer has stopped"))?;
        answered.await.map_err(|_| StorageError::unavailable("the sqlite writer has stopped"))?
    }
}

/// Runs one write in a savepoint: kept if it succeeds, rolled back alone if it fails or panics.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    run(conn, "SAVEPOINT w").map_err(|e| StorageError::unavailable("sqlite savepoint").with_source(e))?;
    let result = match std::panic::catch_unwind(AssertUnwindSafe(|| f(conn))) {
        Ok(r) => r,
        Err(_) => Err(StorageError::unavailable("a sqlite write panicked")),
    };
    let end = if result.is_ok() { Ok(()) } else { run(conn, "ROLLBACK TO w") };
    if let Err(e) = end.and_then(|()| run(conn, "RELEASE w")) {
        return Err(StorageError::unavailable("sqlite savepoint").with_source(e));
    }
    result
}

/// Runs a statement without parameters, prepared once per connection (thousands run a second).
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// The writer thread: takes what is queued (at least one write), commits it as one
/// transaction, answers every caller, and again, until every handle is dropped.
fn serve(conn: Connection, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (finishes, committed): (Vec<Finish>, Result<(), String>) = match run(&conn, "BEGIN IMMEDIATE") {
            Err(e) => {
                // not begun (the lock stayed busy past the timeout, the disk failed): no write
                // runs, each caller hears why
                let why = e.to_string();
                tracing::warn!(error = %why, "sqlite: cannot begin a write transaction");
                (batch.drain(..).map(|job| job(Err(&why))).collect(), Ok(()))
            }
            Ok(()) => {
                let finishes = batch.drain(..).map(|job| job(Ok(&conn))).collect();
                let committed = run(&conn, "COMMIT").map_err(|e| {
                    let _ = run(&conn, "ROLLBACK");
                    e.to_string()
                });
                (finishes, committed)
            }
        };
        for finish in finishes {
            finish(committed.clone());
        }
    }
}
