//! The per-upload lock file `<id>/lock` and its OFD byte-range locks: byte 0 guards the
//! upload's state (manifest rewrites, `complete`, `abort`, the sweep), byte `1 + index` is
//! the writer lock of chunk `index`. Every wait is bounded.

use super::error::{io_error, StorageError};
use super::layout::LOCK;
use super::root::{Dir, OpenHow};
use super::sys::ByteLock;
use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

/// Longest wait for the lock of a chunk another request is writing; then `ChunkBusy`.
pub const CHUNK_LOCK_WAIT: Duration = Duration::from_secs(10);
/// Longest wait for the manifest lock (held while a completion hashes the file).
pub const MANIFEST_LOCK_WAIT: Duration = Duration::from_secs(60);
/// Environment variable (milliseconds) overriding both lock waits (tests).
pub const LOCK_WAIT_ENV: &str = "UPLOAD_PROGRESS_LOCK_WAIT_MS";

pub(crate) const MANIFEST_LOCK_BYTE: u64 = 0;

/// How long a call waits for each lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockWaits {
    pub chunk: Duration,
    pub manifest: Duration,
}

impl LockWaits {
    /// The defaults, or both set from [`LOCK_WAIT_ENV`] when it is set.
    pub(crate) fn from_env() -> LockWaits {
        let wait = std::env::var(LOCK_WAIT_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_millis);
        LockWaits {
            chunk: wait.unwrap_or(CHUNK_LOCK_WAIT),
            manifest: wait.unwrap_or(MANIFEST_LOCK_WAIT),
        }
    }
}

/// `<id>/lock` of one upload, opened by this call (OFD locks of separately opened files
/// conflict even within one process).
pub(crate) struct LockFile {
    file: File,
    path: PathBuf,
    id: String,
    waits: LockWaits,
}

impl LockFile {
    /// Opens the lock file of upload `id`; `NotFound` when the upload is gone.
    pub(crate) fn open(dir: &Dir, id: &str, waits: LockWaits) -> Result<LockFile, StorageError> {
        let path = dir.path().join(LOCK);
        let file = match dir.open_file(LOCK, OpenHow::Write) {
            Ok(f) => f,
            Err(e) if super::layout::is_gone(&e) => {
                return Err(StorageError::NotFound(id.to_string()))
            }
            Err(e) => return Err(io_error("opening", &path, &e)),
        };
        Ok(LockFile {
            file,
            path,
            id: id.to_string(),
            waits,
        })
    }

    /// The id of the upload.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The writer lock of chunk `index`, waiting at most the chunk wait; then `ChunkBusy`.
    pub(crate) fn chunk(&self, index: u64) -> Result<ByteLock<'_>, StorageError> {
        let (id, wait) = (&self.id, self.waits.chunk);
        ByteLock::acquire_within(&self.file, 1 + index, wait)
            .map_err(|e| io_error(&format!("locking chunk {index} in"), &self.path, &e))?
            .ok_or_else(|| {
                StorageError::ChunkBusy(format!(
                    "chunk {index} of upload {id} is being written by another request \
                     (still busy after {} ms); nothing was written, retry later",
                    wait.as_millis()
                ))
            })
    }

    /// The manifest lock, waiting at most the manifest wait.
    pub(crate) fn manifest(&self) -> Result<ByteLock<'_>, StorageError> {
        let (id, wait) = (&self.id, self.waits.manifest);
        ByteLock::acquire_within(&self.file, MANIFEST_LOCK_BYTE, wait)
            .map_err(|e| io_error("locking the manifest in", &self.path, &e))?
            .ok_or_else(|| {
                StorageError::Io(format!(
                    "the manifest of upload {id} stayed locked by another request for {} ms \
                     ({}); retry later",
                    wait.as_millis(),
                    self.path.display()
                ))
            })
    }
}
