//! The storage core with its state in a real redis-server (started on a free
//! loopback port per test; skipped, with a message, when redis-server is not
//! installed). Two `Store`s on one directory play two hosts: each keeps its own
//! Redis connection, as two PHP-FPM workers on different machines would.

use super::*;
use crate::redis_url::parse_redis_url;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

fn redis_binary() -> Option<&'static str> {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

impl RedisServer {
    /// With an append-only file synced on every write, so a restart keeps the state.
    fn start() -> Option<RedisServer> {
        redis_binary()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut r = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().ok()?,
        };
        r.restart();
        Some(r)
    }

    fn restart(&mut self) {
        self.stop();
        let bin = redis_binary().expect("redis-server");
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        for _ in 0..200 {
            if self.cmd(&["PING"]).is_some_and(|r| r.contains("PONG")) {
                return;
            }
            thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not start on {}", self.port);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: redis-server flushes the append-only file before it exits.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// One command through the plain-text (inline) protocol.
    fn cmd(&self, args: &[&str]) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{}\r\n", args.join(" ")).as_bytes())
            .ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn redis_store(root: &Path, url: &str) -> Store {
    let mut s = Store::new(StoreOptions {
        root: root.to_path_buf(),
        default_chunk_size: 1 << 20,
        max_upload_size: 0,
        expire_seconds: 3600,
    })
    .unwrap()
    .with_redis_state(RedisStateOptions {
        settings: parse_redis_url(url).unwrap(),
        key_prefix: "up:test:".into(),
        timeout: Duration::from_millis(500),
    });
    s.set_fault_enospc_after(None);
    s
}

macro_rules! redis_or_skip {
    () => {
        match RedisServer::start() {
            Some(r) => r,
            None => {
                eprintln!("redis-server not installed: skipped");
                return;
            }
        }
    };
}

#[test]
fn two_hosts_share_one_upload_through_redis() {
    let redis = redis_or_skip!();
    let tmp = TempDir::new().unwrap();
    let root = tmp.path().join("shared");
    let (a, b) = (
        redis_store(&root, &redis.url()),
        redis_store(&root, &redis.url()),
    );
    let chunk = 64 * 1024u64;
    let body = data(10 * chunk as usize + 123, 7);
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &body));
    let meta = BTreeMap::from([("name".to_string(), "film.mkv".to_string())]);
    let st = a
        .create(body.len() as u64, Some(chunk), meta.clone(), Some(digest))
        .unwrap();
    let id = st.id.clone();
    assert_eq!(st.chunk_count, 11);
    // The state is in Redis, not in a manifest on the shared disk.
    assert!(!root.join(&id).join("manifest.json").exists());
    let key = format!("up:test:upload:{{private-upload.{id}}}");
    let ttl: i64 = redis.cmd(&["TTL", &key]).unwrap()[1..]
        .trim()
        .parse()
        .unwrap();
    assert!(
        (3600..=3600 + KEY_GRACE_S as i64).contains(&ttl),
        "TTL {ttl}"
    );

    // Chunks alternate between the hosts, out of order, one with a checksum.
    for i in [10u64, 0, 5, 1, 9, 2, 8, 3, 7, 4] {
        let host = if i % 2 == 0 { &a } else { &b };
        let part = &body[(i * chunk) as usize..((i + 1) * chunk).min(body.len() as u64) as usize];
        let out = if i == 3 {
            let sum = format!(
                "sha256:{}",
                hex::encode(ring::digest::digest(&ring::digest::SHA256, part))
            );
            host.write_chunk(&id, i, &mut Cursor::new(part), Some(&sum), &mut |_| {})
                .unwrap()
        } else {
            put(host, &id, i, part).unwrap()
        };
        assert!(!out.already_stored);
    }
    // Each host sees what the other stored.
    let sa = a.status(&id).unwrap();
    let sb = b.status(&id).unwrap();
    assert_eq!(sa, sb);
    assert_eq!(sa.missing, vec![6]);
    assert_eq!(sa.metadata, meta);
    let fields = redis.cmd(&["HKEYS", &key]).unwrap();
    assert!(fields.contains("sha:3"), "{fields}");
    // Completing with a chunk missing names it.
    let err = b.complete(&id).unwrap_err();
    assert!(
        matches!(&err, StorageError::InvalidChunk(m) if m.contains("1 of 11 chunks: 6")),
        "{err}"
    );
    // Re-sending a stored chunk on the other host does not read the body.
    let again = put(&b, &id, 0, b"not read").unwrap();
    assert!(again.already_stored);
    put(
        &b,
        &id,
        6,
        &body[(6 * chunk) as usize..(7 * chunk) as usize],
    )
    .unwrap();
    let done = b.complete(&id).unwrap();
    assert_eq!(done.state, UploadState::Complete);
    let path = done.path.clone().unwrap();
    assert_eq!(fs::read(&path).unwrap(), body);
    assert_eq!(a.complete(&id).unwrap().path, Some(path.clone()));
    assert_eq!(a.status(&id).unwrap().state, UploadState::Complete);
}

#[test]
fn concurrent_marks_from_two_hosts_are_never_lost() {
    let redis = redis_or_skip!();
    let tmp = TempDir::new().unwrap();
    let root = tmp.path().join("shared");
    let hosts = Arc::new([
        redis_store(&root, &redis.url()),
        redis_store(&root, &redis.url()),
    ]);
    let n = 64u64;
    let st = hosts[0]
        .create(n * 1000, Some(1000), BTreeMap::new(), None)
        .unwrap();
    let id = Arc::new(st.id);
    let workers: Vec<_> = (0..8u64)
        .map(|w| {
            let hosts = Arc::clone(&hosts);
            let id = Arc::clone(&id);
            let url = redis.url();
            thread::spawn(move || {
                // A store of its own too: one more connection, like one more worker.
                let own = redis_store(hosts[0].root(), &url);
                for i in (w..n).step_by(8) {
                    let s = if i % 3 == 0 {
                        &own
                    } else {
                        &hosts[(i % 2) as usize]
                    };
                    put(s, &id, i, &[i as u8; 1000]).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let st = hosts[1].status(&id).unwrap();
    assert_eq!(st.chunks_done, n, "missing {:?}", st.missing);
    assert_eq!(st.bytes_done, n * 1000);
    let path = hosts[0].complete(&id).unwrap().path.unwrap();
    let bytes = fs::read(path).unwrap();
    assert!((0..n).all(|i| bytes[(i * 1000) as usize] == i as u8));
}

#[test]
fn redis_down_fails_fast_with_unavailable_and_recovers_by_itself() {
    let mut redis = redis_or_skip!();
    let tmp = TempDir::new().unwrap();
    let store = redis_store(&tmp.path().join("u"), &redis.url());
    // Another worker whose connection is open, and idle during the outage.
    let idle = redis_store(&tmp.path().join("u"), &redis.url());
    let st = store
        .create(3000, Some(1000), BTreeMap::new(), None)
        .unwrap();
    let id = st.id.clone();
    put(&store, &id, 0, &[1; 1000]).unwrap();
    assert_eq!(idle.status(&id).unwrap().chunks_done, 1);

    redis.stop();
    let t0 = Instant::now();
    let errors = [
        store.status(&id).unwrap_err(),
        put(&store, &id, 1, &[2; 1000]).unwrap_err(),
        store.create(10, None, BTreeMap::new(), None).unwrap_err(),
        store.complete(&id).unwrap_err(),
    ];
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    for e in &errors {
        assert!(
            matches!(e, StorageError::Unavailable(m) if m.contains(&redis.url())),
            "{e:?}"
        );
    }
    // The failed create left no directory behind; the sweep removes nothing
    // while the state cannot be read.
    let dirs: Vec<_> = fs::read_dir(tmp.path().join("u"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(dirs.len(), 1);
    assert!(store.sweep(true).is_empty());
    assert!(tmp.path().join("u").join(&id).join("data.part").exists());

    redis.restart();
    // The idle worker's connection died with the old server: its next call
    // still succeeds (one fresh try), it does not hand out a stale error.
    assert_eq!(idle.status(&id).unwrap().missing, vec![1, 2]);
    // Same Store, no restart of anything: it connects again on the next call,
    // and the append-only file kept chunk 0.
    let st = store.status(&id).unwrap();
    assert_eq!(st.missing, vec![1, 2]);
    put(&store, &id, 1, &[2; 1000]).unwrap();
    put(&store, &id, 2, &[3; 1000]).unwrap();
    let path = store.complete(&id).unwrap().path.unwrap();
    assert_eq!(fs::read(path).unwrap()[1500], 2);
}

#[test]
fn abort_and_expiry_remove_keys_and_files() {
    let redis = redis_or_skip!();
    let tmp = TempDir::new().unwrap();
    let root = tmp.path().join("u");
    let (a, b) = (
        redis_store(&root, &redis.url()),
        redis_store(&root, &redis.url()),
    );
    let keys = |id: &str| {
        redis
            .cmd(&[
                "EXISTS",
                &format!("up:test:upload:{{private-upload.{id}}}"),
                &format!("up:test:chunks:{{private-upload.{id}}}"),
            ])
            .unwrap()
    };

    let gone = a.create(10, None, BTreeMap::new(), None).unwrap().id;
    assert_eq!(keys(&gone).trim(), ":2");
    b.abort(&gone).unwrap();
    assert_eq!(keys(&gone).trim(), ":0");
    assert!(!root.join(&gone).exists());
    assert!(matches!(a.status(&gone), Err(StorageError::NotFound(_))));
    assert!(matches!(
        put(&a, &gone, 0, &[0; 10]),
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(a.abort(&gone), Err(StorageError::NotFound(_))));

    let old = a.create(10, None, BTreeMap::new(), None).unwrap().id;
    let done = a.create(10, None, BTreeMap::new(), None).unwrap().id;
    put(&b, &done, 0, &[5; 10]).unwrap();
    b.complete(&done).unwrap();
    for s in [&a, &b] {
        s.clock_offset.store(3601, Ordering::Relaxed);
    }
    assert!(matches!(b.status(&old), Err(StorageError::NotFound(_))));
    assert!(matches!(
        put(&b, &old, 0, &[0; 10]),
        Err(StorageError::NotFound(_))
    ));
    let mut swept = a.sweep(true);
    swept.sort_by(|x, y| x.id.cmp(&y.id));
    let mut want = vec![
        SweptUpload {
            id: old.clone(),
            state: UploadState::Uploading,
        },
        SweptUpload {
            id: done.clone(),
            state: UploadState::Complete,
        },
    ];
    want.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(swept, want);
    assert_eq!(keys(&old).trim(), ":0");
    assert!(!root.join(&old).exists() && !root.join(&done).exists());
}

#[test]
fn damaged_state_in_redis_is_an_error_naming_it() {
    let redis = redis_or_skip!();
    let tmp = TempDir::new().unwrap();
    let store = redis_store(&tmp.path().join("u"), &redis.url());
    let id = store
        .create(100, Some(10), BTreeMap::new(), None)
        .unwrap()
        .id;
    let key = format!("up:test:upload:{{private-upload.{id}}}");
    redis.cmd(&["HSET", &key, "total", "lots"]).unwrap();
    let e = store.status(&id).unwrap_err();
    assert!(
        matches!(&e, StorageError::Io(m) if m.contains("total") && m.contains(&id)),
        "{e}"
    );
    // Sizes that do not add up are refused like a tampered manifest.
    redis.cmd(&["HSET", &key, "total", "1000"]).unwrap();
    let e = put(&store, &id, 0, &[0; 10]).unwrap_err();
    assert!(
        matches!(&e, StorageError::Io(m) if m.contains("inconsistent")),
        "{e}"
    );
    // A key of another type where the hash should be: an error, not a crash.
    redis.cmd(&["DEL", &key]).unwrap();
    redis.cmd(&["SET", &key, "x"]).unwrap();
    assert!(store.status(&id).is_err());
}
