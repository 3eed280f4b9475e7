//! Validation of sizes, ids, chunks, metadata and checksums: every message names the value.

use super::*;

// ---------------------------------------------------------------- validation messages

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
