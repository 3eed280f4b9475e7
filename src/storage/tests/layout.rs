//! Layout of an upload on disk and a round trip through every operation.

use super::*;

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
