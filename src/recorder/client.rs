//! The PHP side of the ingest socket: one Unix stream connection per process,
//! opened on first use and kept across requests. Sends never block: a full
//! socket buffer or a missing hub costs a dropped event and a counter.

use crate::protocol::ingest::{self, IngestMessage};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Why a connection attempt failed, as far as spawning a hub is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// Nobody listens on the name: a hub may be spawned.
    NoHub,
    /// Something else (backlog full, resource limits): just try later.
    Other(i32),
    /// A process of another uid holds the name (a squatter on the predictable
    /// abstract name): nothing is written to it, and no hub is spawned.
    Foreign(u32),
}

/// Why a query got no answer.
#[derive(Debug, PartialEq, Eq)]
pub enum QueryError {
    /// No hub, a timeout or a malformed answer.
    NoAnswer,
    /// The listener belongs to another uid: it was not asked anything.
    Foreign(u32),
}

pub struct IngestClient {
    socket_name: String,
    version: String,
    fd: Option<OwnedFd>,
    /// Tail of a frame the kernel took only partly; sent before anything else
    /// so the stream never carries half a frame followed by another.
    pending: Vec<u8>,
    frame: Vec<u8>,
    dropped_total: u64,
    dropped_unreported: u64,
    last_attempt: Option<Instant>,
    /// Uid of a foreign process found holding the name at the last attempt.
    foreign: Option<u32>,
}

/// Builds a `sockaddr_un` for a path or an `@abstract` name.
pub fn sockaddr(name: &str) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (bytes, abstract_name) = match name.strip_prefix('@') {
        Some(rest) => (rest.as_bytes(), true),
        None => (name.as_bytes(), false),
    };
    let offset = usize::from(abstract_name);
    if bytes.is_empty() || bytes.len() + offset >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket name {name:?} is empty or too long"),
        ));
    }
    for (i, b) in bytes.iter().enumerate() {
        addr.sun_path[i + offset] = *b as libc::c_char;
    }
    let base = std::mem::size_of::<libc::sa_family_t>();
    let len = if abstract_name {
        base + 1 + bytes.len()
    } else {
        base + bytes.len() + 1
    };
    Ok((addr, len as libc::socklen_t))
}

fn stream_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let flags =
        libc::SOCK_STREAM | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The effective uid of this process: the only uid a hub of ours runs as.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid never fails.
    unsafe { libc::geteuid() }
}

/// The uid of the process at the other end of a connected Unix socket (for a
/// listening peer: the one that called listen()).
pub fn peer_uid(fd: &OwnedFd) -> io::Result<u32> {
    // SAFETY: ucred is plain old data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt with a buffer of the size it is told.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Ok when the peer runs as our euid; `Foreign(uid)` otherwise. A peer whose
/// credentials cannot be read is not trusted either.
fn check_peer(fd: &OwnedFd) -> Result<(), u32> {
    match peer_uid(fd) {
        Ok(uid) if uid == own_uid() => Ok(()),
        Ok(uid) => Err(uid),
        Err(_) => Err(u32::MAX),
    }
}

/// Who listens on `name`: `Some(uid)` of the listener, `None` when nobody
/// accepts (or the name cannot be reached). Nothing is written.
pub fn holder_uid(name: &str) -> Option<u32> {
    let fd = stream_socket(true).ok()?;
    connect(&fd, name).ok()?;
    peer_uid(&fd).ok()
}

fn connect(fd: &OwnedFd, name: &str) -> io::Result<()> {
    let (addr, len) = sockaddr(name)?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends as much of `buf` as the socket takes without waiting.
fn send_nowait(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl IngestClient {
    pub fn new(socket_name: String, version: String) -> Self {
        IngestClient {
            socket_name,
            version,
            fd: None,
            pending: Vec::new(),
            frame: Vec::with_capacity(512),
            dropped_total: 0,
            dropped_unreported: 0,
            last_attempt: None,
            foreign: None,
        }
    }

    /// The uid of another user's process found on the socket name at the
    /// last connection attempt, if any.
    pub fn foreign_holder(&self) -> Option<u32> {
        self.foreign
    }

    pub fn socket_name(&self) -> &str {
        &self.socket_name
    }

    pub fn is_connected(&self) -> bool {
        self.fd.is_some()
    }

    /// Events this process dropped since it started.
    pub fn dropped(&self) -> u64 {
        self.dropped_total
    }

    /// Detects a hub that went away since the last request (peer closed), so
    /// the next send reconnects instead of failing once.
    pub fn check_alive(&mut self) {
        let Some(fd) = &self.fd else { return };
        let mut byte = 0u8;
        // SAFETY: one-byte peek into a stack buffer.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let gone = n == 0
            || (n < 0 && {
                let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                e != libc::EAGAIN && e != libc::EWOULDBLOCK
            });
        if gone {
            self.disconnect();
        }
    }

    fn disconnect(&mut self) {
        self.fd = None;
        if !self.pending.is_empty() {
            self.pending.clear();
            self.count_drop();
        }
    }

    fn count_drop(&mut self) {
        self.dropped_total += 1;
        self.dropped_unreported += 1;
    }

    /// Opens the connection and says hello. `force` skips the retry pause.
    pub fn connect(&mut self, force: bool) -> Result<(), ConnectError> {
        if self.fd.is_some() {
            return Ok(());
        }
        let now = Instant::now();
        if !force {
            if let Some(t) = self.last_attempt {
                if now.duration_since(t) < Duration::from_millis(200) {
                    return Err(ConnectError::Other(libc::EAGAIN));
                }
            }
        }
        self.last_attempt = Some(now);
        let fd =
            stream_socket(true).map_err(|e| ConnectError::Other(e.raw_os_error().unwrap_or(0)))?;
        if let Err(e) = connect(&fd, &self.socket_name) {
            let code = e.raw_os_error().unwrap_or(0);
            return Err(if code == libc::ECONNREFUSED || code == libc::ENOENT {
                self.foreign = None;
                ConnectError::NoHub
            } else {
                ConnectError::Other(code)
            });
        }
        // The name is predictable and abstract names have no permissions: make
        // sure the listener is our own hub before a single byte (even Hello)
        // goes out.
        if let Err(uid) = check_peer(&fd) {
            self.foreign = Some(uid);
            return Err(ConnectError::Foreign(uid));
        }
        self.foreign = None;
        self.fd = Some(fd);
        self.pending.clear();
        let mut hello = Vec::with_capacity(32);
        ingest::encode(
            &IngestMessage::Hello {
                version: self.version.clone(),
                dropped: self.dropped_unreported,
            },
            &mut hello,
        );
        if self.write_frame(&hello) {
            self.dropped_unreported = 0;
        }
        Ok(())
    }

    /// Sends one encoded frame on the open connection; false when dropped.
    fn write_frame(&mut self, frame: &[u8]) -> bool {
        let Some(fd) = &self.fd else { return false };
        if !self.pending.is_empty() {
            match send_nowait(fd, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.disconnect();
                    return false;
                }
            }
            if !self.pending.is_empty() {
                return false;
            }
        }
        match send_nowait(fd, frame) {
            Ok(n) if n == frame.len() => true,
            Ok(n) => {
                // The frame is committed to the stream: its tail must follow.
                self.pending.extend_from_slice(&frame[n..]);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(_) => {
                self.disconnect();
                false
            }
        }
    }

    /// Sends a frame, reconnecting once if the hub went away. `on_no_hub` runs
    /// when nobody listens (the caller may spawn a hub); returns whether the
    /// frame was handed to the kernel.
    pub fn send_frame(&mut self, frame: &[u8], on_no_hub: &mut dyn FnMut()) -> bool {
        for attempt in 0..2 {
            if self.fd.is_none() {
                match self.connect(attempt > 0) {
                    Ok(()) => {}
                    Err(ConnectError::NoHub) => {
                        on_no_hub();
                        // The spawner binds the socket before the hub runs, so a
                        // connect right after a spawn already succeeds.
                        if self.connect(true).is_err() {
                            break;
                        }
                    }
                    Err(ConnectError::Other(_) | ConnectError::Foreign(_)) => break,
                }
            }
            if self.write_frame(frame) {
                return true;
            }
            if self.fd.is_some() {
                // Connected but full: a dropped event, not a dead hub.
                break;
            }
        }
        self.count_drop();
        false
    }

    pub fn send(&mut self, msg: &IngestMessage, on_no_hub: &mut dyn FnMut()) -> bool {
        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        ingest::encode(msg, &mut frame);
        let ok = self.send_frame(&frame, on_no_hub);
        self.frame = frame;
        ok
    }

    /// The publish() hot path: encodes into the reused buffer.
    pub fn publish(
        &mut self,
        channel: &str,
        event: &str,
        data: &str,
        on_no_hub: &mut dyn FnMut(),
    ) -> bool {
        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        ingest::encode_publish(channel, event, data, &mut frame, 0);
        let ok = self.send_frame(&frame, on_no_hub);
        self.frame = frame;
        ok
    }

    /// A request/response exchange on a separate short-lived blocking
    /// connection (the shared one must never wait), bounded by `timeout`.
    pub fn query(&self, msg: &IngestMessage, timeout: Duration) -> Result<Vec<u8>, QueryError> {
        let fd = stream_socket(false).map_err(|_| QueryError::NoAnswer)?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: setsockopt with a timeval of the right size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
            }
        }
        connect(&fd, &self.socket_name).map_err(|_| QueryError::NoAnswer)?;
        // A squatter would answer progress() and hub_status() with anything.
        check_peer(&fd).map_err(QueryError::Foreign)?;
        let mut frame = Vec::new();
        ingest::encode(
            &IngestMessage::Hello {
                version: self.version.clone(),
                dropped: 0,
            },
            &mut frame,
        );
        ingest::encode(msg, &mut frame);
        let mut file = std::fs::File::from(fd);
        use std::io::{Read, Write};
        file.write_all(&frame).map_err(|_| QueryError::NoAnswer)?;
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            if let Ok(Some((len, total))) = ingest::frame_len(&buf) {
                return Ok(buf[4..4 + len.min(total - 4)].to_vec());
            }
            if Instant::now() > deadline {
                return Err(QueryError::NoAnswer);
            }
            match file.read(&mut chunk) {
                Ok(0) | Err(_) => return Err(QueryError::NoAnswer),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;
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
        let (addr, len) = sockaddr(name).unwrap();
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
                if libc::bind(l, (&addr as *const libc::sockaddr_un).cast(), len) != 0
                    || libc::listen(l, 8) != 0
                {
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
        let (addr, len) = sockaddr(&name).unwrap();
        let lfd = stream_socket(false).unwrap();
        // SAFETY: test-only bind/listen on an abstract name.
        unsafe {
            assert_eq!(
                libc::bind(
                    lfd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_un).cast(),
                    len
                ),
                0
            );
            assert_eq!(libc::listen(lfd.as_raw_fd(), 8), 0);
        }
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
}
