//! Limits of an upload and the checks of everything a caller (or a state file) hands the
//! store: sizes, chunk counts, metadata, ids and sha256 digests. Every error names the
//! offending value.

use super::error::{shorten, StorageError};
use super::id::valid_id;
use std::collections::BTreeMap;

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

/// The number of chunks of a new upload of `total_bytes` in chunks of `chunk_size`, after
/// checking the size against `max_upload_size` (0 = unlimited) and both against the limits.
pub(crate) fn check_new_upload(
    total_bytes: u64,
    chunk_size: u64,
    max_upload_size: u64,
) -> Result<u64, StorageError> {
    if total_bytes == 0 {
        return Err(StorageError::InvalidArgument(
            "total_bytes must be greater than 0, got 0".to_string(),
        ));
    }
    if max_upload_size != 0 && total_bytes > max_upload_size {
        return Err(StorageError::TooLarge {
            size: total_bytes,
            max: max_upload_size,
        });
    }
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
    Ok(chunk_count)
}

pub(crate) fn check_chunk_size(what: &str, size: u64) -> Result<(), StorageError> {
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(StorageError::InvalidArgument(format!(
            "{what} {size} is out of range {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        )))
    }
}

/// Sizes and flags a state (manifest file or Redis) may describe: the ones `create` accepts.
pub(crate) fn consistent_counts(
    total_bytes: u64,
    chunk_size: u64,
    chunk_count: u64,
    stored: &str,
) -> bool {
    (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        && total_bytes > 0
        && chunk_count == total_bytes.div_ceil(chunk_size)
        && chunk_count <= MAX_CHUNK_COUNT
        && stored.len() as u64 == chunk_count
        && stored.bytes().all(|b| b == b'0' || b == b'1')
}

pub(crate) fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), StorageError> {
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

pub(crate) fn check_id(id: &str) -> Result<(), StorageError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(StorageError::InvalidId(shorten(id)))
    }
}

/// `sha256:<64 hex>` (hex in any case) to lowercase hex.
pub(crate) fn parse_checksum(checksum: &str) -> Result<String, StorageError> {
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

pub(crate) fn parse_hex_sha256(s: &str, what: &str) -> Result<String, StorageError> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(StorageError::InvalidArgument(format!(
            "{what} {:?} is not 64 hex digits",
            shorten(s)
        )))
    }
}

/// A sha256 as the store writes it: 64 lowercase hex digits.
pub(crate) fn is_lower_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
