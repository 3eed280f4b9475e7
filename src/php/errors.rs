//! The exception hierarchy of the contract and the one place where errors of
//! the pure-Rust core become PHP exceptions.

use crate::storage::StorageError;
use ext_php_rs::class::RegisteredClass;
use ext_php_rs::exception::PhpException;
use ext_php_rs::prelude::*;
use ext_php_rs::zend::{ce, ClassEntry};
use std::ffi::CStr;

/// An SPL class entry (`spl_ce_*` globals; SPL starts before any extension).
/// Looked up with dlsym: EG(class_table) is not set up yet during MINIT.
fn spl_class(symbol: &CStr) -> &'static ClassEntry {
    // SAFETY: the symbol, if present, is a `zend_class_entry *` global.
    unsafe {
        let slot = libc::dlsym(libc::RTLD_DEFAULT, symbol.as_ptr()) as *const *const ClassEntry;
        if slot.is_null() || (*slot).is_null() {
            return ce::exception();
        }
        &**slot
    }
}

/// `\RuntimeException`.
pub fn runtime_exception() -> &'static ClassEntry {
    spl_class(c"spl_ce_RuntimeException")
}

/// `\InvalidArgumentException`.
pub fn invalid_argument_exception() -> &'static ClassEntry {
    spl_class(c"spl_ce_InvalidArgumentException")
}

/// ext-php-rs gives every class a `__construct` that refuses `new` when the
/// Rust type has no constructor; exceptions must take `\Exception`'s own
/// (message, code, previous). `new` asks `ce->constructor`, so pointing it at
/// the parent's is enough. Runs once, after the classes are registered.
pub fn use_parent_constructors() {
    fn fix(ce: &'static ClassEntry) {
        let ce = ce as *const ClassEntry as *mut ClassEntry;
        // SAFETY: our registered class entries; their parent is set at
        // registration and lives as long as the engine.
        unsafe {
            let parent = (*ce).__bindgen_anon_1.parent;
            if !parent.is_null() {
                (*ce).constructor = (*parent).constructor;
            }
        }
    }
    // Parents first, so that children copy the fixed constructor.
    fix(Exception::get_metadata().ce());
    fix(NotFoundException::get_metadata().ce());
    fix(InvalidChunkException::get_metadata().ce());
    fix(ChecksumMismatchException::get_metadata().ce());
    fix(StorageException::get_metadata().ce());
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

/// `getCode()` of an `InvalidChunkException` for a chunk refused because of the upload's
/// state rather than its bytes: the upload is complete or aborted. An HTTP front answers
/// 409 Conflict for it.
pub const CHUNK_CONFLICT_CODE: i32 = 409;

/// `getCode()` of an `InvalidChunkException` for a chunk another request is writing right
/// now (its lock stayed busy for the wait bound): nothing was read; retry later. An HTTP
/// front answers 409 too (with `Retry-After`), or 423 Locked.
pub const CHUNK_BUSY_CODE: i32 = 423;

/// Every storage failure becomes the contract's exception, so PHP methods use `?` on
/// storage calls directly.
impl From<StorageError> for PhpException {
    fn from(err: StorageError) -> Self {
        storage_exception(err)
    }
}

fn storage_exception(err: StorageError) -> PhpException {
    let message = err.to_string();
    match err {
        StorageError::InvalidId(_) | StorageError::NotFound(_) => {
            PhpException::from_class::<NotFoundException>(message)
        }
        StorageError::InvalidArgument(_) | StorageError::TooLarge { .. } => value_error(message),
        StorageError::InvalidChunk(_) => PhpException::from_class::<InvalidChunkException>(message),
        StorageError::Conflict(_) => PhpException::new(
            message,
            CHUNK_CONFLICT_CODE,
            InvalidChunkException::get_metadata().ce(),
        ),
        StorageError::ChunkBusy(_) => PhpException::new(
            message,
            CHUNK_BUSY_CODE,
            InvalidChunkException::get_metadata().ce(),
        ),
        StorageError::ChecksumMismatch { .. } => {
            PhpException::from_class::<ChecksumMismatchException>(message)
        }
        StorageError::NoSpace(_) | StorageError::Io(_) | StorageError::Unavailable(_) => {
            PhpException::from_class::<StorageException>(message)
        }
    }
}
