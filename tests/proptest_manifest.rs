//! Property tests of the storage manifest decoder, through the public `Store` API: a
//! `manifest.json` that is arbitrary bytes, or a real manifest with mutated JSON values,
//! never panics `open`/`status`/`write_chunk`/`complete`/`abort`, and whatever `status()`
//! accepts satisfies the invariants every caller relies on (counts consistent, bytes
//! within the file, limits of `create` respected, `complete` has a path, ...).
//!
//! (`storage::manifest` itself is private to the crate; the decoder is reached the way
//! PHP reaches it, by reading an upload whose manifest was tampered with on disk.)
//!
//! Bounded: `PROPTEST_CASES` (default 2000 here, shared by the properties below).

mod common;

use common::config;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use proptest::prelude::*;
use serde_json::Value;
use upload_progress::storage::{
    StorageError, Store, StoreOptions, UploadState, UploadStatus, MAX_CHUNK_COUNT, MAX_CHUNK_SIZE,
    MAX_METADATA_KEYS, MAX_METADATA_KEY_BYTES, MAX_METADATA_VALUE_BYTES,
};

/// A scratch directory, on tmpfs when there is one: every case creates an upload, and
/// create() fsyncs.
/// Mode 0700: the store refuses a root open to group/other.
fn scratch() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = match Path::new("/dev/shm") {
        shm if shm.is_dir() => {
            tempfile::tempdir_in(shm).unwrap_or_else(|_| tempfile::tempdir().unwrap())
        }
        _ => tempfile::tempdir().unwrap(),
    };
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn store(root: &Path) -> Store {
    Store::new(StoreOptions {
        root: root.to_path_buf(),
        default_chunk_size: 4,
        max_upload_size: 0,
        expire_seconds: 0,
    })
    .unwrap()
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What every accepted manifest must satisfy.
fn check_status(id: &str, st: &UploadStatus) -> Result<(), TestCaseError> {
    prop_assert_eq!(&st.id, id);
    prop_assert!(st.total_bytes > 0);
    prop_assert!(
        (1..=MAX_CHUNK_SIZE).contains(&st.chunk_size),
        "chunk_size {} out of range",
        st.chunk_size
    );
    prop_assert_eq!(st.chunk_count, st.total_bytes.div_ceil(st.chunk_size));
    prop_assert!(
        st.chunk_count <= MAX_CHUNK_COUNT,
        "chunk_count {}",
        st.chunk_count
    );
    prop_assert!(
        st.missing.windows(2).all(|w| w[0] < w[1]),
        "missing not ascending"
    );
    prop_assert!(st.missing.iter().all(|&i| i < st.chunk_count));
    prop_assert_eq!(st.chunks_done + st.missing.len() as u64, st.chunk_count);
    let last = st.chunk_count - 1;
    let expected_bytes: u64 = (0..st.chunk_count)
        .filter(|i| st.missing.binary_search(i).is_err())
        .map(|i| {
            if i == last {
                st.total_bytes - last * st.chunk_size
            } else {
                st.chunk_size
            }
        })
        .sum();
    prop_assert_eq!(st.bytes_done, expected_bytes);
    prop_assert!(st.bytes_done <= st.total_bytes);
    if st.state == UploadState::Complete {
        prop_assert!(st.missing.is_empty(), "complete with missing chunks");
        prop_assert!(st.path.is_some(), "complete without a path");
    }
    prop_assert!(
        st.state != UploadState::Aborted,
        "an aborted upload is NotFound"
    );
    if let Some(h) = &st.sha256 {
        prop_assert!(is_hex64(h), "sha256 {:?}", h);
    }
    prop_assert!(st.metadata.len() <= MAX_METADATA_KEYS);
    for (k, v) in &st.metadata {
        prop_assert!(!k.is_empty() && k.len() <= MAX_METADATA_KEY_BYTES);
        prop_assert!(v.len() <= MAX_METADATA_VALUE_BYTES);
    }
    Ok(())
}

/// Runs every operation on the tampered upload; none may panic, and every accepted
/// status must satisfy the invariants.
fn exercise(s: &Store, id: &str) -> Result<(), TestCaseError> {
    let st = match s.status(id) {
        Ok(st) => st,
        Err(StorageError::NotFound(_)) | Err(StorageError::Io(_)) => {
            // Refused (or expired/aborted): the other operations must refuse too.
            prop_assert!(s.open(id).is_err());
            let mut src: &[u8] = b"abcd";
            let refused = s.write_chunk(id, 0, &mut src, None, &mut |_| ()).is_err();
            prop_assert!(refused, "write_chunk accepted a refused manifest");
            prop_assert!(s.complete(id).is_err());
            let _ = s.abort(id);
            return Ok(());
        }
        Err(e) => {
            prop_assert!(false, "unexpected error kind from status(): {e:?}");
            unreachable!()
        }
    };
    check_status(id, &st)?;
    // A chunk write of the right length, at the first and at the last index.
    for index in [0, st.chunk_count - 1] {
        let len = if index == st.chunk_count - 1 {
            st.total_bytes - index * st.chunk_size
        } else {
            st.chunk_size
        };
        if len <= 64 {
            let body = vec![b'x'; len as usize];
            let mut src: &[u8] = &body;
            if let Ok(out) = s.write_chunk(id, index, &mut src, None, &mut |_| {}) {
                check_status(id, &out.status)?;
            }
        }
        let mut short: &[u8] = b"";
        let _ = s.write_chunk(id, index, &mut short, None, &mut |_| {});
    }
    let mut src: &[u8] = b"x";
    let past_end = s
        .write_chunk(id, st.chunk_count, &mut src, None, &mut |_| ())
        .is_err();
    let huge = s
        .write_chunk(id, u64::MAX, &mut src, None, &mut |_| ())
        .is_err();
    prop_assert!(past_end && huge, "out-of-range chunk index accepted");
    if let Ok(done) = s.complete(id) {
        check_status(id, &done)?;
        prop_assert_eq!(done.state, UploadState::Complete);
    }
    if let Ok(again) = s.status(id) {
        check_status(id, &again)?;
    }
    Ok(())
}

/// A real manifest of a fresh upload, as JSON.
fn fresh(s: &Store, total: u64, chunk: u64, sha: bool) -> (String, Value) {
    let mut md = BTreeMap::new();
    md.insert("name".to_string(), "f.bin".to_string());
    let st = s
        .create(total, Some(chunk), md, sha.then(|| "ab".repeat(32)))
        .unwrap();
    let path = s.root().join(&st.id).join("manifest.json");
    let v: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    (st.id, v)
}

fn write_manifest(s: &Store, id: &str, bytes: &[u8]) {
    fs::write(s.root().join(id).join("manifest.json"), bytes).unwrap();
}

/// Hostile replacement values for one field.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(u64::MAX),
            Just(1 << 63),
            Just((1 << 63) + 1),
            Just(MAX_CHUNK_SIZE + 1),
            Just(MAX_CHUNK_COUNT + 1),
            Just(u32::MAX as u64 + 1)
        ]
        .prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        "[01x]{0,12}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        Just(Value::from("complete")),
        Just(Value::from("uploading")),
        Just(Value::from("aborted")),
        Just(Value::from("../../etc/passwd")),
        Just(serde_json::json!({})),
        Just(serde_json::json!([])),
        Just(serde_json::json!({"0": "zz", "99999999999": "ab"})),
        Just(serde_json::json!({"": "v"})),
        Just(serde_json::json!({"k": "v".repeat(5000)})),
    ]
}

const FIELDS: &[&str] = &[
    "version",
    "id",
    "state",
    "total_bytes",
    "chunk_size",
    "chunk_count",
    "stored",
    "chunk_sha256",
    "metadata",
    "sha256",
    "created_at",
    "touched_at",
    "expires_at",
    "path",
];

proptest! {
    #![proptest_config(config(4))]

    /// Arbitrary bytes as manifest.json.
    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let dir = scratch();
        let s = store(dir.path());
        let (id, _) = fresh(&s, 10, 4, false);
        write_manifest(&s, &id, &bytes);
        exercise(&s, &id)?;
    }

    /// A real manifest with one to four fields replaced by hostile values (or removed).
    #[test]
    fn mutated_fields(total in 1u64..40, chunk in 1u64..12, sha in any::<bool>(),
                      edits in proptest::collection::vec((0..FIELDS.len(), proptest::option::of(hostile_value())), 1..5)) {
        let dir = scratch();
        let s = store(dir.path());
        let (id, mut v) = fresh(&s, total, chunk, sha);
        for (f, val) in edits {
            let obj = v.as_object_mut().unwrap();
            match val {
                Some(val) => { obj.insert(FIELDS[f].to_string(), val); }
                None => { obj.remove(FIELDS[f]); }
            }
        }
        write_manifest(&s, &id, v.to_string().as_bytes());
        exercise(&s, &id)?;
    }

    /// Consistent-looking manifests with extreme sizes (what a tampered file would
    /// need to get past the count check).
    #[test]
    fn extreme_sizes(total in prop_oneof![1u64..1000, Just(u64::MAX), (1u64 << 62)..u64::MAX],
                     chunk in prop_oneof![1u64..100, Just(u64::MAX), Just((1u64 << 63) + 1), (MAX_CHUNK_SIZE)..(MAX_CHUNK_SIZE * 4)],
                     all_stored in any::<bool>(), complete in any::<bool>()) {
        let count = total.div_ceil(chunk);
        prop_assume!(count <= 200_000);
        let dir = scratch();
        let s = store(dir.path());
        let (id, mut v) = fresh(&s, 10, 4, false);
        let obj = v.as_object_mut().unwrap();
        obj.insert("total_bytes".into(), total.into());
        obj.insert("chunk_size".into(), chunk.into());
        obj.insert("chunk_count".into(), count.into());
        obj.insert("stored".into(), (if all_stored { "1" } else { "0" }).repeat(count as usize).into());
        if complete {
            obj.insert("state".into(), "complete".into());
        }
        write_manifest(&s, &id, v.to_string().as_bytes());
        exercise(&s, &id)?;
    }

    /// Byte flips in a real manifest.
    #[test]
    fn flipped_bytes(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let dir = scratch();
        let s = store(dir.path());
        let (id, v) = fresh(&s, 10, 4, true);
        let mut bytes = v.to_string().into_bytes();
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] ^= b | 1;
        }
        write_manifest(&s, &id, &bytes);
        exercise(&s, &id)?;
    }
}
