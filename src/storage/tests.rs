//! Tests of the storage core. Threads use separate `File`s for every operation, so their OFD
//! locks conflict exactly like those of separate processes; one test forks a real process.

use super::*;
use sha2::{Digest, Sha256};
use std::io::Cursor;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Instant;
use tempfile::TempDir;

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

// ---------------------------------------------------------------- layout and round trip

#[test]
fn layout_round_trip_and_idempotent_complete() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let src = data((2 * MIB + 12345) as usize, 1);
    let mut meta = BTreeMap::new();
    meta.insert("name".to_string(), "film.mkv".to_string());
    let st = store
        .create(
            src.len() as u64,
            Some(MIB),
            meta.clone(),
            Some(sha_hex(&src).to_uppercase()),
        )
        .unwrap();
    assert!(valid_id(&st.id));
    assert_eq!(st.state, UploadState::Uploading);
    assert_eq!(st.chunk_count, 3);
    assert_eq!(st.chunk_size, MIB);
    assert_eq!(st.missing, vec![0, 1, 2]);
    assert_eq!(st.metadata, meta);
    assert_eq!(
        st.sha256.as_deref(),
        Some(sha_hex(&src).as_str()),
        "stored lowercase"
    );
    assert_eq!(st.expires_at, st.created_at + 3600);

    let dir = store.root().join(&st.id);
    assert!(store.root().is_absolute());
    assert_eq!(dir_names(&dir), ["data.part", "lock", "manifest.json"]);
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(store.root()), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("data.part")), 0o600);
    // Sparse: the full size, nothing allocated yet.
    let md = fs::metadata(dir.join("data.part")).unwrap();
    assert_eq!(md.len(), src.len() as u64);
    assert_eq!(md.blocks(), 0);

    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["state"], "uploading");
    assert!(
        json.get("path").is_none(),
        "path omitted until complete: {json}"
    );
    for key in [
        "id",
        "state",
        "total_bytes",
        "chunk_size",
        "chunk_count",
        "chunks_done",
        "bytes_done",
        "missing",
        "metadata",
        "created_at",
        "expires_at",
        "sha256",
    ] {
        assert!(json.get(key).is_some(), "{key} missing in {json}");
    }

    let out = put(&store, &st.id, 2, chunk(&src, MIB, 2)).unwrap();
    assert!(!out.already_stored);
    assert_eq!(out.bytes_written, 12345);
    assert_eq!(out.status.bytes_done, 12345);
    assert_eq!(out.status.missing, vec![0, 1]);
    let out = put(&store, &st.id, 0, chunk(&src, MIB, 0)).unwrap();
    assert_eq!(out.status.bytes_done, MIB + 12345);
    assert_eq!(out.status.chunks_done, 2);
    put(&store, &st.id, 1, chunk(&src, MIB, 1)).unwrap();
    assert_eq!(store.open(&st.id).unwrap().missing, Vec::<u64>::new());
    assert_eq!(store.status(&st.id).unwrap().bytes_done, src.len() as u64);

    let done = store.complete(&st.id).unwrap();
    assert_eq!(done.state, UploadState::Complete);
    let path = PathBuf::from(done.path.clone().unwrap());
    assert!(path.is_absolute());
    assert_eq!(path, dir.join("data"));
    assert_eq!(fs::read(&path).unwrap(), src);
    assert_eq!(dir_names(&dir), ["data", "lock", "manifest.json"]);
    assert_eq!(serde_json::to_value(&done).unwrap()["state"], "complete");
    assert_eq!(
        serde_json::to_value(&done).unwrap()["path"],
        path.to_str().unwrap()
    );

    // Idempotent completion; a chunk of a complete upload is a conflict, its body unread.
    assert_eq!(store.complete(&st.id).unwrap().path, done.path);
    let (e, m) = msg(store.write_chunk(&st.id, 1, &mut MustNotRead, None, &mut |_| {}));
    assert!(matches!(e, StorageError::Conflict(_)), "{e:?}");
    assert!(m.contains("is complete") && m.contains(&st.id), "{m}");

    // The manifest records what the brief asks for.
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["stored"], "111");
    assert_eq!(m["total_bytes"], src.len() as u64);
    assert_eq!(m["path"], path.to_str().unwrap());
    assert!(m["touched_at"].as_u64().unwrap() >= m["created_at"].as_u64().unwrap());
}

#[test]
fn default_chunk_size_applies_and_free_space_is_known() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let st = store.create(20 * MIB, None, BTreeMap::new(), None).unwrap();
    assert_eq!(st.chunk_size, 8 * MIB);
    assert_eq!(st.chunk_count, 3);
    assert!(st.sha256.is_none());
    assert!(serde_json::to_value(&st).unwrap().get("sha256").is_none());
    assert!(store.free_space().unwrap() > 0);
}

// ---------------------------------------------------------------- bytes written per byte

/// `write_bytes` of this thread (`/proc/thread-self/io`): bytes this thread caused to be sent
/// to storage, counted when page-cache pages are dirtied (per thread, so the other tests that
/// run in parallel do not disturb it). `None` without task I/O accounting.
fn thread_write_bytes() -> Option<u64> {
    let io = fs::read_to_string("/proc/thread-self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

/// Proves "1 byte written per uploaded byte" two ways:
/// - `/proc/thread-self/io` `write_bytes` over the whole upload (create, every chunk,
///   complete) is the size rounded up to pages, plus a few pages per manifest rewrite, nothing
///   else (no per-chunk files, no merge pass, no copy at completion): under 1.01 bytes per byte;
/// - the data file's allocated bytes (`st_blocks * 512`) are the size rounded up to the
///   filesystem block, plus at most a few blocks of the filesystem's extent tree (ext4 needs
///   one once the file has more than 4 extents, e.g. when parallel tests interleave
///   allocations).
///
/// The sum of `bytes_written` of the outcomes is the size exactly.
#[test]
fn bytes_written_per_uploaded_byte_is_one() {
    const PAGE: u64 = 4096;
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let size = 10 * MIB + 4321;
    let src = data(size as usize, 2);
    let before = thread_write_bytes();
    let st = store
        .create(size, Some(MIB), BTreeMap::new(), None)
        .unwrap();
    let mut sum = 0;
    for i in 0..st.chunk_count {
        sum += put(&store, &st.id, i, chunk(&src, MIB, i))
            .unwrap()
            .bytes_written;
    }
    assert_eq!(sum, size);
    let done = store.complete(&st.id).unwrap();
    let after = thread_write_bytes();
    let manifest_writes = 1 + st.chunk_count + 1; // create, each chunk, complete
    if let (Some(before), Some(after)) = (before, after) {
        let data_pages = size.div_ceil(PAGE) * PAGE;
        let written = after - before;
        eprintln!("write_bytes {written} for {size} bytes ({data_pages} in pages)");
        // Each manifest rewrite dirties its own page and, at most, a directory block and an
        // inode-table block of the filesystem (metadata pages dirtied by this thread count too).
        assert!(
            written >= data_pages && written <= data_pages + 3 * manifest_writes * PAGE,
            "write_bytes {written}, data pages {data_pages}, {manifest_writes} manifest writes"
        );
        assert!((written as f64) / (size as f64) < 1.01);
    }
    let dir = store.root().join(&st.id);
    assert_eq!(dir_names(&dir), ["data", "lock", "manifest.json"]);
    let md = fs::metadata(done.path.unwrap()).unwrap();
    let block = md.blksize();
    let rounded = size.div_ceil(block) * block;
    let allocated = md.blocks() * 512;
    eprintln!("allocated {allocated} for {size} bytes ({rounded} in blocks)");
    assert!(
        allocated >= rounded && allocated <= rounded + 4 * block,
        "allocated bytes of the data file {allocated}, size in blocks {rounded}"
    );
    let others: u64 = ["lock", "manifest.json"]
        .iter()
        .map(|n| fs::metadata(dir.join(n)).unwrap().len())
        .sum();
    assert!(others < 4096, "lock + manifest are small: {others}");
}

// ---------------------------------------------------------------- validation messages

fn msg(r: Result<impl std::fmt::Debug, StorageError>) -> (StorageError, String) {
    let e = r.unwrap_err();
    let m = e.to_string();
    (e, m)
}

#[test]
fn create_validation_names_the_value() {
    let tmp = TempDir::new().unwrap();
    let store = Store::new(StoreOptions {
        max_upload_size: 1000,
        ..opts(private(&tmp))
    })
    .unwrap();
    let none = BTreeMap::new;

    let (e, m) = msg(store.create(0, None, none(), None));
    assert!(matches!(e, StorageError::InvalidArgument(_)));
    assert!(m.contains("got 0"), "{m}");

    let (e, m) = msg(store.create(1001, Some(10), none(), None));
    assert_eq!(
        e,
        StorageError::TooLarge {
            size: 1001,
            max: 1000
        }
    );
    assert!(m.contains("1001") && m.contains("1000"), "{m}");

    let (e, m) = msg(store.create(100, Some(0), none(), None));
    assert!(matches!(e, StorageError::InvalidArgument(_)));
    assert!(m.contains("chunk_size 0 "), "{m}");
    let (_, m) = msg(store.create(100, Some(MAX_CHUNK_SIZE + 1), none(), None));
    assert!(m.contains("chunk_size 2147483649 "), "{m}");
    assert!(store
        .create(100, Some(MAX_CHUNK_SIZE), none(), None)
        .is_ok());
    assert!(store.create(100, Some(1), none(), None).is_ok());

    let big = Store::new(opts(&tmp.path().join("big"))).unwrap();
    let (e, m) = msg(big.create(1 << 40, Some(1 << 20), none(), None));
    assert!(matches!(e, StorageError::InvalidArgument(_)));
    assert!(
        m.contains("1048576 chunks") && m.contains("10995117 bytes"),
        "{m}"
    );

    let (e, m) = msg(store.create(10, None, none(), Some("abc".into())));
    assert!(matches!(e, StorageError::InvalidArgument(_)));
    assert!(m.contains("sha256 \"abc\""), "{m}");
    let (_, m) = msg(store.create(10, None, none(), Some("g".repeat(64))));
    assert!(m.contains(&"g".repeat(64)), "{m}");

    let mut many = BTreeMap::new();
    for i in 0..65 {
        many.insert(format!("k{i}"), "v".to_string());
    }
    let (_, m) = msg(store.create(10, None, many, None));
    assert!(m.contains("65 keys"), "{m}");
    let mut long_key = BTreeMap::new();
    long_key.insert("k".repeat(129), "v".to_string());
    let (_, m) = msg(store.create(10, None, long_key, None));
    assert!(m.contains("129 bytes") && m.contains("kkkk"), "{m}");
    let mut long_value = BTreeMap::new();
    long_value.insert("name".to_string(), "v".repeat(4097));
    let (_, m) = msg(store.create(10, None, long_value, None));
    assert!(m.contains("\"name\"") && m.contains("4097 bytes"), "{m}");
    let mut empty = BTreeMap::new();
    empty.insert(String::new(), "v".to_string());
    let (_, m) = msg(store.create(10, None, empty, None));
    assert!(m.contains("key \"\""), "{m}");

    let (e, m) = msg(Store::new(StoreOptions {
        default_chunk_size: 0,
        ..opts(private(&tmp))
    }));
    assert!(matches!(e, StorageError::InvalidArgument(_)));
    assert!(m.contains("chunk_size 0"), "{m}");
}

#[test]
fn invalid_ids_never_touch_the_filesystem() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    // A directory that a path-traversing id would hit.
    let victim = tmp.path().join("etc");
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("lock"), b"").unwrap();
    fs::write(victim.join("manifest.json"), b"{}").unwrap();
    let before = dir_names(store.root());
    for bad in [
        "../etc",
        "",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789abcdefghijklmno/",
    ] {
        let check = |e: StorageError| {
            assert_eq!(e, StorageError::InvalidId(bad.to_string()));
            assert_eq!(
                e.to_string(),
                format!("upload id {bad:?} is not 26 characters of [0-9a-z]")
            );
        };
        check(store.open(bad).unwrap_err());
        check(store.status(bad).unwrap_err());
        check(store.complete(bad).unwrap_err());
        check(store.abort(bad).unwrap_err());
        check(
            store
                .write_chunk(bad, 0, &mut MustNotRead, None, &mut |_| {})
                .unwrap_err(),
        );
    }
    assert_eq!(
        store.open("../etc").unwrap_err().to_string(),
        "upload id \"../etc\" is not 26 characters of [0-9a-z]"
    );
    let long = "x".repeat(10_000);
    let m = store.status(&long).unwrap_err().to_string();
    assert!(m.len() < 250 && m.contains("10000 bytes"), "{m}");
    assert_eq!(dir_names(store.root()), before);
    assert_eq!(dir_names(&victim), ["lock", "manifest.json"]);

    let unknown = "0123456789abcdefghijklmnop";
    let (e, m) = msg(store.open(unknown));
    assert_eq!(e, StorageError::NotFound(unknown.to_string()));
    assert!(m.contains(unknown), "{m}");
    assert!(matches!(
        store.complete(unknown),
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        store.abort(unknown),
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        store.write_chunk(unknown, 0, &mut MustNotRead, None, &mut |_| {}),
        Err(StorageError::NotFound(_))
    ));
}

#[test]
fn chunk_validation_names_the_value_and_marks_nothing() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let src = data(10_000, 3);
    let st = store
        .create(10_000, Some(1000), BTreeMap::new(), None)
        .unwrap();
    let id = st.id.as_str();

    let (e, m) = msg(put(&store, id, 10, &src[..1000]));
    assert!(matches!(e, StorageError::InvalidChunk(_)));
    assert_eq!(
        m,
        format!("chunk index 10 is out of range 0..10 for upload {id}")
    );
    let (_, m) = msg(put(&store, id, u64::MAX, &src[..1000]));
    assert!(m.contains(&u64::MAX.to_string()), "{m}");

    // Short and long chunks.
    let (e, m) = msg(put(&store, id, 3, &src[..999]));
    assert!(matches!(e, StorageError::InvalidChunk(_)));
    assert_eq!(
        m,
        format!("chunk 3 of upload {id} has 999 bytes, expected 1000")
    );
    let (_, m) = msg(put(&store, id, 3, &src[..2000]));
    assert_eq!(
        m,
        format!("chunk 3 of upload {id} has more than 1000 bytes, expected 1000")
    );
    let (_, m) = msg(put(&store, id, 4, &[]));
    assert!(m.contains("has 0 bytes"), "{m}");

    // Bad checksum syntax: refused before anything is read.
    for bad in [
        "md5:0123",
        "sha256:abc",
        "sha256",
        &"a".repeat(64),
        &format!("sha1:{}", "a".repeat(64)),
    ] {
        let (e, m) = msg(store.write_chunk(id, 3, &mut MustNotRead, Some(bad), &mut |_| {}));
        assert!(matches!(e, StorageError::InvalidArgument(_)), "{bad}");
        assert!(m.contains(&format!("{bad:?}")), "{m}");
    }
    // Checksums are case-insensitive.
    let upper = format!("SHA256:{}", sha_hex(&src[3000..4000]).to_uppercase());
    assert!(
        !put_checked(&store, id, 3, &src[3000..4000], &upper)
            .unwrap()
            .already_stored
    );

    // Wrong checksum.
    let good = checksum(&src[4000..5000]);
    let mut bad = src[4000..5000].to_vec();
    bad[17] ^= 1;
    let (e, m) = msg(put_checked(&store, id, 4, &bad, &good));
    assert_eq!(
        e,
        StorageError::ChecksumMismatch {
            index: 4,
            expected: sha_hex(&src[4000..5000]),
            actual: sha_hex(&bad),
        }
    );
    assert!(m.contains("chunk 4") && m.contains(&sha_hex(&bad)), "{m}");

    let status = store.status(id).unwrap();
    assert_eq!(status.missing, vec![0, 1, 2, 4, 5, 6, 7, 8, 9]);
    assert_eq!(status.chunks_done, 1);
    assert_eq!(status.bytes_done, 1000);

    // Missing chunks at completion: up to 20 listed.
    let (e, m) = msg(store.complete(id));
    assert!(matches!(e, StorageError::InvalidChunk(_)));
    assert_eq!(
        m,
        format!("upload {id} is missing 9 of 10 chunks: 0, 1, 2, 4, 5, 6, 7, 8, 9")
    );
    let many = store.create(100, Some(1), BTreeMap::new(), None).unwrap();
    let (_, m) = msg(store.complete(&many.id));
    assert!(
        m.contains("missing 100 of 100 chunks: 0, 1,") && m.ends_with("19, ..."),
        "{m}"
    );

    // Last chunk is shorter.
    let odd = store
        .create(2500, Some(1000), BTreeMap::new(), None)
        .unwrap();
    let (_, m) = msg(put(&store, &odd.id, 2, &src[..1000]));
    assert!(m.contains("expected 500"), "{m}");
    assert_eq!(
        put(&store, &odd.id, 2, &src[..500]).unwrap().bytes_written,
        500
    );
}

#[test]
fn whole_file_checksum_is_checked_at_completion() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let src = data(3000, 4);
    let wrong = sha_hex(b"something else");
    let st = store
        .create(3000, Some(1000), BTreeMap::new(), Some(wrong.clone()))
        .unwrap();
    for i in 0..3 {
        put(&store, &st.id, i, chunk(&src, 1000, i)).unwrap();
    }
    let (e, m) = msg(store.complete(&st.id));
    assert_eq!(
        e,
        StorageError::ChecksumMismatch {
            index: WHOLE_FILE,
            expected: wrong.clone(),
            actual: sha_hex(&src)
        }
    );
    assert!(m.contains(&wrong) && m.contains(&sha_hex(&src)), "{m}");
    let status = store.status(&st.id).unwrap();
    assert_eq!(status.state, UploadState::Uploading);
    assert!(status.path.is_none());
    store.abort(&st.id).unwrap();
}

// ---------------------------------------------------------------- streaming

#[test]
fn streams_small_reads_retries_interrupted_and_reports_progress() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let len = 3 * MIB + 17;
    let src = data(len as usize, 5);
    let st = store.create(len, Some(len), BTreeMap::new(), None).unwrap();
    let mut reader = Trickle {
        data: src.clone(),
        pos: 0,
        piece: 100_000,
        interrupt: false,
    };
    let mut seen = Vec::new();
    let out = store
        .write_chunk(&st.id, 0, &mut reader, Some(&checksum(&src)), &mut |n| {
            seen.push(n)
        })
        .unwrap();
    assert_eq!(out.bytes_written, len);
    assert!(
        seen.len() >= len.div_ceil(100_000) as usize,
        "one call per read"
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(*seen.last().unwrap(), len);
    store.complete(&st.id).unwrap();
    assert_eq!(
        fs::read(store.root().join(&st.id).join("data")).unwrap(),
        src
    );

    // A failing source is an Io error naming the chunk; nothing marked.
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "client went away",
            ))
        }
    }
    let st = store.create(10, None, BTreeMap::new(), None).unwrap();
    let (e, m) = msg(store.write_chunk(&st.id, 0, &mut Broken, None, &mut |_| {}));
    assert!(matches!(e, StorageError::Io(_)));
    assert!(
        m.contains("chunk 0") && m.contains("client went away"),
        "{m}"
    );
    assert_eq!(store.status(&st.id).unwrap().missing, vec![0]);
}

#[test]
fn stored_chunk_returns_at_once_without_reading() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let src = data(2000, 6);
    let st = store
        .create(2000, Some(1000), BTreeMap::new(), None)
        .unwrap();
    put(&store, &st.id, 0, &src[..1000]).unwrap();
    let mut calls = 0;
    let out = store
        .write_chunk(&st.id, 0, &mut MustNotRead, Some("sha256:bad"), &mut |_| {})
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(out, StorageError::InvalidArgument(_)),
        "syntax is checked first"
    );
    let out = store
        .write_chunk(&st.id, 0, &mut MustNotRead, None, &mut |_| calls += 1)
        .unwrap();
    assert!(out.already_stored);
    assert_eq!(out.bytes_written, 0);
    assert_eq!(calls, 0);
    assert_eq!(out.status.missing, vec![1]);
}

// ---------------------------------------------------------------- concurrency

#[test]
fn parallel_chunks_of_one_upload_lose_no_marks() {
    let tmp = TempDir::new().unwrap();
    let store = Arc::new(store_in(&tmp));
    let cs = 256 * 1024;
    let count = 48u64;
    let src = Arc::new(data((cs * count - 99) as usize, 7));
    let st = store
        .create(
            src.len() as u64,
            Some(cs),
            BTreeMap::new(),
            Some(sha_hex(&src)),
        )
        .unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (store, src, id) = (store.clone(), src.clone(), st.id.clone());
            thread::spawn(move || {
                for i in (t..count).step_by(8) {
                    let c = chunk(&src, cs, i);
                    let out = put_checked(&store, &id, i, c, &checksum(c)).unwrap();
                    assert!(!out.already_stored);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let status = store.status(&st.id).unwrap();
    assert_eq!(status.missing, Vec::<u64>::new(), "every mark survived");
    assert_eq!(status.chunks_done, count);
    assert_eq!(status.bytes_done, src.len() as u64);
    let done = store.complete(&st.id).unwrap();
    assert_eq!(fs::read(done.path.unwrap()).unwrap(), *src);
}

/// A reader that announces its first read, then waits for permission before yielding the rest.
struct Gated {
    data: Vec<u8>,
    pos: usize,
    started: Option<mpsc::Sender<()>>,
    go: mpsc::Receiver<()>,
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

#[test]
fn same_chunk_twice_at_once_second_waits_and_sees_it_stored() {
    let tmp = TempDir::new().unwrap();
    let store = Arc::new(store_in(&tmp));
    let src = data(MIB as usize, 8);
    let st = store
        .create(2 * MIB, Some(MIB), BTreeMap::new(), None)
        .unwrap();
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    let first = {
        let (store, id, src) = (store.clone(), st.id.clone(), src.clone());
        thread::spawn(move || {
            let mut r = Gated {
                data: src,
                pos: 0,
                started: Some(started_tx),
                go: go_rx,
            };
            store
                .write_chunk(&id, 1, &mut r, None, &mut |_| {})
                .unwrap()
        })
    };
    started_rx.recv().unwrap(); // the first writer holds the chunk lock and is reading
    let second_done = Arc::new(AtomicBool::new(false));
    let second = {
        let (store, id, done) = (store.clone(), st.id.clone(), second_done.clone());
        thread::spawn(move || {
            let out = store
                .write_chunk(&id, 1, &mut MustNotRead, None, &mut |_| {})
                .unwrap();
            done.store(true, Ordering::SeqCst);
            out
        })
    };
    thread::sleep(Duration::from_millis(300));
    assert!(
        !second_done.load(Ordering::SeqCst),
        "the second writer waits for the first"
    );
    // Another chunk is not blocked by it.
    assert!(!put(&store, &st.id, 0, &src).unwrap().already_stored);
    go_tx.send(()).unwrap();
    let a = first.join().unwrap();
    let b = second.join().unwrap();
    assert!(!a.already_stored);
    assert_eq!(a.bytes_written, MIB);
    assert!(b.already_stored, "the second writer did not rewrite it");
    assert_eq!(b.bytes_written, 0);
    assert_eq!(b.status.missing, Vec::<u64>::new());
}

#[test]
fn concurrent_complete_calls_agree() {
    let tmp = TempDir::new().unwrap();
    let store = Arc::new(store_in(&tmp));
    let src = data(4 * MIB as usize, 9);
    let st = store
        .create(4 * MIB, Some(MIB), BTreeMap::new(), Some(sha_hex(&src)))
        .unwrap();
    for i in 0..4 {
        put(&store, &st.id, i, chunk(&src, MIB, i)).unwrap();
    }
    let results: Vec<UploadStatus> = (0..4)
        .map(|_| {
            let (store, id) = (store.clone(), st.id.clone());
            thread::spawn(move || store.complete(&id).unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for r in &results {
        assert_eq!(r.state, UploadState::Complete);
        assert_eq!(r.path, results[0].path);
    }
    assert_eq!(fs::read(results[0].path.as_ref().unwrap()).unwrap(), src);
}

/// A reader for the forked child: yields `limit` bytes quickly, tells the parent through a
/// pipe, then never returns (a client that stalls mid-chunk) until the parent kills it.
struct StallingReader {
    data: Vec<u8>,
    pos: usize,
    limit: usize,
    notify_fd: libc::c_int,
}
impl Read for StallingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.limit {
            // SAFETY: writing one byte from a valid buffer to an open pipe.
            unsafe { libc::write(self.notify_fd, b"x".as_ptr().cast(), 1) };
            loop {
                // SAFETY: plain sleep.
                unsafe { libc::sleep(1000) };
            }
        }
        let n = buf.len().min(self.limit - self.pos).min(64 * 1024);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn writer_process_killed_mid_chunk_leaves_it_missing_and_resend_works() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let cs = 4 * MIB;
    let src = data((2 * cs) as usize, 10);
    let st = store
        .create(2 * cs, Some(cs), BTreeMap::new(), Some(sha_hex(&src)))
        .unwrap();
    let id = st.id.clone();
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let child_data = chunk(&src, cs, 1).to_vec();
    // SAFETY: the child only runs the store code (malloc is fork-safe in glibc) and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: closing our copy of the read end.
        unsafe { libc::close(fds[0]) };
        let mut r = StallingReader {
            data: child_data,
            pos: 0,
            limit: (MIB + MIB / 2) as usize, // one full 1 MiB block reaches the file
            notify_fd: fds[1],
        };
        let _ = store.write_chunk(&id, 1, &mut r, None, &mut |_| {});
        // SAFETY: leave without running the parent's destructors or test harness.
        unsafe { libc::_exit(1) };
    }
    // SAFETY: closing the parent's copy of the write end, then waiting for the child's byte.
    unsafe { libc::close(fds[1]) };
    let mut byte = 0u8;
    // SAFETY: reading one byte into a valid buffer.
    let n = unsafe { libc::read(fds[0], (&mut byte as *mut u8).cast(), 1) };
    assert_eq!(n, 1, "the child started writing chunk 1");
    // SAFETY: closing our read end.
    unsafe { libc::close(fds[0]) };

    let dir = store.root().join(&id);
    let probe = File::options()
        .read(true)
        .write(true)
        .open(dir.join("lock"))
        .unwrap();
    assert!(
        sys::is_locked_by_other(&probe, 2).unwrap(),
        "child holds chunk 1's lock"
    );
    assert!(!sys::is_locked_by_other(&probe, 1).unwrap());
    let part = fs::read(dir.join("data.part")).unwrap();
    assert_eq!(
        &part[cs as usize..(cs + MIB) as usize],
        &src[cs as usize..(cs + MIB) as usize]
    );

    // SAFETY: killing and reaping our own child.
    unsafe {
        assert_eq!(libc::kill(pid, libc::SIGKILL), 0);
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFSIGNALED(status));
    }
    assert!(
        !sys::is_locked_by_other(&probe, 2).unwrap(),
        "the kernel dropped the lock"
    );
    let status = store.status(&id).unwrap();
    assert_eq!(status.missing, vec![0, 1]);
    assert_eq!(status.bytes_done, 0);

    put(&store, &id, 0, chunk(&src, cs, 0)).unwrap();
    let out = put(&store, &id, 1, chunk(&src, cs, 1)).unwrap();
    assert!(!out.already_stored);
    let done = store.complete(&id).unwrap();
    assert_eq!(fs::read(done.path.unwrap()).unwrap(), src);
}

// ---------------------------------------------------------------- big shuffled upload

#[test]
fn shuffled_64mib_upload_with_a_corrupted_chunk_resent() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let size = 64 * MIB + 777;
    let src = data(size as usize, 11);
    let whole = sha_hex(&src);
    let st = store
        .create(size, Some(MIB), BTreeMap::new(), Some(whole.clone()))
        .unwrap();
    assert_eq!(st.chunk_count, 65);
    // Fisher-Yates with a fixed xorshift seed.
    let mut order: Vec<u64> = (0..st.chunk_count).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let first = order[0];
    let good = chunk(&src, MIB, first);
    let mut corrupted = good.to_vec();
    corrupted[good.len() / 2] ^= 0x40;
    let e = put_checked(&store, &st.id, first, &corrupted, &checksum(good)).unwrap_err();
    assert!(
        matches!(e, StorageError::ChecksumMismatch { index, .. } if index == first),
        "{e}"
    );
    assert!(store.status(&st.id).unwrap().missing.contains(&first));

    for &i in &order {
        let c = chunk(&src, MIB, i);
        let out = put_checked(&store, &st.id, i, c, &checksum(c)).unwrap();
        assert!(!out.already_stored);
    }
    let done = store.complete(&st.id).unwrap();
    let path = done.path.unwrap();
    let mut f = File::open(&path).unwrap();
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).unwrap();
    assert_eq!(hex::encode(h.finalize()), whole);
    assert_eq!(fs::metadata(&path).unwrap().len(), size);
    // Per-chunk hashes are recorded in the manifest.
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(store.root().join(&st.id).join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["chunk_sha256"][first.to_string()], sha_hex(good));
}

// ---------------------------------------------------------------- disk full

#[test]
fn enospc_from_the_fault_hook_marks_nothing_and_stays_resumable() {
    let tmp = TempDir::new().unwrap();
    let mut store = store_in(&tmp);
    let src = data(3 * MIB as usize, 12);
    let st = store
        .create(3 * MIB, Some(MIB + MIB / 2), BTreeMap::new(), None)
        .unwrap();
    store.set_fault_enospc_after(Some(MIB + 1000));
    let (e, m) = msg(put(&store, &st.id, 1, chunk(&src, MIB + MIB / 2, 1)));
    assert!(matches!(e, StorageError::NoSpace(_)), "{e:?}");
    assert!(
        m.contains("no space left") && m.contains("chunk 1") && m.contains(&st.id),
        "{m}"
    );
    store.set_fault_enospc_after(Some(0));
    let (e, _) = msg(put(&store, &st.id, 0, chunk(&src, MIB + MIB / 2, 0)));
    assert!(matches!(e, StorageError::NoSpace(_)));
    let status = store.status(&st.id).unwrap();
    assert_eq!(status.missing, vec![0, 1]);
    assert_eq!(status.state, UploadState::Uploading);

    store.set_fault_enospc_after(None);
    for i in 0..2 {
        put(&store, &st.id, i, chunk(&src, MIB + MIB / 2, i)).unwrap();
    }
    let done = store.complete(&st.id).unwrap();
    assert_eq!(fs::read(done.path.unwrap()).unwrap(), src);
}

#[test]
fn fault_hook_is_read_from_the_environment() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path().join("env");
    // Set the variable only in a forked child, so no other test's store sees it.
    // SAFETY: the child creates a store, checks it and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        std::env::set_var(FAULT_ENOSPC_ENV, "10");
        let code = match Store::new(opts(&root)) {
            Ok(s) => {
                let st = s.create(100, None, BTreeMap::new(), None);
                let r = st.map(|st| put(&s, &st.id, 0, &[7u8; 100]));
                match r {
                    Ok(Err(StorageError::NoSpace(_))) if s.fault_enospc_after == Some(10) => 0,
                    _ => 2,
                }
            }
            Err(_) => 3,
        };
        // SAFETY: leave the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { assert_eq!(libc::waitpid(pid, &mut status, 0), pid) };
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), 0);
}

#[test]
fn no_space_errno_maps_to_no_space() {
    let p = Path::new("/x");
    for errno in [libc::ENOSPC, libc::EDQUOT] {
        let e = io_error("writing", p, &io::Error::from_raw_os_error(errno));
        assert!(matches!(e, StorageError::NoSpace(_)), "{e:?}");
    }
    let e = io_error("writing", p, &io::Error::from_raw_os_error(libc::EIO));
    assert!(
        matches!(e, StorageError::Io(ref m) if m.contains("/x")),
        "{e:?}"
    );
}

// ---------------------------------------------------------------- abort and expiry

#[test]
fn abort_removes_the_upload() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let st = store.create(100, Some(10), BTreeMap::new(), None).unwrap();
    put(&store, &st.id, 0, &[1u8; 10]).unwrap();
    store.abort(&st.id).unwrap();
    assert!(!store.root().join(&st.id).exists());
    assert!(matches!(
        store.status(&st.id),
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        store.abort(&st.id),
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        put(&store, &st.id, 1, &[1u8; 10]),
        Err(StorageError::NotFound(_))
    ));

    // Completed uploads can be aborted too (the file goes with them).
    let st = store.create(10, None, BTreeMap::new(), None).unwrap();
    put(&store, &st.id, 0, &[1u8; 10]).unwrap();
    let path = store.complete(&st.id).unwrap().path.unwrap();
    store.abort(&st.id).unwrap();
    assert!(!Path::new(&path).exists());
}

#[test]
fn abort_during_a_chunk_write_makes_the_writer_fail() {
    let tmp = TempDir::new().unwrap();
    let store = Arc::new(store_in(&tmp));
    let src = data(MIB as usize, 13);
    let st = store.create(MIB, None, BTreeMap::new(), None).unwrap();
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    let writer = {
        let (store, id) = (store.clone(), st.id.clone());
        thread::spawn(move || {
            let mut r = Gated {
                data: src,
                pos: 0,
                started: Some(started_tx),
                go: go_rx,
            };
            store.write_chunk(&id, 0, &mut r, None, &mut |_| {})
        })
    };
    started_rx.recv().unwrap();
    store.abort(&st.id).unwrap();
    go_tx.send(()).unwrap();
    let r = writer.join().unwrap();
    assert!(matches!(r, Err(StorageError::NotFound(_))), "{r:?}");
    assert!(!store.root().join(&st.id).exists());
}

#[test]
fn expiry_hides_and_sweep_removes() {
    let tmp = TempDir::new().unwrap();
    let store = Store::new(StoreOptions {
        expire_seconds: 100,
        ..opts(&tmp.path().join("uploads"))
    })
    .unwrap();
    let stale = store.create(20, Some(10), BTreeMap::new(), None).unwrap();
    let fresh = store.create(20, Some(10), BTreeMap::new(), None).unwrap();
    let done = store.create(10, Some(10), BTreeMap::new(), None).unwrap();
    put(&store, &done.id, 0, &[3u8; 10]).unwrap();
    store.complete(&done.id).unwrap();
    assert_eq!(stale.expires_at, stale.created_at + 100);

    store.clock_offset.store(60, Ordering::Relaxed);
    let touched = put(&store, &fresh.id, 0, &[1u8; 10]).unwrap().status;
    assert!(
        touched.expires_at >= fresh.expires_at + 60,
        "a write touches the upload"
    );

    store.clock_offset.store(101, Ordering::Relaxed);
    for id in [&stale.id, &done.id] {
        assert_eq!(store.open(id), Err(StorageError::NotFound(id.clone())));
        assert!(matches!(store.status(id), Err(StorageError::NotFound(_))));
        assert!(matches!(store.complete(id), Err(StorageError::NotFound(_))));
        assert!(matches!(
            store.write_chunk(id, 1, &mut MustNotRead, None, &mut |_| {}),
            Err(StorageError::NotFound(_))
        ));
    }
    assert!(store.status(&fresh.id).is_ok());

    // An orphan directory (crashed create) older than an hour, one that is recent, and a
    // leftover of an abort are cleaned up too, without being reported.
    let orphan = store.root().join(new_id());
    fs::create_dir(&orphan).unwrap();
    File::open(&orphan)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let young = store.root().join(new_id());
    fs::create_dir(&young).unwrap();
    fs::write(store.root().join("not-an-upload"), b"keep").unwrap();

    let mut swept = store.sweep_expired_detailed();
    swept.sort_by(|a, b| a.id.cmp(&b.id));
    let mut want = vec![
        SweptUpload {
            id: stale.id.clone(),
            state: UploadState::Uploading,
        },
        SweptUpload {
            id: done.id.clone(),
            state: UploadState::Complete,
        },
    ];
    want.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(swept, want);
    assert!(!store.root().join(&stale.id).exists());
    assert!(!store.root().join(&done.id).exists());
    assert!(!orphan.exists());
    assert!(young.exists());
    assert!(store.root().join(&fresh.id).exists());
    assert!(store.root().join("not-an-upload").exists());

    // At most one real sweep per 60 s per directory, across Store instances.
    store.clock_offset.store(1000, Ordering::Relaxed);
    let t = Instant::now();
    assert_eq!(store.sweep_expired(), Vec::<String>::new());
    let other = Store::new(opts(store.root())).unwrap();
    assert_eq!(other.sweep_expired(), Vec::<String>::new());
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(
        store.root().join(&fresh.id).exists(),
        "throttled: not swept yet"
    );
    // Once the stamp is a minute old, the next call does the work.
    File::open(store.root().join(".sweep"))
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(61))
        .unwrap();
    assert_eq!(store.sweep_expired(), vec![fresh.id.clone()]);
    assert!(!store.root().join(&fresh.id).exists());
    assert_eq!(store.sweep(true), Vec::new());
}

#[test]
fn zero_expire_seconds_never_expires() {
    let tmp = TempDir::new().unwrap();
    let store = Store::new(StoreOptions {
        expire_seconds: 0,
        ..opts(private(&tmp))
    })
    .unwrap();
    let st = store.create(10, None, BTreeMap::new(), None).unwrap();
    assert_eq!(st.expires_at, 0);
    store
        .clock_offset
        .store(10 * 365 * 86400, Ordering::Relaxed);
    assert!(store.status(&st.id).is_ok());
    assert!(store.sweep(true).is_empty());
}

#[test]
fn sweep_claims_are_exclusive() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let stamp = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(store.root().join(".sweep"))
        .unwrap();
    let held = ByteLock::acquire(&stamp, 0).unwrap();
    stamp
        .set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    assert!(store.sweep(true).is_empty());
    let mtime = fs::metadata(store.root().join(".sweep"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(
        mtime.elapsed().unwrap() > Duration::from_secs(3000),
        "busy: nothing done"
    );
    drop(held);
    store.sweep(false);
    let mtime = fs::metadata(store.root().join(".sweep"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(mtime.elapsed().unwrap() < Duration::from_secs(60));
}

#[test]
fn a_corrupt_manifest_is_an_io_error_naming_it() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let st = store.create(10, None, BTreeMap::new(), None).unwrap();
    let path = store.root().join(&st.id).join("manifest.json");
    fs::write(&path, b"{not json").unwrap();
    let (e, m) = msg(store.status(&st.id));
    assert!(matches!(e, StorageError::Io(_)));
    assert!(m.contains(path.to_str().unwrap()), "{m}");
    let mut bad: serde_json::Value = serde_json::from_str(
        &serde_json::to_string(&Manifest::new(&st.id, 0, 1, 0, BTreeMap::new(), None, 1, 2))
            .unwrap(),
    )
    .unwrap();
    bad["total_bytes"] = 0.into();
    fs::write(&path, bad.to_string()).unwrap();
    assert!(matches!(store.status(&st.id), Err(StorageError::Io(_))));
}

// ---- shared-host hardening: the root, links, reservations, bounded waits ----

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Attacker (another local user) creates the root first, or leaves it open to others, or
/// points it elsewhere with a symlink. Old code used any of them as they were.
#[test]
fn unsafe_roots_are_refused_by_every_call_and_never_chmodded() {
    let tmp = TempDir::new().unwrap();
    let good = private(&tmp).join("root");
    let store = Store::new(opts(&good)).unwrap();
    let mode = fs::metadata(&good).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o700, "created 0700");
    let st = store.create(10, None, BTreeMap::new(), None).unwrap();

    // Opened to group/other later: every call refuses, naming the path and the problem.
    fs::set_permissions(&good, fs::Permissions::from_mode(0o755)).unwrap();
    let (e, m) = msg(store.status(&st.id));
    assert!(matches!(e, StorageError::Io(_)), "{e:?}");
    assert!(
        m.contains(good.to_str().unwrap()) && m.contains("0755"),
        "{m}"
    );
    assert!(store.create(10, None, BTreeMap::new(), None).is_err());
    assert!(store.complete(&st.id).is_err());
    assert!(store.abort(&st.id).is_err());
    let (_, m) = msg(put(&store, &st.id, 0, &[0; 10]));
    assert!(m.contains("group/other"), "{m}");
    assert_eq!(
        fs::metadata(&good).unwrap().permissions().mode() & 0o7777,
        0o755,
        "refused, not chmod'ed"
    );
    fs::set_permissions(&good, fs::Permissions::from_mode(0o700)).unwrap();
    assert!(store.status(&st.id).is_ok());

    // Owned by another user.
    let foreign = tmp.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::set_permissions(&foreign, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let e = Store::new(opts(&foreign)).unwrap_err().to_string();
    assert!(
        e.contains(foreign.to_str().unwrap()) && e.contains("owned by uid 65534"),
        "{e}"
    );

    // A symlink to a good directory.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    let e = Store::new(opts(&link)).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");

    // A planted .app-secret (foreign owner) makes the root unusable too.
    let planted = good.join(root::SECRET_FILE);
    fs::write(&planted, "attacker").unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    let (_, m) = msg(store.status(&st.id));
    assert!(
        m.contains(".app-secret") && m.contains("owned by uid 65534"),
        "{m}"
    );
    assert!(root::check(&good).is_err());
    assert!(matches!(
        root::check(&tmp.path().join("missing")),
        Ok(false)
    ));
}

/// Attacker: plants `data.part` as a symlink (or a hard link) to a file of the pool's user.
/// Old code opened it by path and `writeChunk` overwrote the victim.
#[test]
fn planted_links_under_the_root_are_never_written_through() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let victim = tmp.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let st = store.create(8, None, BTreeMap::new(), None).unwrap();
    let dir = store.root().join(&st.id);
    fs::remove_file(dir.join("data.part")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("data.part")).unwrap();
    let (e, m) = msg(put(&store, &st.id, 0, b"OVERWRIT"));
    assert!(matches!(e, StorageError::Io(_)), "{e:?}");
    assert!(m.contains("symbolic link"), "{m}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious");

    fs::remove_file(dir.join("data.part")).unwrap();
    fs::hard_link(&victim, dir.join("data.part")).unwrap();
    let (_, m) = msg(put(&store, &st.id, 0, b"OVERWRIT"));
    assert!(m.contains("hard links"), "{m}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious");

    // The whole upload directory replaced by a symlink to a look-alike.
    let other = store.create(8, None, BTreeMap::new(), None).unwrap();
    let moved = tmp.path().join("moved");
    fs::rename(store.root().join(&other.id), &moved).unwrap();
    std::os::unix::fs::symlink(&moved, store.root().join(&other.id)).unwrap();
    let (_, m) = msg(put(&store, &other.id, 0, b"OVERWRIT"));
    assert!(m.contains("symbolic link"), "{m}");
    assert_eq!(fs::read(moved.join("data.part")).unwrap(), [0u8; 8]);
}

/// Modes are exact whatever the umask (a process with umask 0277 used to create a root it
/// could not write, and `create_dir_all` elsewhere made it 0755).
#[test]
fn modes_are_exact_whatever_the_umask() {
    let tmp = TempDir::new().unwrap();
    let root = private(&tmp).join("r");
    // SAFETY: fork in a test; the child only calls the store and _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = std::panic::catch_unwind(|| {
            // SAFETY: plain syscall in the child.
            unsafe { libc::umask(0o277) };
            let store = Store::new(opts(&root)).unwrap();
            let st = store.create(10, None, BTreeMap::new(), None).unwrap();
            put(&store, &st.id, 0, &[1; 10]).unwrap();
            crate::secret::load_or_create(&root).unwrap();
        })
        .map_or(1, |()| 0);
        // SAFETY: leave the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(status, 0, "child failed");
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join(root::SECRET_FILE)), 0o600);
    for e in fs::read_dir(&root).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            assert_eq!(mode(&e.path()), 0o700);
            for f in fs::read_dir(e.path()).unwrap().flatten() {
                assert_eq!(mode(&f.path()), 0o600, "{:?}", f.path());
            }
        }
    }
}

/// Attacker: announces (or sends) 1 271 bytes for a 64 MiB chunk. Old code reserved the
/// whole chunk before reading and never gave it back: 64 MiB allocated for 1 271 bytes.
#[test]
fn failed_chunks_keep_no_reservation() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let chunk = 64 * MIB;
    let st = store
        .create(2 * chunk, Some(chunk), BTreeMap::new(), None)
        .unwrap();
    let data = store.root().join(&st.id).join("data.part");
    let short = vec![7u8; 1271];
    // Length unknown (or shorter than the chunk): nothing reserved.
    let e = store
        .write_chunk_sized(&st.id, 0, &mut Cursor::new(&short), None, None, &mut |_| {})
        .unwrap_err();
    assert!(matches!(e, StorageError::InvalidChunk(_)), "{e:?}");
    assert!(
        allocated(&data) < MIB,
        "{} bytes allocated",
        allocated(&data)
    );
    let e = store
        .write_chunk_sized(
            &st.id,
            0,
            &mut Cursor::new(&short),
            Some(1271),
            None,
            &mut |_| {},
        )
        .unwrap_err();
    assert!(matches!(e, StorageError::InvalidChunk(_)), "{e:?}");
    assert!(
        allocated(&data) < MIB,
        "{} bytes allocated",
        allocated(&data)
    );
    // Announced in full, then the body ends early (client gone): the range is given back.
    let e = store
        .write_chunk_sized(
            &st.id,
            1,
            &mut Cursor::new(&short),
            Some(chunk),
            None,
            &mut |_| {},
        )
        .unwrap_err();
    assert!(matches!(e, StorageError::InvalidChunk(_)), "{e:?}");
    assert!(
        allocated(&data) < MIB,
        "{} bytes allocated",
        allocated(&data)
    );
    // A good chunk announced in full is reserved and stays.
    let body = data_bytes(chunk as usize, 3);
    store
        .write_chunk_sized(
            &st.id,
            1,
            &mut Cursor::new(&body),
            Some(chunk),
            None,
            &mut |_| {},
        )
        .unwrap();
    assert!(allocated(&data) >= chunk);
    assert!(!store.status(&st.id).unwrap().missing.contains(&1));
}

/// A failed chunk's hole never touches the bytes of a neighbouring chunk sharing its edge
/// blocks (chunk size not a multiple of the block size).
#[test]
fn punching_a_failed_chunk_keeps_neighbours() {
    let tmp = TempDir::new().unwrap();
    let store = store_in(&tmp);
    let cs = 10_000u64;
    let src = data_bytes(3 * cs as usize, 9);
    let st = store
        .create(3 * cs, Some(cs), BTreeMap::new(), None)
        .unwrap();
    put(&store, &st.id, 0, chunk(&src, cs, 0)).unwrap();
    put(&store, &st.id, 2, chunk(&src, cs, 2)).unwrap();
    let short = &chunk(&src, cs, 1)[..5000];
    assert!(store
        .write_chunk_sized(
            &st.id,
            1,
            &mut Cursor::new(short),
            Some(cs),
            None,
            &mut |_| {}
        )
        .is_err());
    put(&store, &st.id, 1, chunk(&src, cs, 1)).unwrap();
    let path = store.complete(&st.id).unwrap().path.unwrap();
    assert_eq!(fs::read(path).unwrap(), src);
}

fn data_bytes(len: usize, seed: u64) -> Vec<u8> {
    data(len, seed)
}

/// Attacker: trickles chunk 0 and sends chunk 0 again in parallel. Old code made the second
/// writer wait on `F_OFD_SETLKW` for as long as the first trickled (forever).
#[test]
fn a_second_writer_of_a_busy_chunk_gets_a_conflict_in_bounded_time() {
    let tmp = TempDir::new().unwrap();
    let mut store = store_in(&tmp);
    store.set_lock_waits(Duration::from_millis(300), Duration::from_millis(300));
    let st = store.create(20, Some(10), BTreeMap::new(), None).unwrap();
    let lock = File::options()
        .read(true)
        .write(true)
        .open(store.root().join(&st.id).join("lock"))
        .unwrap();
    let held = ByteLock::acquire(&lock, 1).unwrap(); // chunk 0 is being written
    let t = Instant::now();
    let (e, m) = msg(store.write_chunk(&st.id, 0, &mut MustNotRead, None, &mut |_| {}));
    let waited = t.elapsed();
    assert!(matches!(e, StorageError::ChunkBusy(_)), "{e:?}");
    assert!(m.contains("being written by another request"), "{m}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Other chunks are not held up.
    put(&store, &st.id, 1, &[1; 10]).unwrap();
    drop(held);
    put(&store, &st.id, 0, &[0; 10]).unwrap();
    assert_eq!(inflight::count(), 0);
}

/// A PHP bailout (fatal error, timeout) inside the body read is a longjmp over the write's
/// frames: nothing is dropped. Old code then kept the chunk lock (and the reservation) for
/// the life of the worker, and the next writer of that chunk waited forever. Simulated on a
/// thread whose source calls `release_abandoned` (what the PHP layer does when it catches
/// the bailout) and then never returns, so the frames stay abandoned.
#[test]
fn a_write_abandoned_by_a_bailout_releases_lock_and_reservation() {
    let tmp = TempDir::new().unwrap();
    let mut store = store_in(&tmp);
    store.set_lock_waits(Duration::from_millis(300), Duration::from_millis(300));
    let chunk = 16 * MIB;
    let st = store
        .create(chunk, Some(chunk), BTreeMap::new(), None)
        .unwrap();
    let data_path = store.root().join(&st.id).join("data.part");

    struct Bail {
        data: PathBuf,
        report: mpsc::Sender<(u64, usize, usize)>,
    }
    impl Read for Bail {
        fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
            let reserved = allocated(&self.data);
            let running = inflight::count();
            // The bailout handler's cleanup, with the write's frames abandoned below us.
            let released = release_abandoned();
            let _ = self.report.send((reserved, running, released));
            loop {
                thread::park(); // never return: the frames are never dropped
            }
        }
    }
    let (tx, rx) = mpsc::channel();
    let root = store.root().to_path_buf();
    let id = st.id.clone();
    let data = data_path.clone();
    thread::spawn(move || {
        let mut s = Store::new(opts(&root)).unwrap();
        s.set_fault_enospc_after(None);
        let mut src = Bail { data, report: tx };
        let _ = s.write_chunk_sized(&id, 0, &mut src, Some(chunk), None, &mut |_| {});
    });
    let (reserved, running, released) = rx.recv().unwrap();
    assert!(reserved >= chunk, "reserved while it ran: {reserved}");
    assert_eq!((running, released), (1, 1));
    assert!(allocated(&data_path) < MIB, "reservation given back");
    // The chunk lock is free again: the resend is stored at once, no conflict.
    let body = data_bytes(chunk as usize, 4);
    let t = Instant::now();
    store
        .write_chunk_sized(
            &st.id,
            0,
            &mut Cursor::new(&body),
            Some(chunk),
            None,
            &mut |_| {},
        )
        .unwrap();
    assert!(t.elapsed() < Duration::from_millis(300));
    assert_eq!(inflight::count(), 0);
}
