//! The per-upload manifest (`manifest.json`): which chunks are durably stored, their sha256,
//! sizes, metadata, expiry, state and final path. Read without a lock (it is only ever
//! replaced by an atomic rename, so a reader sees the old or the new version, never a mix);
//! written under the manifest lock with write-temp + fdatasync + rename.

use super::error::{io_error, shorten, StorageError};
use super::layout::{is_gone, DATA};
use super::limits::{check_metadata, consistent_counts, is_lower_hex64};
use super::root::{Dir, OpenHow};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

pub(crate) const MANIFEST: &str = "manifest.json";
const MANIFEST_TMP: &str = "manifest.json.tmp";
pub(crate) const FORMAT_VERSION: u32 = 1;

/// Lifecycle state of an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadState {
    /// Chunks are being received.
    Uploading,
    /// `complete()` succeeded; the data file has its final name.
    Complete,
    /// `abort()` (or expiry) is removing it.
    Aborted,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub version: u32,
    pub id: String,
    pub state: UploadState,
    pub total_bytes: u64,
    pub chunk_size: u64,
    pub chunk_count: u64,
    /// One character per chunk: `1` stored (durably, after fdatasync), `0` missing.
    pub stored: String,
    /// sha256 (lowercase hex) of stored chunks that came with a `sha256:` checksum.
    #[serde(default)]
    pub chunk_sha256: BTreeMap<u64, String>,
    pub metadata: BTreeMap<String, String>,
    /// Expected sha256 of the whole file, checked by `complete()`.
    pub sha256: Option<String>,
    pub created_at: u64,
    pub touched_at: u64,
    /// `touched_at + expire_seconds` at the last touch; 0 = never expires.
    pub expires_at: u64,
    /// Absolute path of the finished file, once complete.
    pub path: Option<String>,
}

impl Manifest {
    pub fn is_stored(&self, index: u64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.stored.as_bytes().get(i))
            .is_some_and(|&b| b == b'1')
    }

    pub fn mark_stored(&mut self, index: u64, sha256: Option<String>) {
        if let Ok(i) = usize::try_from(index) {
            if i < self.stored.len() {
                self.stored.replace_range(i..i + 1, "1");
            }
        }
        if let Some(h) = sha256 {
            self.chunk_sha256.insert(index, h);
        }
    }

    /// Length of chunk `index` (the last one may be shorter).
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(self.chunk_size);
        self.total_bytes.saturating_sub(start).min(self.chunk_size)
    }

    pub fn missing(&self) -> Vec<u64> {
        self.stored
            .bytes()
            .enumerate()
            .filter(|&(_, b)| b != b'1')
            .map(|(i, _)| i as u64)
            .collect()
    }

    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at != 0 && now >= self.expires_at
    }

    /// Refuses a manifest that `create` and the writers could never have produced: the
    /// file is data on disk (another process, another host, a tampered or damaged file),
    /// and everything downstream (offsets, byte counts, the path handed to PHP) trusts it.
    pub(crate) fn check(&self, id: &str, origin: &str) -> Result<(), StorageError> {
        let inconsistent =
            |why: String| Err(StorageError::Io(format!("{origin} is inconsistent: {why}")));
        if self.version != FORMAT_VERSION {
            return inconsistent(format!(
                "version {} (expected {FORMAT_VERSION})",
                self.version
            ));
        }
        if self.id != id {
            return inconsistent(format!("id {:?} (expected {id:?})", shorten(&self.id)));
        }
        if !consistent_counts(
            self.total_bytes,
            self.chunk_size,
            self.chunk_count,
            &self.stored,
        ) {
            return inconsistent(format!(
                "{} chunks of {} bytes for {} bytes, {} stored flags",
                self.chunk_count,
                self.chunk_size,
                self.total_bytes,
                self.stored.len()
            ));
        }
        if let Some((i, h)) = self
            .chunk_sha256
            .iter()
            .find(|(i, h)| **i >= self.chunk_count || !is_lower_hex64(h))
        {
            return inconsistent(format!("checksum of chunk {i}: {:?}", shorten(h)));
        }
        if let Some(h) = self.sha256.as_deref().filter(|h| !is_lower_hex64(h)) {
            return inconsistent(format!("sha256 {:?}", shorten(h)));
        }
        if let Err(e) = check_metadata(&self.metadata) {
            return inconsistent(e.to_string());
        }
        // The path handed to PHP once complete is always `<root>/<id>/data`; the root may
        // have been moved or reached through another name since, so only the tail is fixed.
        let path_ok = match (&self.state, &self.path) {
            (UploadState::Uploading, None) => true,
            (UploadState::Uploading, Some(_)) | (UploadState::Complete, None) => false,
            (UploadState::Complete, Some(p)) | (UploadState::Aborted, Some(p)) => {
                let p = std::path::Path::new(p);
                p.is_absolute() && p.ends_with(std::path::Path::new(id).join(DATA))
            }
            (UploadState::Aborted, None) => true,
        };
        if !path_ok {
            return inconsistent(format!(
                "state {:?} with path {:?}",
                self.state,
                self.path.as_deref().map(super::error::shorten)
            ));
        }
        if self.state == UploadState::Complete && self.stored.contains('0') {
            return inconsistent("complete with chunks missing".to_string());
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &str,
        total_bytes: u64,
        chunk_size: u64,
        chunk_count: u64,
        metadata: BTreeMap<String, String>,
        sha256: Option<String>,
        now: u64,
        expires_at: u64,
    ) -> Manifest {
        Manifest {
            version: FORMAT_VERSION,
            id: id.to_string(),
            state: UploadState::Uploading,
            total_bytes,
            chunk_size,
            chunk_count,
            stored: "0".repeat(chunk_count as usize),
            chunk_sha256: BTreeMap::new(),
            metadata,
            sha256,
            created_at: now,
            touched_at: now,
            expires_at,
            path: None,
        }
    }
}

/// Reads the manifest of upload `id` in `dir`; `Ok(None)` when there is none (never created,
/// removed, or the directory itself is gone).
pub(crate) fn load(dir: &Dir, id: &str) -> Result<Option<Manifest>, StorageError> {
    let path = dir.path().join(MANIFEST);
    let read = || -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        dir.open_file(MANIFEST, OpenHow::Read)?
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let bytes = match read() {
        Ok(b) => b,
        Err(e) if is_gone(&e) => return Ok(None),
        Err(e) => return Err(io_error("reading", &path, &e)),
    };
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| StorageError::Io(format!("manifest {} is not valid: {e}", path.display())))?;
    m.check(id, &format!("manifest {}", path.display()))?;
    Ok(Some(m))
}

/// Replaces the manifest atomically: write `manifest.json.tmp`, fdatasync it, rename it over
/// `manifest.json`. The caller holds the manifest lock (so the fixed temp name is safe).
/// The directory is not fsynced here: losing the rename in a crash only loses the latest
/// mark (the chunk is then resent), never marks data that is not durable.
pub(crate) fn store(dir: &Dir, m: &Manifest) -> Result<(), StorageError> {
    let tmp = dir.path().join(MANIFEST_TMP);
    let bytes = serde_json::to_vec(m)
        .map_err(|e| StorageError::Io(format!("encoding manifest {}: {e}", tmp.display())))?;
    let write = || -> io::Result<()> {
        // A leftover of a crashed writer is ours to replace (we hold the manifest lock);
        // O_EXCL then, so a planted name is never written through.
        match dir.remove_file(MANIFEST_TMP) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = dir.open_file(MANIFEST_TMP, OpenHow::CreateNew)?;
        f.write_all(&bytes)?;
        f.sync_data()
    };
    write().map_err(|e| io_error("writing", &tmp, &e))?;
    let path = dir.path().join(MANIFEST);
    dir.rename(MANIFEST_TMP, MANIFEST)
        .map_err(|e| io_error("renaming into place", &path, &e))
}
