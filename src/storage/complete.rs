//! Completion of an upload: every chunk stored, the whole-file sha256 (when one was
//! given), the data file fsynced and renamed from `data.part` to `data`, then the state
//! says `complete`.

use super::backend::Completed;
use super::error::{io_error, StorageError, WHOLE_FILE};
use super::layout::{self, DATA, DATA_PART};
use super::limits::check_id;
use super::locks::LockFile;
use super::manifest::{Manifest, UploadState};
use super::root::OpenHow;
use super::store::{Store, UploadStatus};
use super::write::BLOCK_SIZE;
use std::fs::File;
use std::io::{self, Read};

impl Store {
    /// Finishes an upload: every chunk must be stored (else `InvalidChunk` listing up to 20
    /// missing indexes) and the whole file must match the expected sha256 when one was given
    /// (else `ChecksumMismatch` with `index == WHOLE_FILE`; the upload then stays `uploading`
    /// with all chunks stored, and only `abort()` is left to do). The data file is fsynced and
    /// renamed from `data.part` to `data`. Idempotent: a second call returns the same status.
    pub fn complete(&self, id: &str) -> Result<UploadStatus, StorageError> {
        check_id(id)?;
        let root = self.open_root()?;
        let dir = layout::upload_dir(&root, id)?;
        let lock = LockFile::open(&dir, id, self.waits)?;
        let _manifest_lock = lock.manifest()?;
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
        let now = self.now();
        m.state = UploadState::Complete;
        m.path = Some(dir.path().join(DATA).to_string_lossy().into_owned());
        m.touched_at = now;
        m.expires_at = self.expiry_from(now);
        match self.backend.complete(&dir, m)? {
            Completed::Done(m) => Ok(self.status_of(&m)),
            Completed::Missing(m) => Err(missing_chunks(id, &m)),
            Completed::Gone => Err(StorageError::NotFound(id.to_string())),
        }
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
pub(crate) fn sha256_context() -> ring::digest::Context {
    ring::digest::Context::new(&ring::digest::SHA256)
}
