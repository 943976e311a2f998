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

/// Removes a temporary file when dropped (a no-op once it was renamed into place).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[async_trait]
impl ObjectStore for LocalObjectStore {
    async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, StorageError> {
        let path = self.path(key)?;
        let dir = path.parent().expect("a key has a parent directory");
        tokio::fs::create_dir_all(dir).await.map_err(|e| unavailable("cannot create", dir, e))?;
        let tmp = dir.join(format!(".{}.part", uuid::Uuid::new_v4()));
        // a put dropped half-way (its client gone) removes its temporary file too
        let _guard = RemoveOnDrop(tmp.clone());
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| unavailable("cannot create", &tmp, e))?;
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(StorageError::upload_failed)?;
                size += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(|e| unavailable("cannot write", &tmp, e))?;
            }
            file.sync_all().await.map_err(|e| unavailable("cannot sync", &tmp, e))?;
            tokio::fs::rename(&tmp, &path).await.map_err(|e| unavailable("cannot rename into", &path, e))?;
            Ok(size)
        }
        .await;
        result
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
