//! Local storage: where a namespace's data lives under the data directory ([`LocalLayout`]),
//! and the embedded object store: an object of up to [`IN_DATABASE_MAX`] bytes (a file of a
//! few hundred rows, nearly every upload) is a row of the database's `{ns}-csv-files` table,
//! a larger one a file under a directory (the "bucket").
//!
//! Why small objects live in the database: a row is written by the store's writer thread in
//! the same group commit as the status changes around it, so a thousand uploads a second cost
//! a few hundred WAL fsyncs shared with everything else; a file costs each upload a new inode,
//! a file fsync and a share of a directory fsync (measured: about half of `txpipe up`'s CPU on
//! ext4 without a journal, see docs/benchmarks.md). Reads look in the database first, then in
//! the directory, so objects written as files by earlier versions are still found; a put of a
//! large object removes any database copy under its key, so the newest put always wins.
//!
//! A file object is written to a temporary file, synced and renamed into place, so a reader never
//! sees half an object and a failed upload leaves nothing behind; then its directory is synced
//! too, so the rename itself is on disk before the put returns (an fsync of the file does not
//! cover the name it gets later). Directory syncs are shared ([`DirSyncs`]): one fsync of a
//! directory covers every rename made into it before the fsync began, so uploads finishing
//! together wait for one.

use super::sqlite::SqliteStore;
use super::{ByteStream, ObjectReader, ObjectStore, StorageError};
use crate::config::Settings;
use crate::names::Names;
use async_trait::async_trait;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Where local storage keeps a namespace: its large objects in `{data_dir}/objects/{bucket}` and
/// its tables (and small objects) in the database `{data_dir}/txpipe.sqlite3` (shared by every
/// namespace). The services,
/// `txpipe provision`/`teardown` and the tests all find the files through this.
#[derive(Clone, Debug)]
pub struct LocalLayout {
    pub data_dir: PathBuf,
    pub names: Names,
}

impl LocalLayout {
    pub fn new(data_dir: impl Into<PathBuf>, names: &Names) -> Self {
        Self { data_dir: data_dir.into(), names: names.clone() }
    }

    /// The layout `settings` name: their data directory and namespace.
    pub fn of(settings: &Settings) -> Self {
        Self::new(&settings.data_dir, &settings.names())
    }

    /// The directory that plays the namespace's bucket.
    pub fn objects_dir(&self) -> PathBuf {
        self.data_dir.join("objects").join(self.names.bucket())
    }

    /// The SQLite database file holding the tables.
    pub fn database(&self) -> PathBuf {
        self.data_dir.join("txpipe.sqlite3")
    }
}

pub struct LocalObjectStore {
    root: PathBuf,
    syncs: std::sync::Arc<DirSyncs>,
    /// Where objects of up to [`IN_DATABASE_MAX`] bytes are kept.
    db: std::sync::Arc<SqliteStore>,
}

/// The largest object kept in the database rather than as a file: 64 KiB is a file of about 700
/// rows; SQLite reads and writes blobs this small faster than a filesystem does files, and the
/// writer thread copies one in microseconds.
pub const IN_DATABASE_MAX: usize = 64 * 1024;

fn unavailable(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::unavailable(format!("{what} {}", path.display())).with_source(e)
}

impl LocalObjectStore {
    /// Uses (and creates) the directory `root` for large objects, and `db`'s objects table
    /// for small ones.
    pub fn open(root: PathBuf, db: std::sync::Arc<SqliteStore>) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&root).map_err(|e| unavailable("cannot create the object directory", &root, e))?;
        Ok(Self { root, syncs: Default::default(), db })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        let safe = !key.is_empty()
            && !key.starts_with('/')
            && key.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        if !safe {
            return Err(StorageError::not_found(format!("object {key:?} (not a valid key)")));
        }
        Ok(self.root.join(key))
    }
}

/// The largest body written in one piece (gathered in memory first): a few in-flight uploads
/// of this size cost little memory, and 100-row files are about 9 KB.
const WHOLE_MAX: usize = 256 * 1024;

/// A fresh temporary file name in `dir` (hidden, so a listing of objects never shows it).
fn temporary_beside(dir: &Path) -> PathBuf {
    dir.join(format!(".{}.part", uuid::Uuid::new_v4()))
}

/// Sets its flag when the put that owns it is dropped (its client gone) before the write
/// finished.
#[derive(Default)]
struct DroppedFlag {
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: bool,
}

impl Drop for DroppedFlag {
    fn drop(&mut self) {
        if !self.done {
            self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Writes a whole object: a temporary file beside it, synced, renamed into place (unless the
/// put was dropped meanwhile: then the temporary file goes), the rename synced.
fn write_whole(
    path: &Path,
    chunks: &[bytes::Bytes],
    dropped: &std::sync::atomic::AtomicBool,
    syncs: &DirSyncs,
) -> Result<u64, StorageError> {
    use std::io::Write;
    let dir = path.parent().expect("a key has a parent directory");
    syncs.ensure_dir(dir)?;
    let tmp = temporary_beside(dir);
    let guard = RemoveOnDrop(Some(tmp.clone()));
    let mut file = std::fs::File::create(&tmp).map_err(|e| unavailable("cannot create", &tmp, e))?;
    let mut size = 0u64;
    for chunk in chunks {
        file.write_all(chunk).map_err(|e| unavailable("cannot write", &tmp, e))?;
        size += chunk.len() as u64;
    }
    file.sync_all().map_err(|e| unavailable("cannot sync", &tmp, e))?;
    if dropped.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(StorageError::upload_failed(std::io::Error::other("the upload was abandoned")));
    }
    std::fs::rename(&tmp, path).map_err(|e| unavailable("cannot rename into", path, e))?;
    guard.keep();
    if let Err(e) = syncs.sync(dir) {
        // the put fails, so nothing may stay behind (no record will ever name it)
        let _ = std::fs::remove_file(path);
        return Err(unavailable("cannot sync the directory", dir, e));
    }
    Ok(size)
}

/// Shared fsyncs of directories (a group commit for renames). A caller that renamed a file
/// into a directory takes a ticket, then waits until a sync that began after its ticket has
/// finished, or runs one itself if none is running: so while one fsync runs, the renames made
/// meanwhile all wait for the next, one fsync for all of them. Blocking: call it on the
/// blocking pool.
#[derive(Default)]
pub(crate) struct DirSyncs {
    dirs: std::sync::Mutex<std::collections::HashMap<PathBuf, std::sync::Arc<DirSync>>>,
}

#[derive(Default)]
struct DirSync {
    state: std::sync::Mutex<SyncState>,
    done: std::sync::Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Tickets handed out (each after a rename).
    taken: u64,
    /// Every ticket up to this one is on disk.
    synced: u64,
    running: bool,
}

impl DirSyncs {
    /// Makes `dir` if it is missing, and makes its own name durable then (syncing its parent).
    fn ensure_dir(&self, dir: &Path) -> Result<(), StorageError> {
        if dir.is_dir() {
            return Ok(());
        }
        std::fs::create_dir_all(dir).map_err(|e| unavailable("cannot create", dir, e))?;
        match dir.parent() {
            Some(parent) => self.sync(parent).map_err(|e| unavailable("cannot sync the directory", parent, e)),
            None => Ok(()),
        }
    }

    /// Returns once every rename made into `dir` before the call is on disk.
    pub(crate) fn sync(&self, dir: &Path) -> std::io::Result<()> {
        let one = {
            let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
            match dirs.get(dir) {
                Some(one) => one.clone(),
                None => dirs.entry(dir.to_owned()).or_default().clone(),
            }
        };
        let mut state = one.state.lock().unwrap_or_else(|p| p.into_inner());
        state.taken += 1;
        let ticket = state.taken;
        while state.synced < ticket {
            if state.running {
                state = one.done.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // every ticket taken so far was taken after its rename: this sync covers them all
            let upto = state.taken;
            state.running = true;
            drop(state);
            let synced = std::fs::File::open(dir).and_then(|d| d.sync_all());
            state = one.state.lock().unwrap_or_else(|p| p.into_inner());
            state.running = false;
            one.done.notify_all();
            // on failure the waiting callers try a sync of their own; this one reports it
            synced?;
            state.synced = state.synced.max(upto);
        }
        Ok(())
    }
}

/// Removes a temporary file when dropped, unless it was kept (renamed into place).
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl LocalObjectStore {
    /// After a file object is in place under `key`: removes any database copy of `key` (an
    /// earlier small put), which reads would otherwise find first. If that fails the put
    /// fails, and the file goes too.
    async fn superseded(&self, path: &Path, key: &str, size: u64) -> Result<u64, StorageError> {
        match self.db.delete_object(key).await {
            Ok(()) => Ok(size),
            Err(e) => {
                let _ = tokio::fs::remove_file(path).await;
                Err(e)
            }
        }
    }

    /// A body too large to gather: streamed to a temporary file chunk by chunk, `head` first.
    async fn put_streaming(
        &self,
        path: &Path,
        head: Vec<bytes::Bytes>,
        mut body: ByteStream,
    ) -> Result<u64, StorageError> {
        let dir = path.parent().expect("a key has a parent directory");
        let (syncs, made) = (self.syncs.clone(), dir.to_owned());
        tokio::task::spawn_blocking(move || syncs.ensure_dir(&made))
            .await
            .map_err(|e| StorageError::unavailable("directory task failed").with_source(e))??;
        let tmp = temporary_beside(dir);
        // a put dropped half-way (its client gone) removes its temporary file too
        let guard = RemoveOnDrop(Some(tmp.clone()));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| unavailable("cannot create", &tmp, e))?;
        let mut size = 0u64;
        for chunk in head {
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(|e| unavailable("cannot write", &tmp, e))?;
        }
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(StorageError::upload_failed)?;
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(|e| unavailable("cannot write", &tmp, e))?;
        }
        file.sync_all().await.map_err(|e| unavailable("cannot sync", &tmp, e))?;
        tokio::fs::rename(&tmp, path).await.map_err(|e| unavailable("cannot rename into", path, e))?;
        guard.keep();
        let (syncs, dir) = (self.syncs.clone(), dir.to_owned());
        let synced = tokio::task::spawn_blocking(move || {
            syncs.sync(&dir).map_err(|e| unavailable("cannot sync the directory", &dir, e))
        })
        .await
        .map_err(|e| StorageError::unavailable("directory sync task failed").with_source(e))
        .and_then(|r| r);
        if synced.is_err() {
            // as above: a failed put leaves nothing behind
            let _ = tokio::fs::remove_file(path).await;
        }
        synced.map(|()| size)
    }
}

#[async_trait]
impl ObjectStore for LocalObjectStore {
    async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, StorageError> {
        let path = self.path(key)?;
        // most uploads are small: gathered here, then stored in one piece (a database row, or a
        // file written, synced and renamed in one task on the blocking pool); a larger body streams
        let mut head = Vec::new();
        let mut size = 0usize;
        while size <= WHOLE_MAX {
            match body.next().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(StorageError::upload_failed)?;
                    size += chunk.len();
                    head.push(chunk);
                }
                None => {
                    // the client may go away meanwhile: the write then stores nothing
                    let mut dropped = DroppedFlag::default();
                    let flag = dropped.flag.clone();
                    if size <= IN_DATABASE_MAX {
                        let written = self.db.put_object(key, head.concat(), flag).await;
                        dropped.done = true;
                        return written.map(|()| size as u64);
                    }
                    let syncs = self.syncs.clone();
                    let file = path.clone();
                    let written = tokio::task::spawn_blocking(move || write_whole(&file, &head, &flag, &syncs)).await;
                    dropped.done = true;
                    let size =
                        written.map_err(|e| StorageError::unavailable("object write task failed").with_source(e))??;
                    return self.superseded(&path, key, size).await;
                }
            }
        }
        let size = self.put_streaming(&path, head, body).await?;
        self.superseded(&path, key, size).await
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        let path = self.path(key)?;
        if let Some(body) = self.db.get_object(key).await? {
            return Ok(Box::new(std::io::Cursor::new(body)));
        }
        match tokio::fs::File::open(&path).await {
            Ok(f) => Ok(Box::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StorageError::not_found(format!("object {key}")).with_source(e))
            }
            Err(e) => Err(unavailable("cannot open", &path, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        self.db.delete_object(key).await?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(unavailable("cannot delete", &path, e)),
        }
    }

    async fn check(&self) -> Result<(), StorageError> {
        let meta = tokio::fs::metadata(&self.root).await.map_err(|e| unavailable("cannot reach", &self.root, e))?;
        if meta.is_dir() {
            self.db.check_objects().await
        } else {
            Err(StorageError::misconfigured(format!("{} is not a directory", self.root.display())))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn concurrent_renames_share_directory_syncs_and_all_return_durable() {
        let dir = tempfile::tempdir().unwrap();
        let syncs = std::sync::Arc::new(DirSyncs::default());
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (syncs, root) = (syncs.clone(), dir.path().to_owned());
                std::thread::spawn(move || {
                    let tmp = temporary_beside(&root);
                    std::fs::write(&tmp, b"x").unwrap();
                    std::fs::rename(&tmp, root.join(format!("{i}.csv"))).unwrap();
                    syncs.sync(&root)
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let one = syncs.dirs.lock().unwrap()[dir.path()].clone();
        let state = one.state.lock().unwrap();
        assert_eq!((state.taken, state.synced, state.running), (16, 16, false));
        assert!(syncs.sync(&dir.path().join("missing")).is_err(), "a failed sync is reported, not waited on forever");
    }

    /// A store on `dir`: large objects under `dir/bucket`, small ones in `dir/txpipe.sqlite3`.
    pub(crate) async fn open_in(dir: &Path) -> LocalObjectStore {
        let names = Names::new("unit").unwrap();
        let db = SqliteStore::open(&dir.join("txpipe.sqlite3"), &names).await.unwrap();
        LocalObjectStore::open(dir.join("bucket"), std::sync::Arc::new(db)).unwrap()
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_small_object_is_a_database_row_and_a_large_one_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(dir.path()).await;
        let uploads = dir.path().join("bucket/uploads");
        let put = |body: Vec<bytes::Bytes>| futures::stream::iter(body.into_iter().map(Ok)).boxed();
        let small = vec![bytes::Bytes::from_static(b"a,b\n"), bytes::Bytes::from(vec![b'y'; IN_DATABASE_MAX - 4])];
        assert_eq!(store.put("uploads/a.csv", put(small)).await.unwrap(), IN_DATABASE_MAX as u64);
        assert!(files_in(&uploads).is_empty(), "a small object makes no file");
        assert_eq!(store.db.object_count("uploads/").await.unwrap(), 1);

        // just over the line, then past what is gathered in memory: a file each, replacing
        // the row (the newest put is what reads find)
        for size in [IN_DATABASE_MAX + 1, WHOLE_MAX + 10] {
            let body = vec![bytes::Bytes::from(vec![b'x'; size])];
            assert_eq!(store.put("uploads/a.csv", put(body)).await.unwrap(), size as u64);
            assert_eq!(std::fs::read(uploads.join("a.csv")).unwrap().len(), size);
            assert_eq!(files_in(&uploads).len(), 1, "no temporary file left beside it");
            assert_eq!(store.db.object_count("uploads/").await.unwrap(), 0);
        }
        // small again over the file: the row is read, and a delete removes both
        store.put("uploads/a.csv", put(vec![bytes::Bytes::from_static(b"z")])).await.unwrap();
        let mut read = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut store.get("uploads/a.csv").await.unwrap(), &mut read).await.unwrap();
        assert_eq!(read, b"z");
        store.delete("uploads/a.csv").await.unwrap();
        assert!(files_in(&uploads).is_empty());
        assert_eq!(
            store.get("uploads/a.csv").await.err().map(|e| e.kind()),
            Some(super::super::StorageErrorKind::NotFound)
        );
    }

    #[tokio::test]
    async fn an_object_written_as_a_file_by_an_earlier_version_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(dir.path()).await;
        std::fs::create_dir_all(dir.path().join("bucket/uploads")).unwrap();
        std::fs::write(dir.path().join("bucket/uploads/old.csv"), b"a,b\n").unwrap();
        let mut read = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut store.get("uploads/old.csv").await.unwrap(), &mut read)
            .await
            .unwrap();
        assert_eq!(read, b"a,b\n");
        store.delete("uploads/old.csv").await.unwrap();
        assert!(files_in(&dir.path().join("bucket/uploads")).is_empty());
    }
}
