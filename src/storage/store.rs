//! [`Store`], its settings and what its operations return; creating, reading and aborting
//! uploads. The chunk write path is in `write`, completion in `complete`, expiry in `sweep`.

use super::backend::{AbortOutcome, ManifestFiles, StateBackend};
use super::error::{io_error, StorageError};
use super::layout::{self, DATA_PART, LOCK};
use super::limits::{
    check_chunk_size, check_id, check_metadata, check_new_upload, parse_hex_sha256,
};
use super::locks::{LockFile, LockWaits};
use super::manifest::{Manifest, UploadState};
use super::redis_state::{RedisState, RedisStateOptions};
use super::root::{OpenHow, Root};
use super::sys;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Environment variable of the disk-full fault hook (see the module documentation).
pub const FAULT_ENOSPC_ENV: &str = "UPLOAD_PROGRESS_FAULT_ENOSPC_AFTER";

/// Settings of a [`Store`] (from the php.ini directives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// The storage directory; made absolute, created with mode 0700 when missing.
    pub root: PathBuf,
    /// Chunk size of uploads created without one.
    pub default_chunk_size: u64,
    /// Largest `total_bytes` accepted by `create`; 0 = unlimited.
    pub max_upload_size: u64,
    /// Uploads untouched this long are expired; 0 = never.
    pub expire_seconds: u64,
}

/// A directory of uploads. Cheap to build; holds no open files between calls and is `Sync`,
/// so it may be shared between threads (each call opens its own descriptors).
#[derive(Debug)]
pub struct Store {
    pub(super) root: PathBuf,
    pub(super) default_chunk_size: u64,
    pub(super) max_upload_size: u64,
    pub(super) expire_seconds: u64,
    pub(super) fault_enospc_after: Option<u64>,
    pub(super) waits: LockWaits,
    /// Where the state of uploads lives: `manifest.json` next to the data, or Redis when
    /// several hosts share the directory. Chosen once, here.
    pub(super) backend: Box<dyn StateBackend>,
    #[cfg(test)]
    pub(crate) clock_offset: std::sync::atomic::AtomicU64,
}

/// State of an upload as returned to PHP (`Upload::status()`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UploadStatus {
    /// The upload id.
    pub id: String,
    /// `uploading`, `complete` or `aborted`.
    pub state: UploadState,
    /// Size of the whole file.
    pub total_bytes: u64,
    /// Size of every chunk but the last.
    pub chunk_size: u64,
    /// Number of chunks.
    pub chunk_count: u64,
    /// Chunks durably stored.
    pub chunks_done: u64,
    /// Bytes of the chunks durably stored.
    pub bytes_done: u64,
    /// Indexes of the chunks not stored yet, ascending.
    pub missing: Vec<u64>,
    /// Metadata given at creation.
    pub metadata: BTreeMap<String, String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; 0 = never expires.
    pub expires_at: u64,
    /// Absolute path of the finished file; only once complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Expected sha256 (lowercase hex) of the whole file, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl Store {
    /// A store on `opts.root`, creating the directory (mode 0700) when it is missing.
    pub fn new(opts: StoreOptions) -> Result<Store, StorageError> {
        check_chunk_size("default chunk_size", opts.default_chunk_size)?;
        if opts.root.as_os_str().is_empty() {
            return Err(StorageError::InvalidArgument(
                "the storage directory is an empty path".to_string(),
            ));
        }
        let root = Root::open(&opts.root)?.path().to_path_buf();
        let fault_enospc_after = std::env::var(FAULT_ENOSPC_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        Ok(Store {
            root,
            default_chunk_size: opts.default_chunk_size,
            max_upload_size: opts.max_upload_size,
            expire_seconds: opts.expire_seconds,
            fault_enospc_after,
            waits: LockWaits::from_env(),
            backend: Box::new(ManifestFiles),
            #[cfg(test)]
            clock_offset: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Keeps the state of uploads in Redis instead of `manifest.json` (several hosts
    /// sharing the directory); see the `redis_state` module. Connects on first use.
    pub fn with_redis_state(mut self, opts: RedisStateOptions) -> Store {
        self.backend = Box::new(RedisState::new(opts));
        self
    }

    /// The absolute storage directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Sets how long a writer waits for the lock of a chunk another request is writing
    /// (then `ChunkBusy`) and for the manifest lock.
    pub fn set_lock_waits(&mut self, chunk: Duration, manifest: Duration) {
        self.waits = LockWaits { chunk, manifest };
    }

    /// Sets (or clears) the disk-full fault hook of this store; see the module documentation.
    #[doc(hidden)]
    pub fn set_fault_enospc_after(&mut self, bytes: Option<u64>) {
        self.fault_enospc_after = bytes;
    }

    /// Creates an upload of `total_bytes` in chunks of `chunk_size` (default: the store's).
    /// `sha256` is the expected hex digest of the whole file, checked by `complete()`.
    pub fn create(
        &self,
        total_bytes: u64,
        chunk_size: Option<u64>,
        metadata: BTreeMap<String, String>,
        sha256: Option<String>,
    ) -> Result<UploadStatus, StorageError> {
        let chunk_size = chunk_size.unwrap_or(self.default_chunk_size);
        let chunk_count = check_new_upload(total_bytes, chunk_size, self.max_upload_size)?;
        let sha256 = sha256.map(|s| parse_hex_sha256(&s, "sha256")).transpose()?;
        check_metadata(&metadata)?;

        let mut root = self.open_root()?;
        let (id, dir) = layout::make_upload_dir(&mut root, || self.open_root())?;
        let now = self.now();
        let result = (|| {
            let lock = dir.path().join(LOCK);
            dir.open_file(LOCK, OpenHow::CreateNew)
                .map_err(|e| io_error("creating", &lock, &e))?;
            let data = dir.path().join(DATA_PART);
            let f = dir
                .open_file(DATA_PART, OpenHow::CreateNew)
                .map_err(|e| io_error("creating", &data, &e))?;
            f.set_len(total_bytes).map_err(|e| {
                io_error(
                    &format!("setting the size to {total_bytes} bytes of"),
                    &data,
                    &e,
                )
            })?;
            let m = Manifest::new(
                &id,
                total_bytes,
                chunk_size,
                chunk_count,
                metadata,
                sha256,
                now,
                self.expiry_from(now),
            );
            self.backend.create(&dir, &m, &mut || {
                dir.sync()
                    .map_err(|e| io_error("syncing", dir.path(), &e))?;
                root.sync()
                    .map_err(|e| io_error("syncing", root.path(), &e))
            })?;
            Ok(self.status_of(&m))
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(dir.path());
        }
        result
    }

    /// The status of an existing upload; `NotFound` when unknown, expired or aborted.
    pub fn open(&self, id: &str) -> Result<UploadStatus, StorageError> {
        self.status(id)
    }

    /// The status of an upload (no lock taken, the manifest is replaced atomically).
    pub fn status(&self, id: &str) -> Result<UploadStatus, StorageError> {
        check_id(id)?;
        let root = self.open_root()?;
        let m = self.load_live(&root, id)?;
        Ok(self.status_of(&m))
    }

    /// Removes an upload (complete or not) and its directory. `NotFound` when it does not
    /// exist (or expired, or was already aborted). Concurrent readers see state `aborted` or
    /// `NotFound`; a concurrent chunk writer fails with `NotFound` instead of marking.
    pub fn abort(&self, id: &str) -> Result<(), StorageError> {
        check_id(id)?;
        let root = self.open_root()?;
        let dir = layout::upload_dir(&root, id)?;
        let lock = LockFile::open(&dir, id, self.waits)?;
        let outcome = {
            let _manifest_lock = lock.manifest()?;
            self.backend.abort(&dir, id, self.now())?
        };
        if outcome == AbortOutcome::Unknown {
            return Err(StorageError::NotFound(id.to_string()));
        }
        // Removed after unlocking and closing the lock file (NFS cannot remove open files).
        // Should it fail, the state says `aborted` and the next sweep retries.
        drop(lock);
        let _ = fs::remove_dir_all(dir.path());
        match outcome {
            AbortOutcome::Removed => Ok(()),
            _ => Err(StorageError::NotFound(id.to_string())),
        }
    }

    /// Bytes available to this user on the filesystem of the storage directory (statvfs).
    pub fn free_space(&self) -> Option<u64> {
        sys::free_space(&self.root)
    }

    // ---- shared by the operations ----

    /// The checked root, opened (and created with mode 0700 when missing: tmp cleaners) for
    /// one operation; refused with a `StorageException` naming the problem otherwise.
    pub(super) fn open_root(&self) -> Result<Root, StorageError> {
        Root::open(&self.root)
    }

    /// The manifest of a live upload: `NotFound` when missing, aborted or expired.
    pub(super) fn load_live(&self, root: &Root, id: &str) -> Result<Manifest, StorageError> {
        match self.backend.load(root, id)? {
            Some(m) if m.state != UploadState::Aborted && !m.is_expired(self.now()) => Ok(m),
            _ => Err(StorageError::NotFound(id.to_string())),
        }
    }

    pub(super) fn status_of(&self, m: &Manifest) -> UploadStatus {
        let missing = m.missing();
        let chunks_done = m.chunk_count - missing.len() as u64;
        let mut bytes_done = chunks_done * m.chunk_size;
        let last = m.chunk_count - 1;
        if m.is_stored(last) {
            bytes_done = bytes_done - m.chunk_size + m.chunk_len(last);
        }
        UploadStatus {
            id: m.id.clone(),
            state: m.state,
            total_bytes: m.total_bytes,
            chunk_size: m.chunk_size,
            chunk_count: m.chunk_count,
            chunks_done,
            bytes_done,
            missing,
            metadata: m.metadata.clone(),
            created_at: m.created_at,
            expires_at: m.expires_at,
            path: m.path.clone(),
            sha256: m.sha256.clone(),
        }
    }

    pub(super) fn expiry_from(&self, now: u64) -> u64 {
        if self.expire_seconds == 0 {
            0
        } else {
            now.saturating_add(self.expire_seconds)
        }
    }

    pub(super) fn now(&self) -> u64 {
        #[cfg(test)]
        let offset = self.clock_offset.load(std::sync::atomic::Ordering::Relaxed);
        #[cfg(not(test))]
        let offset = 0;
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + offset
    }
}
