//! Abort, expiry and the sweep.

use super::*;

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
            let mut r = Gated::new(src, started_tx, go_rx);
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
