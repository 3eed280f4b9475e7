//! Tests of the storage core. Threads use separate `File`s for every operation, so their OFD
//! locks conflict exactly like those of separate processes; one test forks a real process.

use super::*;

use super::error::io_error;
use super::inflight;
use super::manifest::Manifest;
use super::sys::{self, ByteLock};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Cursor;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;

mod chunks;
mod disk_full;
mod expiry;
mod layout;
mod limits;
mod locks;
mod redis;
mod redis_fields;
mod root_hardening;

const MIB: u64 = 1 << 20;

/// A TempDir as a storage root: the root must be closed to group/other.
fn private(tmp: &TempDir) -> &Path {
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
    tmp.path()
}

fn opts(root: &Path) -> StoreOptions {
    StoreOptions {
        root: root.to_path_buf(),
        default_chunk_size: 8 * MIB,
        max_upload_size: 0,
        expire_seconds: 3600,
    }
}

fn store_in(tmp: &TempDir) -> Store {
    let mut s = Store::new(opts(&tmp.path().join("uploads"))).unwrap();
    s.set_fault_enospc_after(None); // independent of the environment of the test run
    s
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn checksum(bytes: &[u8]) -> String {
    format!("sha256:{}", sha_hex(bytes))
}

fn chunk(src: &[u8], chunk_size: u64, index: u64) -> &[u8] {
    let start = (index * chunk_size) as usize;
    let end = (start + chunk_size as usize).min(src.len());
    &src[start..end]
}

fn put(store: &Store, id: &str, index: u64, bytes: &[u8]) -> Result<ChunkOutcome, StorageError> {
    store.write_chunk(id, index, &mut Cursor::new(bytes), None, &mut |_| {})
}

/// A chunk from a source announcing `announced` bytes (a request's Content-Length).
fn put_sized(
    store: &Store,
    id: &str,
    index: u64,
    bytes: &[u8],
    announced: Option<u64>,
) -> Result<ChunkOutcome, StorageError> {
    store.write_chunk_sized(
        id,
        index,
        &mut Cursor::new(bytes),
        announced,
        None,
        &mut |_| {},
    )
}

fn put_checked(
    store: &Store,
    id: &str,
    index: u64,
    bytes: &[u8],
    sum: &str,
) -> Result<ChunkOutcome, StorageError> {
    store.write_chunk(id, index, &mut Cursor::new(bytes), Some(sum), &mut |_| {})
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A reader that fails the test if it is read at all.
struct MustNotRead;
impl Read for MustNotRead {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        panic!("the source of an already stored chunk must not be read");
    }
}

/// Hands out `data` in pieces of `piece` bytes, returning `Interrupted` before every other piece.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    piece: usize,
    interrupt: bool,
}
impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        let n = self.piece.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

fn msg(r: Result<impl std::fmt::Debug, StorageError>) -> (StorageError, String) {
    let e = r.unwrap_err();
    let m = e.to_string();
    (e, m)
}

/// A reader that announces its first read, then waits for permission before yielding the rest.
struct Gated {
    data: Vec<u8>,
    pos: usize,
    started: Option<mpsc::Sender<()>>,
    go: mpsc::Receiver<()>,
}
impl Gated {
    fn new(data: Vec<u8>, started: mpsc::Sender<()>, go: mpsc::Receiver<()>) -> Gated {
        Gated {
            data,
            pos: 0,
            started: Some(started),
            go,
        }
    }
}
impl Read for Gated {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(tx) = self.started.take() {
            tx.send(()).unwrap();
            self.go.recv().unwrap();
        }
        let n = buf.len().min(self.data.len() - self.pos).min(64 * 1024);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// [`data`] where a test names a path `data`.
fn data_bytes(len: usize, seed: u64) -> Vec<u8> {
    data(len, seed)
}
