//! The exception hierarchy of the contract and the one place where errors of
//! the pure-Rust core become PHP exceptions.

use crate::storage::StorageError;
use ext_php_rs::exception::PhpException;
use ext_php_rs::prelude::*;
use ext_php_rs::zend::{ce, ClassEntry};

/// `\RuntimeException` (SPL, registered before any extension starts).
pub fn runtime_exception() -> &'static ClassEntry {
    ClassEntry::try_find("RuntimeException").unwrap_or_else(ce::exception)
}

pub fn invalid_argument_exception() -> &'static ClassEntry {
    ClassEntry::try_find("InvalidArgumentException").unwrap_or_else(ce::exception)
}

/// `UploadProgress\Exception`: the base of everything this extension throws.
#[php_class]
#[php(name = "UploadProgress\\Exception")]
#[php(extends(ce = runtime_exception, stub = "\\RuntimeException"))]
#[derive(Default)]
pub struct Exception;

/// Unknown or expired upload id.
#[php_class]
#[php(name = "UploadProgress\\NotFoundException")]
#[php(extends(Exception))]
#[derive(Default)]
pub struct NotFoundException;

/// Chunk index out of range, wrong length, or missing chunks at completion.
#[php_class]
#[php(name = "UploadProgress\\InvalidChunkException")]
#[php(extends(Exception))]
#[derive(Default)]
pub struct InvalidChunkException;

/// A chunk or the whole file does not match its checksum.
#[php_class]
#[php(name = "UploadProgress\\ChecksumMismatchException")]
#[php(extends(Exception))]
#[derive(Default)]
pub struct ChecksumMismatchException;

/// Disk full or another I/O failure of the storage.
#[php_class]
#[php(name = "UploadProgress\\StorageException")]
#[php(extends(Exception))]
#[derive(Default)]
pub struct StorageException;

pub fn value_error(message: impl Into<String>) -> PhpException {
    PhpException::new(message.into(), 0, ce::value_error())
}

pub fn invalid_argument(message: impl Into<String>) -> PhpException {
    PhpException::new(message.into(), 0, invalid_argument_exception())
}

pub fn storage_error(err: StorageError) -> PhpException {
    let message = err.to_string();
    match err {
        StorageError::InvalidId(_) | StorageError::NotFound(_) => {
            PhpException::from_class::<NotFoundException>(message)
        }
        StorageError::InvalidArgument(_) | StorageError::TooLarge { .. } => value_error(message),
        StorageError::InvalidChunk(_) => PhpException::from_class::<InvalidChunkException>(message),
        StorageError::ChecksumMismatch { .. } => {
            PhpException::from_class::<ChecksumMismatchException>(message)
        }
        StorageError::NoSpace(_) | StorageError::Io(_) => {
            PhpException::from_class::<StorageException>(message)
        }
    }
}
