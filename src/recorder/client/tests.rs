//! The ingest client against real listeners: a hub that does not read, a squatter of
//! another uid, no hub at all.

use super::*;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;

fn read_frames(stream: &mut std::os::unix::net::UnixStream, n: usize) -> Vec<IngestMessage> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    while out.len() < n {
        let got = stream.read(&mut chunk).unwrap();
        assert!(got > 0);
        buf.extend_from_slice(&chunk[..got]);
        while let Some((len, total)) = ingest::frame_len(&buf).unwrap() {
            out.push(ingest::decode(&buf[4..4 + len]).unwrap());
            buf.drain(..total);
        }
    }
    out
}

#[test]
fn publishes_after_hello_and_counts_drops_without_hub() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.sock").to_string_lossy().into_owned();
    let mut client = IngestClient::new(path.clone(), "1.2.3".into());
    let mut spawned = 0;
    assert!(!client.publish("c", "e", "{}", &mut || spawned += 1));
    assert_eq!(spawned, 1);
    assert_eq!(client.dropped(), 1);

    let listener = UnixListener::bind(&path).unwrap();
    client.last_attempt = None;
    assert!(client.publish("ch", "ev", "{\"a\":1}", &mut || {}));
    let (mut stream, _) = listener.accept().unwrap();
    let frames = read_frames(&mut stream, 2);
    assert_eq!(
        frames[0],
        IngestMessage::Hello {
            version: "1.2.3".into(),
            dropped: 1
        }
    );
    assert_eq!(
        frames[1],
        IngestMessage::Publish {
            channel: "ch".into(),
            event: "ev".into(),
            data: "{\"a\":1}".into()
        }
    );
}

/// A listener of another uid on `name` (root only: None otherwise). It
/// accepts connections, counts the bytes each one received until EOF and
/// reports every count (u64) on the returned pipe.
pub(crate) fn foreign_listener(name: &str) -> Option<(libc::pid_t, std::fs::File)> {
    // SAFETY: geteuid never fails.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to listen as another uid");
        return None;
    }
    let sa = sock_addr(name).unwrap();
    let (addr, len) = (sa.as_ptr().cast::<libc::sockaddr>(), sa.len());
    let mut fds = [0; 2];
    let mut ready = [0; 2];
    // SAFETY: plain pipes; the child below only makes async-signal-safe calls.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(ready.as_mut_ptr()), 0);
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            libc::setgroups(0, std::ptr::null());
            libc::setgid(65534);
            if libc::setuid(65534) != 0 {
                libc::_exit(2);
            }
            let l = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if libc::bind(l, addr, len) != 0 || libc::listen(l, 8) != 0 {
                libc::_exit(3);
            }
            libc::write(ready[1], b"r".as_ptr().cast(), 1);
            loop {
                let c = libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut());
                if c < 0 {
                    break;
                }
                let mut total: u64 = 0;
                let mut buf = [0u8; 4096];
                loop {
                    let n = libc::read(c, buf.as_mut_ptr().cast(), buf.len());
                    if n <= 0 {
                        break;
                    }
                    total += n as u64;
                }
                libc::close(c);
                libc::write(fds[1], (&total as *const u64).cast(), 8);
            }
            libc::_exit(0);
        }
        libc::close(fds[1]);
        libc::close(ready[1]);
        let mut b = 0u8;
        assert_eq!(libc::read(ready[0], (&mut b as *mut u8).cast(), 1), 1);
        libc::close(ready[0]);
        Some((pid, std::fs::File::from_raw_fd(fds[0])))
    }
}

#[test]
fn nothing_is_written_to_a_listener_of_another_uid() {
    let name = format!("@upload-progress-squat-test-{}", std::process::id());
    let Some((pid, mut report)) = foreign_listener(&name) else {
        return;
    };
    let mut client = IngestClient::new(name.clone(), "v".into());
    let mut spawned = 0;
    assert!(!client.publish("c", "e", "{}", &mut || spawned += 1));
    assert_eq!(spawned, 0, "a foreign holder is no reason to spawn");
    assert_eq!(client.foreign_holder(), Some(65534));
    assert_eq!(
        client.connect(true),
        Err(ConnectError::Foreign(65534)),
        "refused again on every attempt"
    );
    assert_eq!(
        client.query(&IngestMessage::QueryStatus, Duration::from_millis(200)),
        Err(QueryError::Foreign(65534))
    );
    assert_eq!(holder_uid(&name), Some(65534));
    drop(client);
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: ending and reaping our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    let mut counts = Vec::new();
    report.read_to_end(&mut counts).unwrap();
    assert!(counts.len() >= 8, "the squatter saw the connections");
    assert!(
        counts.iter().all(|b| *b == 0),
        "not even a Hello was sent: {counts:?}"
    );
}

#[test]
fn a_full_socket_drops_instead_of_blocking() {
    let name = format!("@upload-progress-test-{}", std::process::id());
    let _listener = listen(&name).unwrap();
    let mut client = IngestClient::new(name, "v".into());
    let data = "x".repeat(1000);
    let start = Instant::now();
    let mut sent = 0;
    for _ in 0..10_000 {
        if client.publish("c", "e", &data, &mut || {}) {
            sent += 1;
        }
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(sent > 50, "the socket buffer holds many events, got {sent}");
    assert!(client.dropped() > 0, "nobody reads, so some must drop");
    assert_eq!(sent + client.dropped(), 10_000);
}

/// Issue #15: a hub that does not read while one process sends a burst of 10 000
/// progress publishes with terminal events among them. Before, every frame that found
/// the socket buffer full was dropped (terminal ones too). Now: nothing is dropped,
/// every terminal event arrives in order, each channel's latest progress arrives, and
/// the progress frames that did not are exactly the ones counted as coalesced.
#[test]
fn a_stalled_hub_gets_every_terminal_event_in_order() {
    let name = format!("@upload-progress-burst-{}", std::process::id());
    let listener = UnixListener::from(std::os::fd::OwnedFd::from(listen(&name).unwrap()));
    let mut client = IngestClient::new(name, "v".into());
    let data = format!("{{\"pad\":\"{}\",\"seq\":", "x".repeat(200));
    let mut terminals = Vec::new();
    let mut last_seq = std::collections::HashMap::new();
    let start = Instant::now();
    for i in 0..10_000u32 {
        let channel = format!("private-upload.c{}", i % 10);
        assert!(client.publish(&channel, "progress", &format!("{data}{i}}}"), &mut || {}));
        last_seq.insert(channel, i);
        if i % 100 == 99 {
            let id = format!("u{i}");
            let end = IngestMessage::StreamEnd {
                upload_id: id.clone(),
                stream: u64::from(i),
                outcome: crate::protocol::ingest::StreamOutcome::Stored,
                stored_bytes: 1,
                chunks_done: 1,
            };
            let done = IngestMessage::Terminal {
                upload_id: id,
                event: "complete".into(),
                fields: "{}".into(),
            };
            assert!(client.send(&end, &mut || {}));
            assert!(client.send(&done, &mut || {}));
            terminals.push(end);
            terminals.push(done);
        }
    }
    let burst = start.elapsed();
    assert_eq!(client.dropped(), 0, "nothing is dropped");
    assert!(client.queued() > 0, "the hub did not read: frames wait");
    let coalesced = client.coalesced();
    assert!(coalesced > 0);
    println!("burst of 10000 publishes + 200 terminal frames in {burst:?}: {coalesced} progress coalesced, {} queued", client.queued());

    // The hub reads again; the process flushes at its next chances.
    let (mut stream, _) = listener.accept().unwrap();
    let reader = std::thread::spawn(move || {
        let mut frames = Vec::new();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        while let Ok(n) = stream.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some((len, total)) = ingest::frame_len(&buf).unwrap() {
                frames.push(ingest::decode(&buf[4..4 + len]).unwrap());
                buf.drain(..total);
            }
        }
        frames
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.queued() > 0 && Instant::now() < deadline {
        client.flush(Duration::from_millis(5));
    }
    assert_eq!(client.queued(), 0);
    let frames = reader.join().unwrap();
    let got_terminals: Vec<_> = frames
        .iter()
        .filter(|f| {
            matches!(
                f,
                IngestMessage::StreamEnd { .. } | IngestMessage::Terminal { .. }
            )
        })
        .cloned()
        .collect();
    assert_eq!(got_terminals, terminals, "every terminal frame, in order");
    let mut latest = std::collections::HashMap::new();
    let mut progress = 0u64;
    for f in &frames {
        if let IngestMessage::Publish { channel, data, .. } = f {
            progress += 1;
            let seq: u32 = data[data.rfind(':').unwrap() + 1..data.len() - 1]
                .parse()
                .unwrap();
            let prev = latest.insert(channel.clone(), seq);
            assert!(
                prev.is_none_or(|p| p < seq),
                "progress of a channel stays in order"
            );
        }
    }
    assert_eq!(latest, last_seq, "each channel's latest progress arrives");
    assert_eq!(
        progress + coalesced,
        10_000,
        "what did not arrive was coalesced"
    );
}
