//! The ingest socket: PHP processes of the same user send length-prefixed
//! frames (`crate::protocol::ingest`), one connection per process, kept open,
//! most of them through the shared ring the process passed with its Hello
//! (`crate::protocol::ring`). A malformed frame closes that connection only.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::http::MAX_EVENT_DATA;
use super::redis::{dispatch, Op};
use super::state::data_seq;
use super::{lock, log, now_ms, Hub, Metrics};
use crate::protocol::ingest::{self, IngestMessage};
use crate::protocol::pusher;
use crate::protocol::ring::Ring;

pub(crate) async fn accept_loop(
    hub: Arc<Hub>,
    listener: UnixListener,
    mut down: watch::Receiver<bool>,
) {
    let mut last_log: Option<Instant> = None;
    loop {
        let r = tokio::select! {
            _ = down.changed() => return,
            r = listener.accept() => r,
        };
        match r {
            Ok((s, _)) => {
                tokio::spawn(connection(hub.clone(), s, down.clone()));
            }
            Err(e) => {
                let pause = super::accept_failed("ingest accept", &e, &mut last_log);
                tokio::select! {
                    _ = down.changed() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Takes one back from a gauge when the connection (or its ring) goes.
struct Gauge<'a>(&'a AtomicU64);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// While frames keep coming through a ring, the hub polls it this often…
const POLL_EVERY: Duration = Duration::from_millis(1);
/// …and goes to sleep on the socket after this many empty polls.
const IDLE_POLLS: u32 = 20;
/// Most bytes read from one socket before the frames in them are handled.
const READ_BATCH: usize = 1 << 20;

/// The hub's side of one PHP process's shared ring (`protocol::ring`). The
/// mutex serializes the connection's own task and the drains made before a
/// query is answered, so frames are handled once and in order.
pub(crate) struct RingReader {
    ring: Ring,
    scratch: Mutex<Vec<u8>>,
    broken: AtomicBool,
}

impl RingReader {
    /// Handles the frames in the ring up to `upto` (default: all); returns the
    /// bytes taken. An error means the ring (and its connection) is unusable.
    fn drain(&self, hub: &Hub, upto: Option<u64>) -> Result<usize, String> {
        if self.broken.load(Ordering::Relaxed) {
            return Err("the shared ring was found damaged".into());
        }
        let mut buf = lock(&self.scratch);
        buf.clear();
        let upto = upto.unwrap_or_else(|| self.ring.tail());
        let result = self
            .ring
            .take(upto, &mut buf)
            .map_err(|_| "the shared ring's indexes are damaged".to_string())
            .and_then(|n| {
                handle_frames(hub, &buf)?;
                Ok(n)
            });
        if buf.capacity() > 256 * 1024 {
            *buf = Vec::new();
        }
        if result.is_err() {
            self.broken.store(true, Ordering::Relaxed);
        }
        result
    }
}

/// Every whole frame in `buf`, each handled as an event; an error for a
/// malformed or partial frame, or a frame that has no business in a ring.
fn handle_frames(hub: &Hub, buf: &[u8]) -> Result<(), String> {
    let mut off = 0;
    while off < buf.len() {
        match ingest::frame_len(&buf[off..]) {
            Ok(Some((len, total))) => {
                let msg =
                    ingest::decode(&buf[off + 4..off + 4 + len]).map_err(|e| e.to_string())?;
                handle_event(hub, msg)?;
                off += total;
            }
            Ok(None) => return Err("a partial frame in the shared ring".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Before a query is answered: what PHP processes wrote into their rings
/// before asking is handled first.
fn drain_all_rings(hub: &Hub) {
    let rings: Vec<Arc<RingReader>> = {
        let mut list = lock(&hub.rings);
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    };
    for r in rings {
        let _ = r.drain(hub, None);
    }
}

/// recvmsg into the spare capacity of `buf`, keeping passed descriptors.
fn recv_with_fds(
    s: &UnixStream,
    buf: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    buf.reserve(64 * 1024);
    s.try_io(Interest::READABLE, || {
        let spare = buf.spare_capacity_mut();
        let mut iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: spare.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: msghdr is plain data pointing at live buffers; the CMSG
        // macros walk only within `control` (msg_controllen as the kernel set it).
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = libc::recvmsg(
                s.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            );
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                    for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                        let fd = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                        if fd >= 0 {
                            fds.push(OwnedFd::from_raw_fd(fd));
                        }
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            buf.set_len(buf.len() + n as usize);
            Ok(n as usize)
        }
    })
}

async fn connection(hub: Arc<Hub>, mut s: UnixStream, mut down: watch::Receiver<bool>) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    match s.peer_cred() {
        Ok(c) if c.uid() == euid => {}
        Ok(c) => {
            log(format_args!(
                "ingest connection from uid {} refused (the hub runs as uid {euid})",
                c.uid()
            ));
            Metrics::add(&hub.m.ingest_errors, 1);
            return;
        }
        Err(e) => {
            log(format_args!("ingest connection without credentials: {e}"));
            Metrics::add(&hub.m.ingest_errors, 1);
            return;
        }
    }
    Metrics::add(&hub.m.ingest_connections, 1);
    let _gauge = Gauge(&hub.m.ingest_connections);
    let mut ring: Option<(Arc<RingReader>, Gauge<'_>)> = None;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut reply: Vec<u8> = Vec::new();
    let mut idle_polls = 0u32;
    let close = |why: &str| {
        log(format_args!("ingest connection closed: {why}"));
        Metrics::add(&hub.m.ingest_errors, 1);
    };
    loop {
        // Wait: for the socket; with a busy ring, for the next poll too; with
        // an idle ring, asleep on the socket until a doorbell.
        let stop = match &ring {
            None => tokio::select! {
                _ = down.changed() => true,
                _ = s.readable() => false,
            },
            Some(_) if idle_polls < IDLE_POLLS => tokio::select! {
                _ = down.changed() => true,
                _ = s.readable() => false,
                _ = tokio::time::sleep(POLL_EVERY) => false,
            },
            Some((r, _)) => {
                let stop = if r.ring.try_sleep() {
                    tokio::select! {
                        _ = down.changed() => true,
                        _ = s.readable() => false,
                    }
                } else {
                    false
                };
                r.ring.wake();
                idle_polls = 0;
                stop
            }
        };
        if stop {
            if let Some((r, _)) = &ring {
                let _ = r.drain(&hub, None);
            }
            return;
        }
        // Frames written to the ring before this snapshot were preceded by
        // anything the process sent on the socket: read the socket first.
        let snapshot = ring.as_ref().map(|(r, _)| r.ring.tail());
        let mut eof = false;
        let before = buf.len();
        while buf.len() < READ_BATCH {
            match recv_with_fds(&s, &mut buf, &mut fds) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        let socket_bytes = buf.len() - before;
        for fd in fds.drain(..) {
            if ring.is_some() {
                continue; // one ring per connection; extra descriptors are closed
            }
            match Ring::open(fd) {
                Ok(r) => {
                    r.accept();
                    let reader = Arc::new(RingReader {
                        ring: r,
                        scratch: Mutex::new(Vec::new()),
                        broken: AtomicBool::new(false),
                    });
                    lock(&hub.rings).push(Arc::downgrade(&reader));
                    Metrics::add(&hub.m.ingest_rings, 1);
                    ring = Some((reader, Gauge(&hub.m.ingest_rings)));
                }
                Err(e) => {
                    // The process never learns it was refused before its
                    // frames vanish: close, it reconnects (and stops offering rings).
                    close(&format!("unusable shared ring: {e}"));
                    return;
                }
            }
        }
        // Frames that came over the socket.
        let mut off = 0;
        loop {
            match ingest::frame_len(&buf[off..]) {
                Ok(Some((len, total))) => {
                    let body = &buf[off + 4..off + 4 + len];
                    match ingest::decode(body) {
                        Ok(msg) => {
                            if let Err(e) = handle(&hub, msg, &mut reply).await {
                                close(&e);
                                return;
                            }
                        }
                        Err(e) => {
                            close(&e.to_string());
                            return;
                        }
                    }
                    off += total;
                }
                Ok(None) => break,
                Err(e) => {
                    close(&e.to_string());
                    return;
                }
            }
        }
        buf.drain(..off);
        // Then the ring (all of it if it arrived just now with the Hello).
        let mut ring_bytes = 0;
        if let Some((r, _)) = &ring {
            match r.drain(&hub, snapshot) {
                Ok(n) => ring_bytes = n,
                Err(e) => {
                    close(&e);
                    return;
                }
            }
            r.ring.beat(now_ms());
        }
        if socket_bytes > 0 || ring_bytes > 0 {
            idle_polls = 0;
        } else {
            idle_polls += 1;
        }
        if !reply.is_empty() {
            let w = tokio::time::timeout(Duration::from_secs(5), s.write_all(&reply)).await;
            if !matches!(w, Ok(Ok(()))) {
                return;
            }
            reply.clear();
            if reply.capacity() > 64 * 1024 {
                reply = Vec::new();
            }
        }
        if buf.is_empty() && buf.capacity() > 256 * 1024 {
            buf = Vec::with_capacity(64 * 1024);
        }
        if eof {
            // The process exited (or closed): what it wrote last is still in the ring.
            if let Some((r, _)) = &ring {
                let _ = r.drain(&hub, None);
            }
            return;
        }
    }
}

/// A frame from the socket: queries are answered into `reply`.
async fn handle(hub: &Hub, msg: IngestMessage, reply: &mut Vec<u8>) -> Result<(), String> {
    match msg {
        IngestMessage::QueryProgress { upload_id } => {
            drain_all_rings(hub);
            let mut data = lock(&hub.state).latest_upload_data(&upload_id);
            if let Some(b) = &hub.redis {
                // Other hosts may know newer events (this hub sees them only
                // while it has subscribers): the higher seq wins.
                if let Some(remote) = b.latest_upload_data(&upload_id).await {
                    let local_seq = data.as_deref().and_then(data_seq).unwrap_or(0);
                    if data.is_none() || data_seq(&remote).unwrap_or(0) > local_seq {
                        data = Some(remote);
                    }
                }
            }
            ingest::encode_raw(data.as_deref().unwrap_or("").as_bytes(), reply);
            Ok(())
        }
        IngestMessage::QueryStatus => {
            drain_all_rings(hub);
            ingest::encode_raw(hub.status_json().as_bytes(), reply);
            Ok(())
        }
        IngestMessage::Hello { version, dropped } => {
            Metrics::add(&hub.m.events_dropped, dropped);
            // Only a newer extension takes over: while old and new workers
            // overlap (rolling reload), an older one must not restart the hub.
            if version_newer(&version, &hub.version) {
                log(format_args!(
                    "a PHP process runs version {version:?} (this hub: {:?}): handing over",
                    hub.version
                ));
                hub.request_stop(format!("hand-over to version {version:?}"));
            }
            Ok(())
        }
        other => handle_event(hub, other),
    }
}

/// An event, from the socket or from a ring.
fn handle_event(hub: &Hub, msg: IngestMessage) -> Result<(), String> {
    match msg {
        IngestMessage::Wake => {}
        IngestMessage::Publish {
            channel,
            event,
            data,
        } => {
            if pusher::validate_channel(&channel).is_err()
                || pusher::validate_event(&event).is_err()
                || data.len() > MAX_EVENT_DATA
            {
                Metrics::add(&hub.m.events_in, 1);
                Metrics::add(&hub.m.events_dropped, 1);
                return Ok(());
            }
            let seq = data_seq(&data);
            dispatch(
                hub,
                Op::Event {
                    channel,
                    event,
                    data,
                    seq,
                    exclude: None,
                },
            );
        }
        IngestMessage::Progress(r) => dispatch(hub, Op::Progress(r)),
        IngestMessage::StreamEnd {
            upload_id,
            stream,
            outcome,
            stored_bytes,
            chunks_done,
        } => dispatch(
            hub,
            Op::StreamEnd {
                upload_id,
                stream,
                outcome,
                stored_bytes,
                chunks_done,
            },
        ),
        IngestMessage::Terminal {
            upload_id,
            event,
            fields,
        } => dispatch(
            hub,
            Op::Terminal {
                upload_id,
                event,
                fields,
            },
        ),
        IngestMessage::Hello { .. }
        | IngestMessage::QueryProgress { .. }
        | IngestMessage::QueryStatus => {
            return Err("a hello or a query inside the shared ring".into());
        }
    }
    Ok(())
}

/// True when semver `a` is newer than `b` (pre-release tags sort before the release).
fn version_newer(a: &str, b: &str) -> bool {
    fn parse(v: &str) -> (Vec<u64>, Option<&str>) {
        let (core, pre) = match v.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (v, None),
        };
        let core = core.split('+').next().unwrap_or(core);
        (
            core.split('.').map(|n| n.parse().unwrap_or(0)).collect(),
            pre,
        )
    }
    let (ca, pa) = parse(a.trim());
    let (cb, pb) = parse(b.trim());
    match ca.cmp(&cb) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => match (pa, pb) {
            (None, Some(_)) => true,
            (Some(x), Some(y)) => x > y,
            _ => false,
        },
    }
}

#[cfg(test)]
mod version_tests {
    use super::version_newer;

    #[test]
    fn only_newer_versions_take_over() {
        assert!(version_newer("0.2.0", "0.1.9"));
        assert!(version_newer("0.10.0", "0.9.0"));
        assert!(version_newer("1.0.0", "1.0.0-rc.1"));
        assert!(!version_newer("0.1.0", "0.1.0"));
        assert!(!version_newer("0.1.0", "0.2.0"));
        assert!(!version_newer("1.0.0-rc.1", "1.0.0"));
    }
}
