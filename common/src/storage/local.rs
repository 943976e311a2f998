//! Local storage: where a namespace's data lives under the data directory ([`LocalLayout`]),
//! and the embedded object store, one file per object under a directory (the "bucket").
//!
//! An object is written to a temporary file, synced and renamed into place, so a reader never
//! sees half an object and a failed upload leaves nothing behind.

use super::{ByteStream, ObjectReader, ObjectStore, StorageError};
use crate::config::Settings;
use crate::names::Names;
use async_trait::async_trait;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Where local storage keeps a namespace: its objects in `{data_dir}/objects/{bucket}` and its
/// tables in the database `{data_dir}/txpipe.sqlite3` (shared by every namespace). The services,
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
}

fn unavailable(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::unavailable(format!("{what} {}", path.display())).with_source(e)
}

impl LocalObjectStore {
    /// Uses (and creates) the directory `root`.
    pub fn open(root: PathBuf) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&root).map_err(|e| unavailable("cannot create the object directory", &root, e))?;
        Ok(Self { root })
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
/// put was dropped meanwhile: then the temporary file goes).
fn write_whole(
    path: &Path,
    chunks: &[bytes::Bytes],
    dropped: &std::sync::atomic::AtomicBool,
) -> Result<u64, StorageError> {
    use std::io::Write;
    let dir = path.parent().expect("a key has a parent directory");
    std::fs::create_dir_all(dir).map_err(|e| unavailable("cannot create", dir, e))?;
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
    Ok(size)
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
    /// A body too large to gather: streamed to a temporary file chunk by chunk, `head` first.
    async fn put_streaming(
        &self,
        path: &Path,
        head: Vec<bytes::Bytes>,
        mut body: ByteStream,
    ) -> Result<u64, StorageError> {
        let dir = path.parent().expect("a key has a parent directory");
        tokio::fs::create_dir_all(dir).await.map_err(|e| unavailable("cannot create", dir, e))?;
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
        Ok(size)
    }
}

#[async_trait]
impl ObjectStore for LocalObjectStore {
    async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, StorageError> {
        let path = self.path(key)?;
        // most uploads are small: gathered here, then written, synced and renamed in one task
        // on the blocking pool (one hop, not one per chunk); a larger body streams
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
                    // the client may go away meanwhile: the write then removes its file
                    let mut dropped = DroppedFlag::default();
                    let flag = dropped.flag.clone();
                    let written = tokio::task::spawn_blocking(move || write_whole(&path, &head, &flag)).await;
                    dropped.done = true;
                    return written
                        .map_err(|e| StorageError::unavailable("object write task failed").with_source(e))?;
                }
            }
        }
        self.put_streaming(&path, head, body).await
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        let path = self.path(key)?;
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
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(unavailable("cannot delete", &path, e)),
        }
    }

    async fn check(&self) -> Result<(), StorageError> {
        let meta = tokio::fs::metadata(&self.root).await.map_err(|e| unavailable("cannot reach", &self.root, e))?;
        if meta.is_dir() {
            Ok(())
        } else {
            Err(StorageError::misconfigured(format!("{} is not a directory", self.root.display())))
        }
    }
}
