//! Shared-host hardening of the root: unsafe roots, planted links, exact modes.

use super::*;

// ---- shared-host hardening: the root, links, reservations, bounded waits ----

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
