//! Where the state of uploads lives, chosen once when a [`super::Store`] is built:
//! [`ManifestFiles`] (`<id>/manifest.json` next to the data, one host) or
//! [`super::redis_state::RedisState`] (several hosts sharing the directory). The store's
//! operations are the same for both; only these few state changes differ.

use super::error::{io_error, StorageError};
use super::layout::is_gone;
use super::locks::LockFile;
use super::manifest::{self, Manifest, UploadState};
use super::root::{Dir, Root};

/// Result of [`StateBackend::complete`].
pub(crate) enum Completed {
    Done(Manifest),
    /// The state store misses marks the caller saw (Redis lost writes): these chunks must
    /// be sent again.
    Missing(Manifest),
    /// The upload is gone (aborted or expired meanwhile).
    Gone,
}

/// Result of [`StateBackend::abort`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AbortOutcome {
    /// No such upload.
    Unknown,
    /// Marked aborted (or its state removed): the directory goes next.
    Removed,
    /// It had expired or was already aborted: removed anyway, but `NotFound` for the caller.
    WasExpired,
}

/// A chunk whose bytes are durable, to be marked stored, and the time of the mark.
pub(crate) struct Mark {
    pub index: u64,
    pub sha256: Option<String>,
    pub now: u64,
    pub expires_at: u64,
}

/// Syncs the directory and the root of a new upload (see [`StateBackend::create`]).
pub(crate) type MakeDurable<'a> = &'a mut dyn FnMut() -> Result<(), StorageError>;

/// The state changes of an upload. `now` and `expires_at` are Unix seconds (`expires_at`
/// 0 = never); a change that touches the upload sets `touched_at = now` and `expires_at`.
pub(crate) trait StateBackend: std::fmt::Debug + Send + Sync {
    /// The state of upload `id`; `None` when there is none.
    fn load(&self, root: &Root, id: &str) -> Result<Option<Manifest>, StorageError>;

    /// Records a new upload whose directory `dir` holds its (not yet synced) files.
    /// `make_durable` syncs the directory and the root: the state must be durable with
    /// them, and visible to others only once they are.
    fn create(
        &self,
        dir: &Dir,
        m: &Manifest,
        make_durable: MakeDurable,
    ) -> Result<(), StorageError>;

    /// Marks a chunk stored when the upload is live; the state after it, `None` when the
    /// upload is gone. `lock` is the upload's lock file (it knows the id); the chunk lock
    /// is held.
    fn mark(
        &self,
        dir: &Dir,
        lock: &LockFile,
        mark: Mark,
    ) -> Result<Option<Manifest>, StorageError>;

    /// Records completion: `done` is the upload's state after it (every chunk stored,
    /// `complete`, the final path, touched). Called under the manifest lock.
    fn complete(&self, dir: &Dir, done: Manifest) -> Result<Completed, StorageError>;

    /// Marks the upload aborted (its directory is removed next). Called under the
    /// manifest lock.
    fn abort(&self, dir: &Dir, id: &str, now: u64) -> Result<AbortOutcome, StorageError>;

    /// Marks an expired upload aborted (the sweep removes it next) and returns the state
    /// it had; `None` when it is live again or already gone. Called under the manifest lock.
    fn expire(&self, dir: &Dir, id: &str, now: u64) -> Result<Option<UploadState>, StorageError>;
}

/// The state in `<id>/manifest.json`, rewritten atomically under the manifest lock.
#[derive(Debug, Default)]
pub(crate) struct ManifestFiles;

impl StateBackend for ManifestFiles {
    fn load(&self, root: &Root, id: &str) -> Result<Option<Manifest>, StorageError> {
        match root.open_dir(id) {
            Ok(dir) => manifest::load(&dir, id),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(io_error("opening", &root.path().join(id), &e)),
        }
    }

    fn create(
        &self,
        dir: &Dir,
        m: &Manifest,
        make_durable: MakeDurable,
    ) -> Result<(), StorageError> {
        manifest::store(dir, m)?;
        make_durable()
    }

    fn mark(
        &self,
        dir: &Dir,
        lock: &LockFile,
        mark: Mark,
    ) -> Result<Option<Manifest>, StorageError> {
        let _manifest_lock = lock.manifest()?;
        let mut m = match manifest::load(dir, lock.id())? {
            Some(m) if m.state != UploadState::Aborted && !m.is_expired(mark.now) => m,
            _ => return Ok(None),
        };
        m.mark_stored(mark.index, mark.sha256);
        m.touched_at = mark.now;
        m.expires_at = mark.expires_at;
        manifest::store(dir, &m)?;
        Ok(Some(m))
    }

    fn complete(&self, dir: &Dir, done: Manifest) -> Result<Completed, StorageError> {
        manifest::store(dir, &done)?;
        Ok(Completed::Done(done))
    }

    fn abort(&self, dir: &Dir, id: &str, now: u64) -> Result<AbortOutcome, StorageError> {
        let Some(mut m) = manifest::load(dir, id)? else {
            return Ok(AbortOutcome::Unknown);
        };
        let gone = m.state == UploadState::Aborted || m.is_expired(now);
        m.state = UploadState::Aborted;
        if manifest::store(dir, &m).is_err() {
            // No space for a new manifest: unlinking the old one commits the abort too.
            let path = dir.path().join(manifest::MANIFEST);
            dir.remove_file(manifest::MANIFEST)
                .map_err(|e| io_error("removing", &path, &e))?;
        }
        Ok(if gone {
            AbortOutcome::WasExpired
        } else {
            AbortOutcome::Removed
        })
    }

    fn expire(&self, dir: &Dir, id: &str, now: u64) -> Result<Option<UploadState>, StorageError> {
        let Ok(Some(mut m)) = manifest::load(dir, id) else {
            return Ok(None);
        };
        if !m.is_expired(now) || m.state == UploadState::Aborted {
            return Ok(None);
        }
        let state = m.state;
        m.state = UploadState::Aborted;
        if manifest::store(dir, &m).is_err() && dir.remove_file(manifest::MANIFEST).is_err() {
            return Ok(None);
        }
        Ok(Some(state))
    }
}
