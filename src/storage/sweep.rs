//! Expiry: removal of expired uploads, aborted leftovers and orphaned directories, at most
//! once per [`SWEEP_INTERVAL`] per root directory across all processes and hosts (the mtime
//! of `<root>/.sweep`, claimed with a non-blocking OFD lock).

use super::error::StorageError;
use super::id::valid_id;
use super::layout::SWEEP_STAMP;
use super::locks::LockFile;
use super::manifest::UploadState;
use super::root::{OpenHow, Root};
use super::store::Store;
use super::sys::ByteLock;
use std::fs;
use std::time::{Duration, SystemTime};

/// `sweep_expired` does real work at most this often per root directory.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// A directory without a readable manifest this old is a leftover (crashed create, failed
/// removal) and is removed by a sweep.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// An upload removed by a sweep because it expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweptUpload {
    /// Its id.
    pub id: String,
    /// Its state when it was removed (`Uploading` or `Complete`).
    pub state: UploadState,
}

impl Store {
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

    /// A sweep; `force` ignores the interval (tests).
    pub(crate) fn sweep(&self, force: bool) -> Vec<SweptUpload> {
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
        match self.backend.load(root, id) {
            Err(e @ StorageError::Unavailable(_)) => Err(e),
            Ok(Some(m)) if m.state == UploadState::Aborted => {
                let _ = fs::remove_dir_all(&path);
                Ok(None)
            }
            Ok(Some(m)) if m.is_expired(self.now()) => {
                let Ok(dir) = root.open_dir(id) else {
                    return Ok(None);
                };
                let Ok(lock) = LockFile::open(&dir, id, self.waits) else {
                    return Ok(None);
                };
                let Ok(manifest_lock) = lock.manifest() else {
                    return Ok(None);
                };
                // Under the manifest lock: marked aborted, unless touched (or aborted)
                // meanwhile.
                let Some(state) = self.backend.expire(&dir, id, self.now())? else {
                    return Ok(None);
                };
                drop(manifest_lock);
                drop(lock);
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
}

fn is_recent(mtime: SystemTime) -> bool {
    match mtime.elapsed() {
        Ok(age) => age < SWEEP_INTERVAL,
        Err(future) => future.duration() < SWEEP_INTERVAL, // small clock skew between hosts
    }
}
