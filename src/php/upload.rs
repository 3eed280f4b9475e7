//! `UploadProgress\Upload`: a thin wrapper over `storage::Store` that also
//! reports progress to the hub while chunks stream in.
// PHP parameter names are camelCase (named arguments use them).
#![allow(non_snake_case)]

use crate::php::convert::{key_string, object_to_hashtable};
use crate::php::errors::value_error;
use crate::php::{ini, recorder, sapi};
use crate::protocol::ingest::IngestMessage;
use crate::recorder::ChunkStream;
use crate::redis_url::{key_prefix, parse_redis_url};
use crate::storage::{
    RedisStateOptions, StorageError, Store, StoreOptions, UploadState, UploadStatus,
};
use ext_php_rs::boxed::ZBox;
use ext_php_rs::exception::PhpException;
use ext_php_rs::flags::ClassFlags;
use ext_php_rs::prelude::*;
use ext_php_rs::types::{ZendCallable, ZendHashTable, Zval};
use ext_php_rs::zend::BailoutGuard;
use once_cell::sync::OnceCell;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, CString};
use std::io::Read;
use std::time::{Duration, Instant};

static STORE: OnceCell<Store> = OnceCell::new();

/// Connect, read and write timeout of the upload state in Redis: a PHP worker
/// waits at most this long per call before it gets a StorageException.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// One store per process; with `redis_url` set its Redis connection is kept
/// across requests (opened on first use, so the FPM master never holds one).
fn store() -> PhpResult<&'static Store> {
    STORE
        .get_or_try_init(|| -> Result<Store, StorageError> {
            let cfg = ini::config();
            let store = Store::new(StoreOptions {
                root: cfg.storage_dir.clone(),
                default_chunk_size: cfg.chunk_size,
                max_upload_size: cfg.max_upload_size,
                expire_seconds: cfg.expire_seconds,
            })?;
            if cfg.redis_url.trim().is_empty() {
                return Ok(store);
            }
            // A bad URL must not fall back to local state: hosts would disagree.
            let settings = parse_redis_url(&cfg.redis_url).map_err(StorageError::Unavailable)?;
            Ok(store.with_redis_state(RedisStateOptions {
                settings,
                key_prefix: key_prefix(&cfg.app_id),
                timeout: REDIS_TIMEOUT,
            }))
        })
        .map_err(PhpException::from)
}

fn status_array(status: &UploadStatus) -> PhpResult<ZBox<ZendHashTable>> {
    match serde_json::to_value(status) {
        Ok(serde_json::Value::Object(map)) => Ok(object_to_hashtable(&map)),
        _ => Err(value_error("status could not be converted")),
    }
}

/// Removes expired uploads (at most once a minute per directory) and tells
/// the subscribers of those that never completed.
fn sweep(store: &Store) {
    for swept in store.sweep_expired_detailed() {
        if swept.state == UploadState::Complete {
            continue;
        }
        recorder::send(&IngestMessage::Terminal {
            upload_id: swept.id,
            event: "failed".into(),
            fields: "{\"error\":\"expired\"}".into(),
        });
    }
}

/// The request body as the SAPI delivers it, read through our read_post hook.
struct SapiBody(&'static sapi::Symbols);

impl Read for SapiBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(self.0.read_post_block(buf))
    }
}

/// The body when PHP already consumed it (POST of a form or unknown type):
/// `php://input` replays it from PHP's own copy.
struct PhpInput {
    handle: Zval,
}

impl PhpInput {
    fn open() -> Option<Self> {
        let fopen = ZendCallable::try_from_name("fopen").ok()?;
        let handle = fopen.try_call(vec![&"php://input", &"rb"]).ok()?;
        handle.is_resource().then_some(PhpInput { handle })
    }
}

impl Read for PhpInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let fread = ZendCallable::try_from_name("fread")
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let want = buf.len() as i64;
        let data = fread
            .try_call(vec![&self.handle, &want])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let Some(bytes) = data.zend_str().map(|s| s.as_bytes()) else {
            return Ok(0);
        };
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        Ok(n)
    }
}

impl Drop for PhpInput {
    fn drop(&mut self) {
        if let Ok(fclose) = ZendCallable::try_from_name("fclose") {
            let _ = fclose.try_call(vec![&self.handle]);
        }
    }
}

/// `php_check_open_basedir()`: 0 when `path` may be opened under `open_basedir` (or none is
/// set); otherwise -1 after PHP's own warning ("open_basedir restriction in effect...").
/// Looked up at run time like the other engine symbols (stubs load the library outside PHP).
type CheckOpenBasedirFn = unsafe extern "C" fn(path: *const c_char) -> c_int;

fn check_open_basedir_fn() -> Option<CheckOpenBasedirFn> {
    static F: OnceCell<Option<CheckOpenBasedirFn>> = OnceCell::new();
    *F.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"php_check_open_basedir".as_ptr()) };
        // SAFETY: the PHP 8 signature `int php_check_open_basedir(const char *path)`.
        (!p.is_null())
            .then(|| unsafe { std::mem::transmute::<*mut libc::c_void, CheckOpenBasedirFn>(p) })
    })
}

/// Opens a `$sourceFile` the way `file_get_contents()` would be allowed to: `open_basedir`
/// is checked first, on the PHP thread, so a forbidden file is never opened, and the error
/// says no more than PHP's own warning (nothing about its existence or size).
fn open_source_file(path: &str) -> Result<(std::fs::File, Option<u64>), StorageError> {
    let refused =
        |why: &str| StorageError::Io(format!("cannot open source file \"{path}\": {why}"));
    let c = CString::new(path).map_err(|_| refused("the path contains a NUL byte"))?;
    let Some(check) = check_open_basedir_fn() else {
        // Not inside PHP: nothing to enforce (unit tests, stub generation).
        return open_plain(path);
    };
    // SAFETY: a NUL-terminated path; runs on the PHP thread during a request.
    if unsafe { check(c.as_ptr()) } != 0 {
        return Err(refused("open_basedir restriction in effect"));
    }
    open_plain(path)
}

fn open_plain(path: &str) -> Result<(std::fs::File, Option<u64>), StorageError> {
    let file = std::fs::File::open(path)
        .map_err(|e| StorageError::Io(format!("cannot open source file \"{path}\": {e}")))?;
    let len = file
        .metadata()
        .ok()
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.len());
    Ok((file, len))
}

/// Cleanup of a chunk write that a PHP bailout (fatal error, timeout) jumped over: the
/// method's `try_catch` drops this guard, which releases the chunk lock and the reserved
/// range (`storage::release_abandoned`) and ends the progress stream as failed, before the
/// bailout goes on. Disarmed when the write returns normally.
struct AbandonedChunk {
    armed: bool,
    end: Option<IngestMessage>,
}

impl Drop for AbandonedChunk {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        crate::storage::release_abandoned();
        if let Some(m) = self.end.take() {
            recorder::send(&m);
        }
    }
}

/// A chunked, resumable upload stored by the extension.
#[php_class]
#[php(name = "UploadProgress\\Upload")]
#[php(flags = ClassFlags::Final)]
pub struct Upload {
    id: String,
    total_bytes: u64,
    chunk_size: u64,
    chunk_count: u64,
    /// abort() succeeded on this object: later chunks are a conflict, not "unknown".
    aborted: Cell<bool>,
}

impl Upload {
    fn from_status(s: &UploadStatus) -> Self {
        Upload {
            id: s.id.clone(),
            total_bytes: s.total_bytes,
            chunk_size: s.chunk_size,
            chunk_count: s.chunk_count,
            aborted: Cell::new(false),
        }
    }
}

/// The `$options` of Upload::create.
#[derive(Default)]
struct CreateOptions {
    chunk_size: Option<u64>,
    metadata: BTreeMap<String, String>,
    sha256: Option<String>,
}

fn parse_options(options: &ZendHashTable) -> PhpResult<CreateOptions> {
    let mut chunk_size = None;
    let mut metadata = BTreeMap::new();
    let mut sha256 = None;
    for (key, value) in options.iter() {
        let key = key_string(key);
        match key.as_str() {
            "chunk_size" => {
                let n = value
                    .long()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| value_error(format!("Upload::create(): option chunk_size must be a positive int, {value:?} given")))?;
                chunk_size = Some(n as u64);
            }
            "sha256" => {
                let s = value
                    .str()
                    .ok_or_else(|| value_error("Upload::create(): option sha256 must be a string"))?;
                sha256 = Some(s.to_owned());
            }
            "metadata" => {
                let ht = value
                    .array()
                    .ok_or_else(|| value_error("Upload::create(): option metadata must be an array<string,string>"))?;
                for (k, v) in ht.iter() {
                    let k = key_string(k);
                    let v = v.string().or_else(|| v.long().map(|n| n.to_string())).ok_or_else(|| {
                        value_error(format!("Upload::create(): metadata value of \"{k}\" must be a string"))
                    })?;
                    metadata.insert(k, v);
                }
            }
            other => {
                return Err(value_error(format!(
                    "Upload::create(): unknown option \"{other}\" (known: chunk_size, metadata, sha256)"
                )))
            }
        }
    }
    Ok(CreateOptions {
        chunk_size,
        metadata,
        sha256,
    })
}

#[php_impl]
impl Upload {
    /// Starts a new upload of `$totalBytes` bytes; the id is made here.
    pub fn create(totalBytes: i64, options: Option<&ZendHashTable>) -> PhpResult<Upload> {
        let total_bytes = totalBytes;
        if total_bytes <= 0 {
            return Err(value_error(format!(
                "Upload::create(): total bytes must be greater than 0, {total_bytes} given"
            )));
        }
        let CreateOptions {
            chunk_size,
            metadata,
            sha256,
        } = match options {
            Some(o) => parse_options(o)?,
            None => CreateOptions::default(),
        };
        let store = store()?;
        sweep(store);
        let status = store.create(total_bytes as u64, chunk_size, metadata, sha256)?;
        Ok(Upload::from_status(&status))
    }

    /// Opens an existing upload; NotFoundException when unknown or expired.
    pub fn open(id: &str) -> PhpResult<Upload> {
        let status = store()?.open(id)?;
        Ok(Upload::from_status(&status))
    }

    #[php(getter)]
    pub fn get_id(&self) -> String {
        self.id.clone()
    }

    #[php(getter)]
    pub fn get_total_bytes(&self) -> i64 {
        self.total_bytes as i64
    }

    #[php(getter)]
    pub fn get_chunk_size(&self) -> i64 {
        self.chunk_size as i64
    }

    #[php(getter)]
    pub fn get_chunk_count(&self) -> i64 {
        self.chunk_count as i64
    }

    /// Stores chunk `$index` from `$sourceFile`, or from the request body when
    /// null. `$checksum` is `sha256:<hex>`. Returns status().
    pub fn write_chunk(
        &self,
        index: i64,
        sourceFile: Option<String>,
        checksum: Option<String>,
    ) -> PhpResult<ZBox<ZendHashTable>> {
        let store = store()?;
        if index < 0 || index as u64 >= self.chunk_count {
            return Err(PhpException::from(StorageError::InvalidChunk(format!(
                "chunk index {index} is out of range 0..{} for upload {}",
                self.chunk_count, self.id
            ))));
        }
        if self.aborted.get() {
            return Err(PhpException::from(StorageError::Conflict(format!(
                "upload {} was aborted: chunk {index} was not accepted",
                self.id
            ))));
        }
        let before = store.status(&self.id)?;
        let mut reports = ChunkStream::new(
            &self.id,
            recorder::next_stream_id(),
            self.total_bytes,
            self.chunk_count,
            before.bytes_done,
            before.chunks_done,
            ini::config().min_interval_ms,
        );
        let failed = reports.failed();
        let mut on_progress = |inflight: u64| {
            if let Some(m) = reports.progress(inflight, Instant::now()) {
                recorder::send(&m);
            }
        };
        // Opened (and checked against open_basedir) before anything else happens.
        let source = sourceFile.as_deref().map(open_source_file).transpose()?;
        let mut guard = BailoutGuard::new(AbandonedChunk {
            armed: true,
            end: Some(failed.clone()),
        });
        let result = match source {
            Some((mut file, len)) => store.write_chunk_sized(
                &self.id,
                index as u64,
                &mut file,
                len,
                checksum.as_deref(),
                &mut on_progress,
            ),
            None => {
                let syms = sapi::get()
                    .ok_or_else(|| value_error("no SAPI to read the request body from"))?;
                // Content-Length; -1 (unknown, chunked encoding) reserves nothing.
                let announced = syms
                    .request()
                    .and_then(|r| u64::try_from(r.content_length).ok());
                recorder::while_streaming_chunk(|| {
                    if syms.body_already_read() {
                        match PhpInput::open() {
                            Some(mut input) => store.write_chunk_sized(
                                &self.id,
                                index as u64,
                                &mut input,
                                announced,
                                checksum.as_deref(),
                                &mut on_progress,
                            ),
                            None => Err(StorageError::Io(
                                "the request body was already consumed and php://input cannot replay it".into(),
                            )),
                        }
                    } else {
                        store.write_chunk_sized(
                            &self.id,
                            index as u64,
                            &mut SapiBody(syms),
                            announced,
                            checksum.as_deref(),
                            &mut on_progress,
                        )
                    }
                })
            }
        };
        guard.armed = false;
        drop(guard);
        match result {
            Ok(outcome) => {
                let s = &outcome.status;
                recorder::send(&reports.stored(s.bytes_done, s.chunks_done));
                status_array(s)
            }
            Err(e) => {
                recorder::send(&failed);
                Err(e.into())
            }
        }
    }

    /// Everything known about the upload (see the contract for the keys).
    pub fn status(&self) -> PhpResult<ZBox<ZendHashTable>> {
        let status = store()?.status(&self.id)?;
        status_array(&status)
    }

    /// Checks every chunk (and the optional sha256) and returns the absolute
    /// path of the finished file; a second call returns the same path.
    pub fn complete(&self) -> PhpResult<String> {
        let store = store()?;
        let was_complete = store.status(&self.id).is_ok_and(|s| s.path.is_some());
        let status = store.complete(&self.id)?;
        let path = status.path.clone().unwrap_or_default();
        if !was_complete {
            // No server path: events go to browsers (CONTRACT.md).
            let mut fields = serde_json::json!({
                "bytes_total": status.total_bytes,
            });
            if let Some(sha) = &status.sha256 {
                fields["sha256"] = serde_json::Value::String(sha.clone());
            }
            recorder::send(&IngestMessage::Terminal {
                upload_id: self.id.clone(),
                event: "complete".into(),
                fields: fields.to_string(),
            });
        }
        Ok(path)
    }

    /// Removes the upload and tells its subscribers.
    pub fn abort(&self) -> PhpResult<()> {
        store()?.abort(&self.id)?;
        self.aborted.set(true);
        recorder::send(&IngestMessage::Terminal {
            upload_id: self.id.clone(),
            event: "aborted".into(),
            fields: "{}".into(),
        });
        Ok(())
    }
}
