//! Concurrency and locks: parallel writers, busy chunks, killed writers, PHP bailouts.

use super::*;

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
            let mut r = Gated::new(src, started_tx, go_rx);
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
    put_sized(&store, &st.id, 0, &body, Some(chunk)).unwrap();
    assert!(t.elapsed() < Duration::from_millis(300));
    assert_eq!(inflight::count(), 0);
}
