//! Disk full and reservations: nothing marked, ranges given back, neighbours untouched.

use super::*;

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
    let e = put_sized(&store, &st.id, 0, &short, None).unwrap_err();
    assert!(matches!(e, StorageError::InvalidChunk(_)), "{e:?}");
    assert!(
        allocated(&data) < MIB,
        "{} bytes allocated",
        allocated(&data)
    );
    let e = put_sized(&store, &st.id, 0, &short, Some(1271)).unwrap_err();
    assert!(matches!(e, StorageError::InvalidChunk(_)), "{e:?}");
    assert!(
        allocated(&data) < MIB,
        "{} bytes allocated",
        allocated(&data)
    );
    // Announced in full, then the body ends early (client gone): the range is given back.
    let e = put_sized(&store, &st.id, 1, &short, Some(chunk)).unwrap_err();
    assert!(matches!(e, StorageError::InvalidChunk(_)), "{e:?}");
    assert!(
        allocated(&data) < MIB,
        "{} bytes allocated",
        allocated(&data)
    );
    // A good chunk announced in full is reserved and stays.
    let body = data_bytes(chunk as usize, 3);
    put_sized(&store, &st.id, 1, &body, Some(chunk)).unwrap();
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
