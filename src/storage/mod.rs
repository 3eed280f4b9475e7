//! Storage of chunked, resumable uploads, streamed straight to disk: the pure-Rust core behind
//! `UploadProgress\Upload`. Nothing here knows about PHP.
//!
//! # On-disk layout
//!
//! ```text
//! <root>/                      mode 0700, created when missing; owned by the euid, no
//!                              group/other bits, not a symlink, else refused (see `root`)
//!   .sweep                     stamp: its mtime is the last expiry sweep (at most one per 60 s)
//!   <id>/                      one directory per upload, id = 26 chars of [0-9a-z], mode 0700
//!     lock                     empty; OFD byte-range locks: byte 0 = manifest, byte 1+i = chunk i
//!     manifest.json            sizes, stored flags, chunk sha256s, metadata, times, state, path
//!     manifest.json.tmp        transient: the next manifest before its rename
//!     data.part                the data file while uploading (sparse, set_len(total) at create)
//!     data                     the same file after complete() (renamed, never copied)
//! ```
//!
//! Chunk `i` is written in place at offset `i * chunk_size` of the one data file with
//! `pwrite` (`FileExt::write_at`): no per-chunk files, no merge pass, no extra copy, so every
//! uploaded byte is written once. When the source announces exactly the chunk's length (the
//! request's Content-Length), its range is reserved with `fallocate` before the body is read
//! (mode 0, never emulated by writing zeros), so a full disk is usually reported before the
//! body is consumed; a chunk that fails gives its range back (hole punched). Every file is
//! opened relative to the checked root with `O_NOFOLLOW` (see `root`). Blocks aligned to 4 KiB go through a second descriptor opened
//! with `O_DIRECT` (one memory copy less, no queueing of parallel writers on the page cache:
//! measured 1.49 → 1.29 CPU-s/GiB and +12 % throughput for 4 parallel 8 MiB chunks); the
//! unaligned tail of an upload, and filesystems without `O_DIRECT` (tmpfs), use the page cache.
//!
//! # Locking (works across processes and across hosts sharing the directory)
//!
//! Every operation opens `<id>/lock` itself and takes open-file-description locks on it
//! (`F_OFD_SETLK`, polled up to a bound: [`CHUNK_LOCK_WAIT`], [`MANIFEST_LOCK_WAIT`]): byte 0 guards manifest updates, byte `1 + index` is the writer lock
//! of chunk `index`. OFD locks conflict between separately opened files even within one process
//! (threads behave like processes), vanish when their holder dies (a SIGKILLed writer leaves no
//! stale lock) and are forwarded to the server by Linux NFS clients. Lock order is always chunk
//! lock, then manifest lock, never the reverse, so there is no deadlock. Readers (`open`,
//! `status`) take no lock: the manifest is only ever replaced by `rename`.
//!
//! # Order of a chunk write and fsync policy
//!
//! 1. Read the manifest; a chunk already stored returns `already_stored = true` at once,
//!    without reading the source.
//! 2. Take the chunk lock (waits at most [`CHUNK_LOCK_WAIT`] for a concurrent writer of the
//!    same chunk, then `ChunkBusy`), re-read the manifest, return `already_stored = true` if
//!    that writer stored it meanwhile. A complete or aborted upload is `Conflict` too. The
//!    write's descriptors are registered (`inflight`) so that a PHP bailout cannot keep them.
//! 3. Stream the source in blocks of 1 MiB into the data file at the chunk's offset, hashing
//!    only when a `sha256:` checksum was given; read at most `expected + 1` bytes.
//! 4. Verify the length and the checksum. On failure nothing is marked: the chunk stays
//!    missing and can be resent (its bytes on disk are simply overwritten then).
//! 5. `fdatasync` the data file: a chunk is never marked before its bytes are durable.
//! 6. Take the manifest lock, re-read the manifest, mark the chunk, write the manifest
//!    atomically (write `manifest.json.tmp`, `fdatasync` it, `rename` it over
//!    `manifest.json`), release the locks.
//!
//! The directory is not fsynced after a manifest rename: a crash can lose the latest marks,
//! which only makes the client resend those chunks; it can never mark bytes that are not on
//! disk. `create()` fsyncs the new upload directory and the root once, and `complete()`
//! fsyncs the data file and the directory after renaming `data.part` to `data`, before the
//! manifest says `complete`.
//!
//! # Expiry
//!
//! Every successful create, chunk write and completion "touches" the upload:
//! `expires_at = now + expire_seconds` (`expire_seconds == 0`: never expires, `expires_at`
//! is then 0). Expired uploads, complete ones included, are `NotFound` for every operation
//! and removed by [`Store::sweep_expired`], which does real work at most once per 60 s per
//! root directory (the mtime of `<root>/.sweep`, claimed with a non-blocking OFD lock).
//! Applications keep a finished file by moving it out of `<root>` before it expires.
//!
//! # Several hosts
//!
//! With [`Store::with_redis_state`] no manifest is written: the same state lives in Redis
//! (see `redis_state`), marks are atomic Lua scripts instead of manifest rewrites under
//! byte 0, and byte 0 only keeps `complete`, `abort` and the sweep apart.
//!
//! # Fault hook (tests)
//!
//! Disk-full handling is tested without a small filesystem through a fault hook: when the
//! environment variable `UPLOAD_PROGRESS_FAULT_ENOSPC_AFTER=<bytes>` is set when a [`Store`]
//! is created (or [`Store::set_fault_enospc_after`] is called), every `write_chunk` call of
//! that store writes at most `<bytes>` bytes of its chunk and then fails as if `pwrite`
//! returned ENOSPC (the `fallocate` reservation is skipped while the hook is active). The
//! count restarts with every call, so `0` makes every chunk write fail.

mod error;
mod id;
mod inflight;
mod manifest;
mod redis_state;
pub mod root;
mod sys;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_redis;

pub use error::{StorageError, WHOLE_FILE};
pub use id::{new_id, valid_id, ID_LEN};
pub use inflight::release_abandoned;
pub use manifest::UploadState;
pub use redis_state::{RedisStateOptions, KEY_GRACE_S};

use error::{io_error, shorten};
use inflight::InFlight;
use manifest::Manifest;
use redis_state::{AbortOutcome, Completed, RedisState};
use root::{Dir, OpenHow, Root};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use sys::ByteLock;

/// Smallest chunk size.
pub const MIN_CHUNK_SIZE: u64 = 1;
/// Largest chunk size: 2 GiB.
pub const MAX_CHUNK_SIZE: u64 = 2 << 30;
/// Most chunks an upload may have (bounds the manifest; pick a larger chunk size instead).
pub const MAX_CHUNK_COUNT: u64 = 100_000;
/// Most metadata entries of an upload.
pub const MAX_METADATA_KEYS: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_BYTES: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_BYTES: usize = 4096;
/// Size of the blocks read from a chunk source and written with one `pwrite`.
pub const BLOCK_SIZE: usize = 1 << 20;
/// `sweep_expired` does real work at most this often per root directory.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Environment variable of the disk-full fault hook (see the module documentation).
pub const FAULT_ENOSPC_ENV: &str = "UPLOAD_PROGRESS_FAULT_ENOSPC_AFTER";
/// Longest wait for the lock of a chunk another request is writing; then `ChunkBusy`.
pub const CHUNK_LOCK_WAIT: Duration = Duration::from_secs(10);
/// Longest wait for the manifest lock (held while a completion hashes the file).
pub const MANIFEST_LOCK_WAIT: Duration = Duration::from_secs(60);
/// Environment variable (milliseconds) overriding both lock waits (tests).
pub const LOCK_WAIT_ENV: &str = "UPLOAD_PROGRESS_LOCK_WAIT_MS";

const LOCK: &str = "lock";
const DATA_PART: &str = "data.part";
const DATA: &str = "data";
const SWEEP_STAMP: &str = ".sweep";
/// A directory without a readable manifest this old is a leftover (crashed create, failed
/// removal) and is removed by a sweep.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);
const MANIFEST_LOCK_BYTE: u64 = 0;

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
    root: PathBuf,
    default_chunk_size: u64,
    max_upload_size: u64,
    expire_seconds: u64,
    fault_enospc_after: Option<u64>,
    chunk_lock_wait: Duration,
    manifest_lock_wait: Duration,
    /// Where the state of uploads lives when several hosts share the directory;
    /// `None`: in `manifest.json` next to the data.
    redis: Option<RedisState>,
    #[cfg(test)]
    clock_offset: std::sync::atomic::AtomicU64,
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

/// Result of [`Store::write_chunk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkOutcome {
    /// Status after the write.
    pub status: UploadStatus,
    /// The chunk was already stored (by an earlier or a concurrent call); the source was not read.
    pub already_stored: bool,
    /// Bytes this call wrote to the data file (0 when already stored).
    pub bytes_written: u64,
}

/// An upload removed by a sweep because it expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweptUpload {
    /// Its id.
    pub id: String,
    /// Its state when it was removed (`Uploading` or `Complete`).
    pub state: UploadState,
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
        let lock_wait = std::env::var(LOCK_WAIT_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_millis);
        Ok(Store {
            root,
            default_chunk_size: opts.default_chunk_size,
            max_upload_size: opts.max_upload_size,
            expire_seconds: opts.expire_seconds,
            fault_enospc_after,
            chunk_lock_wait: lock_wait.unwrap_or(CHUNK_LOCK_WAIT),
            manifest_lock_wait: lock_wait.unwrap_or(MANIFEST_LOCK_WAIT),
            redis: None,
            #[cfg(test)]
            clock_offset: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Keeps the state of uploads in Redis instead of `manifest.json` (several hosts
    /// sharing the directory); see the `redis_state` module. Connects on first use.
    pub fn with_redis_state(mut self, opts: RedisStateOptions) -> Store {
        self.redis = Some(RedisState::new(opts));
        self
    }

    /// The absolute storage directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Sets how long a writer waits for the lock of a chunk another request is writing
    /// (then `ChunkBusy`) and for the manifest lock.
    pub fn set_lock_waits(&mut self, chunk: Duration, manifest: Duration) {
        self.chunk_lock_wait = chunk;
        self.manifest_lock_wait = manifest;
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
        if total_bytes == 0 {
            return Err(StorageError::InvalidArgument(
                "total_bytes must be greater than 0, got 0".to_string(),
            ));
        }
        if self.max_upload_size != 0 && total_bytes > self.max_upload_size {
            return Err(StorageError::TooLarge {
                size: total_bytes,
                max: self.max_upload_size,
            });
        }
        let chunk_size = chunk_size.unwrap_or(self.default_chunk_size);
        check_chunk_size("chunk_size", chunk_size)?;
        let chunk_count = total_bytes.div_ceil(chunk_size);
        if chunk_count > MAX_CHUNK_COUNT {
            return Err(StorageError::InvalidArgument(format!(
                "an upload of {total_bytes} bytes in chunks of {chunk_size} bytes has \
                 {chunk_count} chunks, at most {MAX_CHUNK_COUNT} are allowed: use a chunk_size \
                 of at least {} bytes",
                total_bytes.div_ceil(MAX_CHUNK_COUNT)
            )));
        }
        let sha256 = sha256.map(|s| parse_hex_sha256(&s, "sha256")).transpose()?;
        check_metadata(&metadata)?;

        let mut root = self.open_root()?;
        let (id, dir) = self.make_upload_dir(&mut root)?;
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
            if self.redis.is_none() {
                manifest::store(&dir, &m)?;
            }
            dir.sync()
                .map_err(|e| io_error("syncing", dir.path(), &e))?;
            root.sync()
                .map_err(|e| io_error("syncing", root.path(), &e))?;
            // Last: the upload exists for other hosts only once its files do.
            if let Some(r) = &self.redis {
                r.create(&m)?;
            }
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

    /// Stores chunk `index` from `source`, which must yield exactly the chunk's length
    /// (`chunk_size`, or what is left for the last chunk). `checksum` is `sha256:<64 hex>`.
    /// `on_progress(n)` is called after every read from the source with `n`, the bytes of this
    /// chunk received so far (at most the chunk's length). Same as
    /// [`Store::write_chunk_sized`] with an unknown source length (nothing is reserved).
    pub fn write_chunk(
        &self,
        id: &str,
        index: u64,
        source: &mut dyn Read,
        checksum: Option<&str>,
        on_progress: &mut dyn FnMut(u64),
    ) -> Result<ChunkOutcome, StorageError> {
        self.write_chunk_sized(id, index, source, None, checksum, on_progress)
    }

    /// [`Store::write_chunk`] with the length the source announces (a request's
    /// Content-Length, a file's size). Only when it is exactly the chunk's length is the
    /// chunk's range reserved (`fallocate`) before the body is read, so a client announcing
    /// (or sending) less never makes the server reserve more than it received; and a chunk
    /// that fails gives its range back (hole punched), whatever it had reserved or written.
    ///
    /// A chunk already stored returns at once with `already_stored = true` without reading
    /// `source`; so does a writer that waited for a concurrent writer of the same chunk. That
    /// wait is bounded ([`CHUNK_LOCK_WAIT`]): then `ChunkBusy`. A chunk sent to a complete
    /// or aborted upload is `Conflict`, its source unread. Any error leaves the chunk missing: it can be resent.
    pub fn write_chunk_sized(
        &self,
        id: &str,
        index: u64,
        source: &mut dyn Read,
        source_len: Option<u64>,
        checksum: Option<&str>,
        on_progress: &mut dyn FnMut(u64),
    ) -> Result<ChunkOutcome, StorageError> {
        check_id(id)?;
        let expected_sha = checksum.map(parse_checksum).transpose()?;
        let root = self.open_root()?;
        let m = self.load_writable(&root, id, index)?;
        if index >= m.chunk_count {
            return Err(StorageError::InvalidChunk(format!(
                "chunk index {index} is out of range 0..{} for upload {id}",
                m.chunk_count
            )));
        }
        if m.is_stored(index) {
            return Ok(self.already_stored(&m));
        }
        let dir = self.upload_dir(&root, id)?;
        let lock_path = dir.path().join(LOCK);
        let lock_file = open_lock(&dir, id)?;
        // Registered before the lock is taken: a bailout from here on is cleaned up.
        let inflight = InFlight::new();
        inflight.hold_fd(root.fd().as_raw_fd());
        inflight.hold_fd(dir.fd().as_raw_fd());
        inflight.hold(&lock_file);
        let _chunk_lock = ByteLock::acquire_within(&lock_file, 1 + index, self.chunk_lock_wait)
            .map_err(|e| io_error(&format!("locking chunk {index} in"), &lock_path, &e))?
            .ok_or_else(|| {
                StorageError::ChunkBusy(format!(
                    "chunk {index} of upload {id} is being written by another request \
                     (still busy after {} ms); nothing was written, retry later",
                    self.chunk_lock_wait.as_millis()
                ))
            })?;
        let m = self.load_writable(&root, id, index)?;
        if m.is_stored(index) {
            return Ok(self.already_stored(&m));
        }
        let len = m.chunk_len(index);
        let offset = index * m.chunk_size;

        let mut data_name = DATA_PART;
        if !dir.exists(DATA_PART) && dir.exists(DATA) {
            // complete() renamed it but its state change did not land (crash, lost
            // Redis write): the chunk still goes into the one data file.
            data_name = DATA;
        }
        let data_path = dir.path().join(data_name);
        let file = match dir.open_file(data_name, OpenHow::Write) {
            Ok(f) => f,
            Err(e) if manifest::is_gone(&e) => return Err(StorageError::NotFound(id.to_string())),
            Err(e) => return Err(io_error("opening", &data_path, &e)),
        };
        inflight.hold(&file);
        inflight.punch_on_abandon(&file, offset, len);
        let what = format!("writing chunk {index} of upload {id} to");
        // Aligned blocks bypass the page cache: one memory copy less per byte
        // and no writer queueing on the page cache of the shared data file.
        // Filesystems without O_DIRECT (tmpfs) refuse the open: buffered only.
        let direct = (offset.is_multiple_of(DIRECT_ALIGN) && self.fault_enospc_after.is_none())
            .then(|| {
                dir.open_file_flags(data_name, OpenHow::Write, libc::O_DIRECT)
                    .ok()
            })
            .flatten();
        if let Some(d) = &direct {
            inflight.hold(d);
        }
        let stored = (|| {
            // Reserve only what the source announces to send in full: a short or lying
            // Content-Length must not reserve a whole (up to 2 GiB) chunk.
            if self.fault_enospc_after.is_none() && source_len == Some(len) {
                sys::reserve(&file, offset, len).map_err(|e| io_error(&what, &data_path, &e))?;
            }
            let streamed = stream_chunk(
                Target {
                    buffered: &file,
                    direct: direct.as_ref(),
                },
                offset,
                len,
                source,
                expected_sha.is_some(),
                on_progress,
                self.fault_enospc_after,
            )
            .map_err(|e| match e {
                StreamError::Source(e) => StorageError::Io(format!(
                    "reading the body of chunk {index} of upload {id} failed: {e}"
                )),
                StreamError::Write(e) => io_error(&what, &data_path, &e),
            })?;
            if streamed.received != len {
                let got = if streamed.received > len {
                    format!("more than {len}")
                } else {
                    streamed.received.to_string()
                };
                return Err(StorageError::InvalidChunk(format!(
                    "chunk {index} of upload {id} has {got} bytes, expected {len}"
                )));
            }
            if let (Some(expected), Some(actual)) = (&expected_sha, &streamed.sha256) {
                if expected != actual {
                    return Err(StorageError::ChecksumMismatch {
                        index,
                        expected: expected.clone(),
                        actual: actual.clone(),
                    });
                }
            }
            file.sync_data()
                .map_err(|e| io_error(&what, &data_path, &e))?;
            Ok(streamed)
        })();
        let streamed = match stored {
            Ok(s) => s,
            Err(e) => {
                // Give back what this attempt reserved or wrote: the chunk stays missing.
                let _ = sys::release(&file, offset, len);
                return Err(e);
            }
        };
        inflight.keep_data();
        if let Some(d) = direct {
            inflight.forget(&d);
        }
        inflight.forget(&file);
        drop(file);

        let m = match &self.redis {
            Some(r) => {
                let now = self.now();
                let expires_at = self.expiry_from(now);
                r.mark(id, index, streamed.sha256.as_deref(), now, expires_at)?
                    .ok_or_else(|| StorageError::NotFound(id.to_string()))?
            }
            None => {
                let _manifest_lock = self.manifest_lock(&lock_file, &lock_path, id)?;
                let mut m = self.load_live(&root, id)?;
                m.mark_stored(index, streamed.sha256);
                self.touch(&mut m);
                manifest::store(&dir, &m)?;
                m
            }
        };
        Ok(ChunkOutcome {
            status: self.status_of(&m),
            already_stored: false,
            bytes_written: len,
        })
    }

    /// Finishes an upload: every chunk must be stored (else `InvalidChunk` listing up to 20
    /// missing indexes) and the whole file must match the expected sha256 when one was given
    /// (else `ChecksumMismatch` with `index == WHOLE_FILE`; the upload then stays `uploading`
    /// with all chunks stored, and only `abort()` is left to do). The data file is fsynced and
    /// renamed from `data.part` to `data`. Idempotent: a second call returns the same status.
    pub fn complete(&self, id: &str) -> Result<UploadStatus, StorageError> {
        check_id(id)?;
        let root = self.open_root()?;
        let dir = self.upload_dir(&root, id)?;
        let lock_path = dir.path().join(LOCK);
        let lock_file = open_lock(&dir, id)?;
        let _manifest_lock = self.manifest_lock(&lock_file, &lock_path, id)?;
        let mut m = self.load_live(&root, id)?;
        if m.state == UploadState::Complete {
            return Ok(self.status_of(&m));
        }
        if !m.missing().is_empty() {
            return Err(missing_chunks(id, &m));
        }
        // A crash between the rename and the manifest update leaves `data` and no `data.part`.
        let src_name = if dir.exists(DATA_PART) {
            DATA_PART
        } else {
            DATA
        };
        let src = dir.path().join(src_name);
        let file = dir
            .open_file(src_name, OpenHow::Read)
            .map_err(|e| io_error("opening", &src, &e))?;
        let size = file
            .metadata()
            .map_err(|e| io_error("reading the size of", &src, &e))?
            .len();
        if size != m.total_bytes {
            return Err(StorageError::Io(format!(
                "data file {} of upload {id} has {size} bytes, expected {}",
                src.display(),
                m.total_bytes
            )));
        }
        if let Some(expected) = &m.sha256 {
            let actual = hash_file(&file).map_err(|e| io_error("reading", &src, &e))?;
            if &actual != expected {
                return Err(StorageError::ChecksumMismatch {
                    index: WHOLE_FILE,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        file.sync_all().map_err(|e| io_error("syncing", &src, &e))?;
        drop(file);
        if src_name == DATA_PART {
            dir.rename(DATA_PART, DATA)
                .map_err(|e| io_error("renaming", &src, &e))?;
            dir.sync()
                .map_err(|e| io_error("syncing", dir.path(), &e))?;
        }
        let path = dir.path().join(DATA).to_string_lossy().into_owned();
        if let Some(r) = &self.redis {
            let now = self.now();
            return match r.complete(&m, &path, now, self.expiry_from(now))? {
                Some(Completed::Done(m)) => Ok(self.status_of(&m)),
                Some(Completed::Missing(m)) => Err(missing_chunks(id, &m)),
                None => Err(StorageError::NotFound(id.to_string())),
            };
        }
        m.state = UploadState::Complete;
        m.path = Some(path);
        self.touch(&mut m);
        manifest::store(&dir, &m)?;
        Ok(self.status_of(&m))
    }

    /// Removes an upload (complete or not) and its directory. `NotFound` when it does not
    /// exist (or expired, or was already aborted). Concurrent readers see state `aborted` or
    /// `NotFound`; a concurrent chunk writer fails with `NotFound` instead of marking.
    pub fn abort(&self, id: &str) -> Result<(), StorageError> {
        check_id(id)?;
        let root = self.open_root()?;
        let dir = self.upload_dir(&root, id)?;
        let lock_path = dir.path().join(LOCK);
        let lock_file = open_lock(&dir, id)?;
        if let Some(r) = &self.redis {
            let outcome = {
                let _lock = self.manifest_lock(&lock_file, &lock_path, id)?;
                r.abort(id, self.now())?
            };
            if matches!(outcome, AbortOutcome::Unknown) {
                return Err(StorageError::NotFound(id.to_string()));
            }
            drop(lock_file);
            let _ = fs::remove_dir_all(dir.path());
            return match outcome {
                AbortOutcome::Removed => Ok(()),
                _ => Err(StorageError::NotFound(id.to_string())),
            };
        }
        {
            let manifest_lock = self.manifest_lock(&lock_file, &lock_path, id)?;
            let Some(mut m) = manifest::load(&dir, id)? else {
                return Err(StorageError::NotFound(id.to_string()));
            };
            let gone = m.state == UploadState::Aborted || m.is_expired(self.now());
            m.state = UploadState::Aborted;
            if manifest::store(&dir, &m).is_err() {
                // No space for a new manifest: unlinking the old one commits the abort too.
                let path = dir.path().join(manifest::MANIFEST);
                dir.remove_file(manifest::MANIFEST)
                    .map_err(|e| io_error("removing", &path, &e))?;
            }
            if gone {
                drop(manifest_lock);
                drop(lock_file);
                let _ = fs::remove_dir_all(dir.path());
                return Err(StorageError::NotFound(id.to_string()));
            }
        }
        // Removed after unlocking and closing the lock file (NFS cannot remove open files).
        // Should it fail, the manifest says `aborted` and the next sweep retries.
        drop(lock_file);
        let _ = fs::remove_dir_all(dir.path());
        Ok(())
    }

    /// Removes expired uploads and returns their ids (so that `failed`/`expired` can be
    /// published). Cheap: does real work at most once per 60 s per root directory, across
    /// all processes and hosts sharing it; otherwise returns an empty list at once.
    /// Also removes leftovers of aborted uploads and directories without a manifest that are
    /// older than an hour (those are not returned).
    pub fn sweep_expired(&self) -> Vec<String> {
        self.sweep_expired_detailed()
            .into_iter()
            .map(|s| s.id)
            .collect()
    }

    /// [`Store::sweep_expired`] with the state each expired upload had (`Uploading` or
    /// `Complete`).
    pub fn sweep_expired_detailed(&self) -> Vec<SweptUpload> {
        self.sweep(false)
    }

    /// Bytes available to this user on the filesystem of the storage directory (statvfs).
    pub fn free_space(&self) -> Option<u64> {
        sys::free_space(&self.root)
    }

    // ---- internals ----

    fn sweep(&self, force: bool) -> Vec<SweptUpload> {
        let Ok(root) = self.open_root() else {
            return Vec::new();
        };
        let seen = root.mtime(SWEEP_STAMP);
        if !force && seen.is_some_and(is_recent) {
            return Vec::new();
        }
        let Ok(stamp_file) = root.open_file(SWEEP_STAMP, OpenHow::CreateOrOpen) else {
            return Vec::new();
        };
        let Ok(Some(_sweep_lock)) = ByteLock::try_acquire(&stamp_file, 0) else {
            return Vec::new(); // another process is sweeping right now
        };
        if !force && seen.is_some() && root.mtime(SWEEP_STAMP) != seen {
            return Vec::new(); // another process swept between our look and our lock
        }
        let _ = stamp_file.set_modified(SystemTime::now());
        let Ok(entries) = fs::read_dir(root.path()) else {
            return Vec::new();
        };
        let mut swept = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().filter(|n| valid_id(n)) else {
                continue;
            };
            match self.sweep_one(&root, id) {
                Ok(Some(s)) => swept.push(s),
                Ok(None) => {}
                // Without the state store nothing can be told apart: try again later.
                Err(_) => break,
            }
        }
        swept
    }

    /// `Err` only when the state store is unreachable.
    fn sweep_one(&self, root: &Root, id: &str) -> Result<Option<SweptUpload>, StorageError> {
        let path = root.path().join(id);
        match self.load_manifest(root, id) {
            Err(e @ StorageError::Unavailable(_)) => Err(e),
            Ok(Some(m)) if m.state == UploadState::Aborted => {
                let _ = fs::remove_dir_all(&path);
                Ok(None)
            }
            Ok(Some(m)) if m.is_expired(self.now()) => {
                let Ok(dir) = root.open_dir(id) else {
                    return Ok(None);
                };
                let Ok(lock_file) = dir.open_file(LOCK, OpenHow::Write) else {
                    return Ok(None);
                };
                let Ok(Some(lock)) = ByteLock::acquire_within(
                    &lock_file,
                    MANIFEST_LOCK_BYTE,
                    self.manifest_lock_wait,
                ) else {
                    return Ok(None);
                };
                let Some(state) = self.expire_locked(&dir, id)? else {
                    return Ok(None); // touched (or aborted) meanwhile
                };
                drop(lock);
                drop(lock_file);
                let _ = fs::remove_dir_all(&path);
                Ok(Some(SweptUpload {
                    id: id.to_string(),
                    state,
                }))
            }
            Ok(Some(_)) => Ok(None),
            Ok(None) | Err(_) => {
                let old = root
                    .mtime(id)
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= ORPHAN_AGE);
                if old {
                    let _ = fs::remove_dir_all(&path);
                }
                Ok(None)
            }
        }
    }

    /// Under the manifest lock: marks an expired upload aborted and returns the state it
    /// had; `None` when it is live again or already gone.
    fn expire_locked(&self, dir: &Dir, id: &str) -> Result<Option<UploadState>, StorageError> {
        if let Some(r) = &self.redis {
            return r.expire(id, self.now());
        }
        let Ok(Some(mut m)) = manifest::load(dir, id) else {
            return Ok(None);
        };
        if !m.is_expired(self.now()) || m.state == UploadState::Aborted {
            return Ok(None);
        }
        let state = m.state;
        m.state = UploadState::Aborted;
        if manifest::store(dir, &m).is_err() && dir.remove_file(manifest::MANIFEST).is_err() {
            return Ok(None);
        }
        Ok(Some(state))
    }

    /// The checked root, opened (and created with mode 0700 when missing: tmp cleaners) for
    /// one operation; refused with a `StorageException` naming the problem otherwise.
    fn open_root(&self) -> Result<Root, StorageError> {
        Root::open(&self.root)
    }

    /// The state of upload `id` wherever it is kept; `None` when there is none.
    fn load_manifest(&self, root: &Root, id: &str) -> Result<Option<Manifest>, StorageError> {
        match &self.redis {
            Some(r) => r.load(id),
            None => match root.open_dir(id) {
                Ok(dir) => manifest::load(&dir, id),
                Err(e) if manifest::is_gone(&e) => Ok(None),
                Err(e) => Err(io_error("opening", &root.path().join(id), &e)),
            },
        }
    }

    /// The directory of upload `id`: `NotFound` when it does not exist.
    fn upload_dir(&self, root: &Root, id: &str) -> Result<Dir, StorageError> {
        match root.open_dir(id) {
            Ok(dir) => Ok(dir),
            Err(e) if manifest::is_gone(&e) => Err(StorageError::NotFound(id.to_string())),
            Err(e) => Err(io_error("opening", &root.path().join(id), &e)),
        }
    }

    /// The manifest of a live upload: `NotFound` when missing, aborted or expired.
    fn load_live(&self, root: &Root, id: &str) -> Result<Manifest, StorageError> {
        match self.load_manifest(root, id)? {
            Some(m) if m.state != UploadState::Aborted && !m.is_expired(self.now()) => Ok(m),
            _ => Err(StorageError::NotFound(id.to_string())),
        }
    }

    /// The manifest of an upload that takes chunks: `NotFound` when missing or expired,
    /// `Conflict` when complete or aborted (a chunk there is refused, never stored or
    /// reported as stored, whatever its length or checksum).
    fn load_writable(&self, root: &Root, id: &str, index: u64) -> Result<Manifest, StorageError> {
        match self.load_manifest(root, id)? {
            Some(m) if m.is_expired(self.now()) => Err(StorageError::NotFound(id.to_string())),
            Some(m) if m.state == UploadState::Complete => Err(StorageError::Conflict(format!(
                "upload {id} is complete: chunk {index} was not accepted (a complete upload \
                 takes no more chunks)"
            ))),
            Some(m) if m.state == UploadState::Aborted => Err(StorageError::Conflict(format!(
                "upload {id} was aborted: chunk {index} was not accepted"
            ))),
            Some(m) => Ok(m),
            None => Err(StorageError::NotFound(id.to_string())),
        }
    }

    /// The manifest lock of an upload, waiting at most `manifest_lock_wait`.
    fn manifest_lock<'f>(
        &self,
        lock_file: &'f File,
        lock_path: &Path,
        id: &str,
    ) -> Result<ByteLock<'f>, StorageError> {
        ByteLock::acquire_within(lock_file, MANIFEST_LOCK_BYTE, self.manifest_lock_wait)
            .map_err(|e| io_error("locking the manifest in", lock_path, &e))?
            .ok_or_else(|| {
                StorageError::Io(format!(
                    "the manifest of upload {id} stayed locked by another request for {} ms \
                     ({}); retry later",
                    self.manifest_lock_wait.as_millis(),
                    lock_path.display()
                ))
            })
    }

    fn make_upload_dir(&self, root: &mut Root) -> Result<(String, Dir), StorageError> {
        let mut last_err = None;
        for _ in 0..8 {
            let id = new_id();
            match root.create_dir(&id) {
                Ok(dir) => return Ok((id, dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // The root was removed behind our back (tmp cleaners): make it again.
                    *root = self.open_root()?;
                    last_err = Some(e);
                }
                Err(e) => return Err(io_error("creating", &root.path().join(&id), &e)),
            }
        }
        let e = last_err.unwrap_or_else(|| io::Error::other("no free upload id"));
        Err(io_error("creating an upload directory in", root.path(), &e))
    }

    fn already_stored(&self, m: &Manifest) -> ChunkOutcome {
        ChunkOutcome {
            status: self.status_of(m),
            already_stored: true,
            bytes_written: 0,
        }
    }

    fn status_of(&self, m: &Manifest) -> UploadStatus {
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

    fn touch(&self, m: &mut Manifest) {
        let now = self.now();
        m.touched_at = now;
        m.expires_at = self.expiry_from(now);
    }

    fn expiry_from(&self, now: u64) -> u64 {
        if self.expire_seconds == 0 {
            0
        } else {
            now.saturating_add(self.expire_seconds)
        }
    }

    fn now(&self) -> u64 {
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

/// `InvalidChunk` listing (up to 20 of) the chunks `m` misses.
fn missing_chunks(id: &str, m: &Manifest) -> StorageError {
    let missing = m.missing();
    let mut list: Vec<String> = missing.iter().take(20).map(u64::to_string).collect();
    if missing.len() > 20 {
        list.push("...".to_string());
    }
    StorageError::InvalidChunk(format!(
        "upload {id} is missing {} of {} chunks: {}",
        missing.len(),
        m.chunk_count,
        list.join(", ")
    ))
}

fn check_id(id: &str) -> Result<(), StorageError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(StorageError::InvalidId(shorten(id)))
    }
}

fn open_lock(dir: &Dir, id: &str) -> Result<File, StorageError> {
    match dir.open_file(LOCK, OpenHow::Write) {
        Ok(f) => Ok(f),
        Err(e) if manifest::is_gone(&e) => Err(StorageError::NotFound(id.to_string())),
        Err(e) => Err(io_error("opening", &dir.path().join(LOCK), &e)),
    }
}

fn is_recent(mtime: SystemTime) -> bool {
    match mtime.elapsed() {
        Ok(age) => age < SWEEP_INTERVAL,
        Err(future) => future.duration() < SWEEP_INTERVAL, // small clock skew between hosts
    }
}

fn check_chunk_size(what: &str, size: u64) -> Result<(), StorageError> {
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(StorageError::InvalidArgument(format!(
            "{what} {size} is out of range {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        )))
    }
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), StorageError> {
    if metadata.len() > MAX_METADATA_KEYS {
        return Err(StorageError::InvalidArgument(format!(
            "metadata has {} keys, at most {MAX_METADATA_KEYS} are allowed",
            metadata.len()
        )));
    }
    for (k, v) in metadata {
        if k.is_empty() {
            return Err(StorageError::InvalidArgument(
                "metadata key \"\" is empty".to_string(),
            ));
        }
        if k.len() > MAX_METADATA_KEY_BYTES {
            return Err(StorageError::InvalidArgument(format!(
                "metadata key {:?} has {} bytes, at most {MAX_METADATA_KEY_BYTES} are allowed",
                shorten(k),
                k.len()
            )));
        }
        if v.len() > MAX_METADATA_VALUE_BYTES {
            return Err(StorageError::InvalidArgument(format!(
                "metadata value of key {k:?} has {} bytes, at most {MAX_METADATA_VALUE_BYTES} are allowed",
                v.len()
            )));
        }
    }
    Ok(())
}

/// `sha256:<64 hex>` (hex in any case) to lowercase hex.
fn parse_checksum(checksum: &str) -> Result<String, StorageError> {
    let bad = || {
        StorageError::InvalidArgument(format!(
            "checksum {:?} is not of the form sha256:<64 hex digits>",
            shorten(checksum)
        ))
    };
    let (algo, hex) = checksum.split_once(':').ok_or_else(bad)?;
    if !algo.eq_ignore_ascii_case("sha256") {
        return Err(bad());
    }
    parse_hex_sha256(hex, "checksum").map_err(|_| bad())
}

fn parse_hex_sha256(s: &str, what: &str) -> Result<String, StorageError> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(StorageError::InvalidArgument(format!(
            "{what} {:?} is not 64 hex digits",
            shorten(s)
        )))
    }
}

struct Streamed {
    received: u64,
    sha256: Option<String>,
}

enum StreamError {
    Source(io::Error),
    Write(io::Error),
}

/// O_DIRECT needs buffers, offsets and lengths aligned to the logical block
/// size; 4 KiB covers every common device.
const DIRECT_ALIGN: u64 = 4096;

/// Where a chunk's bytes go: the data file, and the same file opened with
/// O_DIRECT for aligned blocks when the filesystem supports it.
struct Target<'a> {
    buffered: &'a File,
    direct: Option<&'a File>,
}

/// Copies at most `len + 1` bytes from `source` into `file` at `offset`, never writing past
/// `offset + len`. Returns how many bytes the source had (`len + 1` meaning "too many").
fn stream_chunk(
    target: Target<'_>,
    offset: u64,
    len: u64,
    source: &mut dyn Read,
    hash: bool,
    on_progress: &mut dyn FnMut(u64),
    fault_enospc_after: Option<u64>,
) -> Result<Streamed, StreamError> {
    let limit = len + 1;
    let block = usize::try_from(limit).map_or(BLOCK_SIZE, |l| l.min(BLOCK_SIZE));
    // Over-allocate to carve out a block that starts on a DIRECT_ALIGN boundary.
    let align = DIRECT_ALIGN as usize;
    let mut storage = vec![0u8; block + align];
    let start = storage.as_ptr().align_offset(align).min(align);
    let buf = &mut storage[start..start + block];
    let mut direct = target.direct;
    let mut hasher = hash.then(sha256_context);
    let mut received = 0u64;
    let mut written = 0u64;
    loop {
        // Fill the block (the source may return less than asked for).
        let mut filled = 0usize;
        let mut eof = false;
        while filled < buf.len() && received < limit {
            let room = buf.len() - filled;
            let want = usize::try_from(limit - received).map_or(room, |r| r.min(room));
            match source.read(&mut buf[filled..filled + want]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    filled += n;
                    received += n as u64;
                    on_progress(received.min(len));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StreamError::Source(e)),
            }
        }
        let writable = usize::try_from(len - written).map_or(filled, |r| r.min(filled));
        if writable > 0 {
            let bytes = &buf[..writable];
            if let Some(h) = hasher.as_mut() {
                h.update(bytes);
            }
            let at = offset + written;
            let mut done = false;
            if let Some(d) = direct {
                if bytes.len().is_multiple_of(align) && at.is_multiple_of(DIRECT_ALIGN) {
                    match d.write_all_at(bytes, at) {
                        Ok(()) => done = true,
                        // Not supported after all (odd device block size): buffered from now on.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => direct = None,
                        Err(e) => return Err(StreamError::Write(e)),
                    }
                }
            }
            if !done {
                write_block(target.buffered, bytes, at, written, fault_enospc_after)
                    .map_err(StreamError::Write)?;
            }
            written += writable as u64;
        }
        if eof || received >= limit {
            break;
        }
    }
    Ok(Streamed {
        received,
        sha256: hasher.map(|h| hex::encode(h.finish())),
    })
}

fn write_block(
    file: &File,
    bytes: &[u8],
    at: u64,
    written_before: u64,
    fault_enospc_after: Option<u64>,
) -> io::Result<()> {
    if let Some(limit) = fault_enospc_after {
        if written_before + bytes.len() as u64 > limit {
            let allowed = usize::try_from(limit.saturating_sub(written_before))
                .map_or(bytes.len(), |a| a.min(bytes.len()));
            file.write_all_at(&bytes[..allowed], at)?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
    }
    file.write_all_at(bytes, at)
}

fn hash_file(file: &File) -> io::Result<String> {
    let mut h = sha256_context();
    let mut buf = vec![0u8; BLOCK_SIZE];
    let mut reader = file;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(hex::encode(h.finish()))
}

/// Streaming SHA-256 of chunk and file contents. ring's assembly (AVX2 on CPUs
/// without SHA-NI) is ~1.8x faster than the pure-Rust sha2 crate here, and
/// hashing is the main CPU cost of a checksummed upload.
fn sha256_context() -> ring::digest::Context {
    ring::digest::Context::new(&ring::digest::SHA256)
}
