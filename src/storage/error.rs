//! Errors of the storage core. Every message names the offending value.

use std::fmt;
use std::io;
use std::path::Path;

/// What went wrong in a storage operation.
///
/// Payload conventions (the PHP wrapper maps the variants to exceptions):
/// - `InvalidId(id)` and `NotFound(id)` carry the upload id as given (`InvalidId` shortens ids
///   longer than 128 bytes); `Display` builds the sentence.
/// - `InvalidArgument`, `InvalidChunk`, `Conflict`, `ChunkBusy`, `NoSpace`, `Io` and `Unavailable` carry the complete, human readable
///   message, which names the offending value.
/// - `ChecksumMismatch` with `index == u64::MAX` ([`WHOLE_FILE`]) is the whole-file sha256 check
///   of `complete()`; any other index is the chunk whose `sha256:` checksum did not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// The id is not 26 characters of `[0-9a-z]`; nothing touched the filesystem.
    InvalidId(String),
    /// No upload with this id, or it expired, or it was aborted.
    NotFound(String),
    /// A bad option or argument (sizes, checksum syntax, metadata, ...).
    InvalidArgument(String),
    /// Chunk index out of range, wrong chunk length, or chunks missing at completion.
    InvalidChunk(String),
    /// The chunk cannot be written in the upload's current state: the upload is complete or
    /// aborted. Nothing was read or written. PHP: `InvalidChunkException` with code 409.
    Conflict(String),
    /// Another request is writing the same chunk (its lock was not free within the wait
    /// bound). Nothing was read or written; worth a retry later. PHP:
    /// `InvalidChunkException` with code 423.
    ChunkBusy(String),
    /// The data did not hash to the expected value; nothing was marked stored.
    ChecksumMismatch {
        /// Chunk index, or [`WHOLE_FILE`] for the whole-file check of `complete()`.
        index: u64,
        /// Expected sha256, lowercase hex.
        expected: String,
        /// Actual sha256 of the received data, lowercase hex.
        actual: String,
    },
    /// `total_bytes` is over `max_upload_size`.
    TooLarge {
        /// Requested size in bytes.
        size: u64,
        /// The configured maximum in bytes.
        max: u64,
    },
    /// ENOSPC or EDQUOT while storing; nothing was marked, the upload stays resumable.
    NoSpace(String),
    /// Any other I/O failure (including a failing request-body source).
    Io(String),
    /// The shared state store (Redis) could not be reached or answered with an error;
    /// nothing was marked, the call can be retried once it is back.
    Unavailable(String),
}

/// The `index` of [`StorageError::ChecksumMismatch`] for the whole-file check in `complete()`.
pub const WHOLE_FILE: u64 = u64::MAX;

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::InvalidId(id) => {
                write!(f, "upload id {id:?} is not 26 characters of [0-9a-z]")
            }
            StorageError::NotFound(id) => {
                write!(
                    f,
                    "upload {id} does not exist (unknown, expired or aborted)"
                )
            }
            StorageError::InvalidArgument(m)
            | StorageError::InvalidChunk(m)
            | StorageError::Conflict(m)
            | StorageError::ChunkBusy(m)
            | StorageError::NoSpace(m)
            | StorageError::Io(m)
            | StorageError::Unavailable(m) => f.write_str(m),
            StorageError::ChecksumMismatch {
                index,
                expected,
                actual,
            } => {
                if *index == WHOLE_FILE {
                    write!(
                        f,
                        "the uploaded file has sha256 {actual}, expected sha256 {expected}"
                    )
                } else {
                    write!(
                        f,
                        "chunk {index} has sha256 {actual}, expected sha256 {expected}; it was not stored"
                    )
                }
            }
            StorageError::TooLarge { size, max } => write!(
                f,
                "upload size {size} bytes exceeds max_upload_size {max} bytes"
            ),
        }
    }
}

impl std::error::Error for StorageError {}

/// True for the errno values that mean "the disk (or the quota) is full".
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Maps an I/O error of `what` on `path` to `NoSpace` or `Io`, naming both.
pub(crate) fn io_error(what: &str, path: &Path, e: &io::Error) -> StorageError {
    if is_no_space(e) {
        StorageError::NoSpace(format!(
            "no space left on device while {what} {}: {e}",
            path.display()
        ))
    } else {
        StorageError::Io(format!("I/O error while {what} {}: {e}", path.display()))
    }
}

/// Shortens a user-supplied string for an error message (at most 128 bytes, on a char boundary).
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 128;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}
