//! The write path of one chunk: checks, the chunk lock, the reservation of its range, the
//! streaming of the source into the data file (`pwrite`, aligned blocks through
//! `O_DIRECT`), the length and checksum checks, `fdatasync`, then the mark in the state
//! backend. A chunk that fails gives its range back (hole punched).

use super::backend::Mark;
use super::complete::sha256_context;
use super::error::{io_error, StorageError};
use super::inflight::InFlight;
use super::layout;
use super::limits::{check_id, parse_checksum};
use super::locks::LockFile;
use super::manifest::{Manifest, UploadState};
use super::root::{OpenHow, Root};
use super::store::{Store, UploadStatus};
use super::sys;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Size of the blocks read from a chunk source and written with one `pwrite`.
pub const BLOCK_SIZE: usize = 1 << 20;

/// O_DIRECT needs buffers, offsets and lengths aligned to the logical block
/// size; 4 KiB covers every common device.
const DIRECT_ALIGN: u64 = 4096;

/// Result of [`Store::write_chunk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkOutcome {
    /// Status after the write.
    pub status: UploadStatus,
    /// The chunk was already stored (by an earlier or a concurrent call); the source was not read.
    pub already_stored: bool,
    /// Bytes this call wrote to the data file (0 when already stored).
    pub bytes_written: u64,
}

impl Store {
    /// Stores chunk `index` from `source`, which must yield exactly the chunk's length
    /// (`chunk_size`, or what is left for the last chunk). `checksum` is `sha256:<64 hex>`.
    /// `on_progress(n)` is called after every read from the source with `n`, the bytes of this
    /// chunk received so far (at most the chunk's length). Same as
    /// [`Store::write_chunk_sized`] with an unknown source length (nothing is reserved).
    pub fn write_chunk(
        &self,
        id: &str,
        index: u64,
        source: &mut dyn Read,
        checksum: Option<&str>,
        on_progress: &mut dyn FnMut(u64),
    ) -> Result<ChunkOutcome, StorageError> {
        self.write_chunk_sized(id, index, source, None, checksum, on_progress)
    }

    /// [`Store::write_chunk`] with the length the source announces (a request's
    /// Content-Length, a file's size). Only when it is exactly the chunk's length is the
    /// chunk's range reserved (`fallocate`) before the body is read, so a client announcing
    /// (or sending) less never makes the server reserve more than it received; and a chunk
    /// that fails gives its range back (hole punched), whatever it had reserved or written.
    ///
    /// A chunk already stored returns at once with `already_stored = true` without reading
    /// `source`; so does a writer that waited for a concurrent writer of the same chunk. That
    /// wait is bounded ([`super::CHUNK_LOCK_WAIT`]): then `ChunkBusy`. A chunk sent to a complete
    /// or aborted upload is `Conflict`, its source unread. Any error leaves the chunk missing: it can be resent.
    pub fn write_chunk_sized(
        &self,
        id: &str,
        index: u64,
        source: &mut dyn Read,
        source_len: Option<u64>,
        checksum: Option<&str>,
        on_progress: &mut dyn FnMut(u64),
    ) -> Result<ChunkOutcome, StorageError> {
        check_id(id)?;
        let expected_sha = checksum.map(parse_checksum).transpose()?;
        let root = self.open_root()?;
        let m = self.load_writable(&root, id, index)?;
        if index >= m.chunk_count {
            return Err(StorageError::InvalidChunk(format!(
                "chunk index {index} is out of range 0..{} for upload {id}",
                m.chunk_count
            )));
        }
        if m.is_stored(index) {
            return Ok(self.already_stored(&m));
        }
        let dir = layout::upload_dir(&root, id)?;
        let lock = LockFile::open(&dir, id, self.waits)?;
        // Registered before the lock is taken: a bailout from here on is cleaned up.
        let inflight = InFlight::new();
        inflight.hold_fd(root.fd().as_raw_fd());
        inflight.hold_fd(dir.fd().as_raw_fd());
        inflight.hold(lock.file());
        let _chunk_lock = lock.chunk(index)?;
        let m = self.load_writable(&root, id, index)?;
        if m.is_stored(index) {
            return Ok(self.already_stored(&m));
        }
        let len = m.chunk_len(index);
        let offset = index * m.chunk_size;

        let data_name = layout::data_name(&dir);
        let (file, data_path) = layout::open_data(&dir, id, data_name)?;
        inflight.hold(&file);
        inflight.punch_on_abandon(&file, offset, len);
        let what = format!("writing chunk {index} of upload {id} to");
        // Aligned blocks bypass the page cache: one memory copy less per byte
        // and no writer queueing on the page cache of the shared data file.
        // Filesystems without O_DIRECT (tmpfs) refuse the open: buffered only.
        let direct = (offset.is_multiple_of(DIRECT_ALIGN) && self.fault_enospc_after.is_none())
            .then(|| {
                dir.open_file_flags(data_name, OpenHow::Write, libc::O_DIRECT)
                    .ok()
            })
            .flatten();
        if let Some(d) = &direct {
            inflight.hold(d);
        }
        let stored = (|| {
            // Reserve only what the source announces to send in full: a short or lying
            // Content-Length must not reserve a whole (up to 2 GiB) chunk.
            if self.fault_enospc_after.is_none() && source_len == Some(len) {
                sys::reserve(&file, offset, len).map_err(|e| io_error(&what, &data_path, &e))?;
            }
            let streamed = stream_chunk(
                Target {
                    buffered: &file,
                    direct: direct.as_ref(),
                },
                offset,
                len,
                source,
                expected_sha.is_some(),
                on_progress,
                self.fault_enospc_after,
            )
            .map_err(|e| match e {
                StreamError::Source(e) => StorageError::Io(format!(
                    "reading the body of chunk {index} of upload {id} failed: {e}"
                )),
                StreamError::Write(e) => io_error(&what, &data_path, &e),
            })?;
            if streamed.received != len {
                let got = if streamed.received > len {
                    format!("more than {len}")
                } else {
                    streamed.received.to_string()
                };
                return Err(StorageError::InvalidChunk(format!(
                    "chunk {index} of upload {id} has {got} bytes, expected {len}"
                )));
            }
            if let (Some(expected), Some(actual)) = (&expected_sha, &streamed.sha256) {
                if expected != actual {
                    return Err(StorageError::ChecksumMismatch {
                        index,
                        expected: expected.clone(),
                        actual: actual.clone(),
                    });
                }
            }
            file.sync_data()
                .map_err(|e| io_error(&what, &data_path, &e))?;
            Ok(streamed)
        })();
        let streamed = match stored {
            Ok(s) => s,
            Err(e) => {
                // Give back what this attempt reserved or wrote: the chunk stays missing.
                let _ = sys::release(&file, offset, len);
                return Err(e);
            }
        };
        inflight.keep_data();
        if let Some(d) = direct {
            inflight.forget(&d);
        }
        inflight.forget(&file);
        drop(file);

        let now = self.now();
        let mark = Mark {
            index,
            sha256: streamed.sha256,
            now,
            expires_at: self.expiry_from(now),
        };
        let m = self
            .backend
            .mark(&dir, &lock, mark)?
            .ok_or_else(|| StorageError::NotFound(id.to_string()))?;
        Ok(ChunkOutcome {
            status: self.status_of(&m),
            already_stored: false,
            bytes_written: len,
        })
    }

    /// The manifest of an upload that takes chunks: `NotFound` when missing or expired,
    /// `Conflict` when complete or aborted (a chunk there is refused, never stored or
    /// reported as stored, whatever its length or checksum).
    fn load_writable(&self, root: &Root, id: &str, index: u64) -> Result<Manifest, StorageError> {
        match self.backend.load(root, id)? {
            Some(m) if m.is_expired(self.now()) => Err(StorageError::NotFound(id.to_string())),
            Some(m) if m.state == UploadState::Complete => Err(StorageError::Conflict(format!(
                "upload {id} is complete: chunk {index} was not accepted (a complete upload \
                 takes no more chunks)"
            ))),
            Some(m) if m.state == UploadState::Aborted => Err(StorageError::Conflict(format!(
                "upload {id} was aborted: chunk {index} was not accepted"
            ))),
            Some(m) => Ok(m),
            None => Err(StorageError::NotFound(id.to_string())),
        }
    }

    fn already_stored(&self, m: &Manifest) -> ChunkOutcome {
        ChunkOutcome {
            status: self.status_of(m),
            already_stored: true,
            bytes_written: 0,
        }
    }
}

struct Streamed {
    received: u64,
    sha256: Option<String>,
}

enum StreamError {
    Source(io::Error),
    Write(io::Error),
}

/// Where a chunk's bytes go: the data file, and the same file opened with
/// O_DIRECT for aligned blocks when the filesystem supports it.
struct Target<'a> {
    buffered: &'a File,
    direct: Option<&'a File>,
}

/// Copies at most `len + 1` bytes from `source` into `file` at `offset`, never writing past
/// `offset + len`. Returns how many bytes the source had (`len + 1` meaning "too many").
fn stream_chunk(
    target: Target<'_>,
    offset: u64,
    len: u64,
    source: &mut dyn Read,
    hash: bool,
    on_progress: &mut dyn FnMut(u64),
    fault_enospc_after: Option<u64>,
) -> Result<Streamed, StreamError> {
    let limit = len + 1;
    let block = usize::try_from(limit).map_or(BLOCK_SIZE, |l| l.min(BLOCK_SIZE));
    // Over-allocate to carve out a block that starts on a DIRECT_ALIGN boundary.
    let align = DIRECT_ALIGN as usize;
    let mut storage = vec![0u8; block + align];
    let start = storage.as_ptr().align_offset(align).min(align);
    let buf = &mut storage[start..start + block];
    let mut direct = target.direct;
    let mut hasher = hash.then(sha256_context);
    let mut received = 0u64;
    let mut written = 0u64;
    loop {
        // Fill the block (the source may return less than asked for).
        let mut filled = 0usize;
        let mut eof = false;
        while filled < buf.len() && received < limit {
            let room = buf.len() - filled;
            let want = usize::try_from(limit - received).map_or(room, |r| r.min(room));
            match source.read(&mut buf[filled..filled + want]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    filled += n;
                    received += n as u64;
                    on_progress(received.min(len));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StreamError::Source(e)),
            }
        }
        let writable = usize::try_from(len - written).map_or(filled, |r| r.min(filled));
        if writable > 0 {
            let bytes = &buf[..writable];
            if let Some(h) = hasher.as_mut() {
                h.update(bytes);
            }
            let at = offset + written;
            let mut done = false;
            if let Some(d) = direct {
                if bytes.len().is_multiple_of(align) && at.is_multiple_of(DIRECT_ALIGN) {
                    match d.write_all_at(bytes, at) {
                        Ok(()) => done = true,
                        // Not supported after all (odd device block size): buffered from now on.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => direct = None,
                        Err(e) => return Err(StreamError::Write(e)),
                    }
                }
            }
            if !done {
                write_block(target.buffered, bytes, at, written, fault_enospc_after)
                    .map_err(StreamError::Write)?;
            }
            written += writable as u64;
        }
        if eof || received >= limit {
            break;
        }
    }
    Ok(Streamed {
        received,
        sha256: hasher.map(|h| hex::encode(h.finish())),
    })
}

fn write_block(
    file: &File,
    bytes: &[u8],
    at: u64,
    written_before: u64,
    fault_enospc_after: Option<u64>,
) -> io::Result<()> {
    if let Some(limit) = fault_enospc_after {
        if written_before + bytes.len() as u64 > limit {
            let allowed = usize::try_from(limit.saturating_sub(written_before))
                .map_or(bytes.len(), |a| a.min(bytes.len()));
            file.write_all_at(&bytes[..allowed], at)?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
    }
    file.write_all_at(bytes, at)
}
