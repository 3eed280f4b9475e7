//! Names and directories of the on-disk layout (see the module documentation of
//! `storage`): one directory per upload under the checked root, holding the lock file, the
//! data file and, with the manifest-file backend, the manifest.

use super::error::{io_error, StorageError};
use super::id::new_id;
use super::root::{Dir, OpenHow, Root};
use std::fs::File;
use std::io;
use std::path::PathBuf;

pub(crate) const LOCK: &str = "lock";
pub(crate) const DATA_PART: &str = "data.part";
pub(crate) const DATA: &str = "data";
pub(crate) const SWEEP_STAMP: &str = ".sweep";

/// ENOENT or ENOTDIR: the file or its directory does not exist.
pub(crate) fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// The directory of upload `id`: `NotFound` when it does not exist.
pub(crate) fn upload_dir(root: &Root, id: &str) -> Result<Dir, StorageError> {
    match root.open_dir(id) {
        Ok(dir) => Ok(dir),
        Err(e) if is_gone(&e) => Err(StorageError::NotFound(id.to_string())),
        Err(e) => Err(io_error("opening", &root.path().join(id), &e)),
    }
}

/// A new upload directory with a fresh id. A root removed behind our back (tmp cleaners)
/// is made again by `reopen`.
pub(crate) fn make_upload_dir(
    root: &mut Root,
    reopen: impl Fn() -> Result<Root, StorageError>,
) -> Result<(String, Dir), StorageError> {
    let mut last_err = None;
    for _ in 0..8 {
        let id = new_id();
        match root.create_dir(&id) {
            Ok(dir) => return Ok((id, dir)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                *root = reopen()?;
                last_err = Some(e);
            }
            Err(e) => return Err(io_error("creating", &root.path().join(&id), &e)),
        }
    }
    let e = last_err.unwrap_or_else(|| io::Error::other("no free upload id"));
    Err(io_error("creating an upload directory in", root.path(), &e))
}

/// The name of the one data file: `data.part`, or `data` once `complete()` renamed it
/// (also when that rename landed but the state change did not: crash, lost Redis write).
pub(crate) fn data_name(dir: &Dir) -> &'static str {
    if !dir.exists(DATA_PART) && dir.exists(DATA) {
        DATA
    } else {
        DATA_PART
    }
}

/// Opens the data file of upload `id` for writing: the file and its path.
pub(crate) fn open_data(dir: &Dir, id: &str, name: &str) -> Result<(File, PathBuf), StorageError> {
    let path = dir.path().join(name);
    match dir.open_file(name, OpenHow::Write) {
        Ok(f) => Ok((f, path)),
        Err(e) if is_gone(&e) => Err(StorageError::NotFound(id.to_string())),
        Err(e) => Err(io_error("opening", &path, &e)),
    }
}
