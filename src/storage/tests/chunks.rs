//! Chunk writes: bytes written per uploaded byte, streaming, a big shuffled upload.

use super::*;

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
