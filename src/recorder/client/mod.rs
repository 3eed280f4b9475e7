//! The PHP side of the ingest socket: one Unix stream connection per process,
//! opened on first use and kept across requests. Sends never block: when the
//! socket buffer is full, frames wait in a per-process queue (`queue`), flushed
//! before any new frame and, with a wait of a few ms at most, at request end.
//! Progress frames coalesce there (the latest wins); terminal frames keep their
//! order; only beyond the queue's bounds, or without a hub, is an event dropped.

mod queue;
mod sock;

pub use queue::{publish_class, Class};
pub use sock::{own_uid, peer_uid, sock_addr};

use crate::protocol::ingest::{self, IngestMessage};
use queue::{Pushed, Queue};
use socket2::Socket;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// Longest wait for room in the socket at request end.
pub const END_OF_REQUEST_WAIT: Duration = Duration::from_millis(5);

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
    sock: Option<Socket>,
    /// Frames the socket had no room for, in order (see `queue`).
    queue: Queue,
    frame: Vec<u8>,
    dropped_total: u64,
    dropped_unreported: u64,
    coalesced_total: u64,
    last_attempt: Option<Instant>,
    /// Uid of a foreign process found holding the name at the last attempt.
    foreign: Option<u32>,
}

/// Ok when the peer runs as our euid; `Foreign(uid)` otherwise. A peer whose
/// credentials cannot be read is not trusted either.
fn check_peer(s: &Socket) -> Result<(), u32> {
    match peer_uid(s.as_fd()) {
        Ok(uid) if uid == own_uid() => Ok(()),
        Ok(uid) => Err(uid),
        Err(_) => Err(u32::MAX),
    }
}

/// Who listens on `name`: `Some(uid)` of the listener, `None` when nobody
/// accepts (or the name cannot be reached). Nothing is written.
pub fn holder_uid(name: &str) -> Option<u32> {
    let s = sock::stream_socket(true).ok()?;
    sock::connect(&s, name).ok()?;
    peer_uid(s.as_fd()).ok()
}

/// Binds and listens on `name` (the hub's ingest socket).
pub fn listen(name: &str) -> io::Result<Socket> {
    sock::listen(name, 1024)
}

/// The queue class of an ingest message: progress coalesces per upload stream;
/// `StreamEnd` and terminal events are kept in order.
fn class_of(msg: &IngestMessage) -> Class<'_> {
    match msg {
        IngestMessage::Progress(p) => Class::Progress {
            key: &p.upload_id,
            stream: p.stream,
        },
        IngestMessage::StreamEnd { upload_id, .. } | IngestMessage::Terminal { upload_id, .. } => {
            Class::Keep {
                key: upload_id,
                terminal: true,
            }
        }
        IngestMessage::Publish { channel, event, .. } => publish_class(channel, event),
        _ => Class::Keep {
            key: "",
            terminal: false,
        },
    }
}

impl IngestClient {
    pub fn new(socket_name: String, version: String) -> Self {
        IngestClient {
            socket_name,
            version,
            sock: None,
            queue: Queue::default(),
            frame: Vec::with_capacity(512),
            dropped_total: 0,
            dropped_unreported: 0,
            coalesced_total: 0,
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
        self.sock.is_some()
    }

    /// Events this process dropped since it started.
    pub fn dropped(&self) -> u64 {
        self.dropped_total
    }

    /// Progress events this process replaced by a newer one of the same stream or
    /// channel while the socket was full (not lost: the latest went out).
    pub fn coalesced(&self) -> u64 {
        self.coalesced_total
    }

    /// Frames waiting for room in the socket.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Detects a hub that went away since the last request (peer closed), so
    /// the next send reconnects instead of failing once.
    pub fn check_alive(&mut self) {
        if self.sock.as_ref().is_some_and(sock::peer_gone) {
            self.disconnect();
        }
    }

    fn disconnect(&mut self) {
        self.sock = None;
        if self.queue.reset_stream() {
            self.count_drop();
        }
    }

    fn count_drop(&mut self) {
        self.dropped_total += 1;
        self.dropped_unreported += 1;
    }

    /// Opens the connection and says hello. `force` skips the retry pause.
    pub fn connect(&mut self, force: bool) -> Result<(), ConnectError> {
        if self.sock.is_some() {
            return Ok(());
        }
        let now = Instant::now();
        if !force
            && self
                .last_attempt
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(200))
        {
            return Err(ConnectError::Other(libc::EAGAIN));
        }
        self.last_attempt = Some(now);
        let code = |e: io::Error| e.raw_os_error().unwrap_or(0);
        let s = sock::stream_socket(true).map_err(|e| ConnectError::Other(code(e)))?;
        if let Err(e) = sock::connect(&s, &self.socket_name) {
            let code = code(e);
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
        if let Err(uid) = check_peer(&s) {
            self.foreign = Some(uid);
            return Err(ConnectError::Foreign(uid));
        }
        self.foreign = None;
        let mut hello = Vec::with_capacity(32);
        ingest::encode(
            &IngestMessage::Hello {
                version: self.version.clone(),
                dropped: self.dropped_unreported,
            },
            &mut hello,
        );
        // An empty new connection takes the few bytes of Hello whole, or is no use.
        match sock::send_nowait(&s, &hello) {
            Ok(n) if n == hello.len() => self.dropped_unreported = 0,
            Ok(_) => return Err(ConnectError::Other(libc::EAGAIN)),
            Err(e) => return Err(ConnectError::Other(code(e))),
        }
        self.sock = Some(s);
        Ok(())
    }

    /// Writes queued frames while the socket takes them; false when the connection broke.
    fn flush_queue(&mut self) -> bool {
        let Some(s) = &self.sock else { return false };
        while let Some(front) = self.queue.front() {
            match sock::send_nowait(s, front) {
                Ok(n) => {
                    let whole = n == front.len();
                    self.queue.advance(n);
                    if !whole {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => {
                    self.disconnect();
                    return false;
                }
            }
        }
        true
    }

    /// Sends queued frames, waiting at most `wait` for room (request end).
    pub fn flush(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while self.flush_queue() && !self.queue.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(s) = &self.sock else { return };
            if left.is_zero() || !sock::wait_writable(s, left) {
                return;
            }
        }
    }

    /// Hands one encoded frame to the connection (after what waits in the queue);
    /// false when it was dropped.
    fn write_frame(&mut self, frame: &[u8], class: Class<'_>) -> bool {
        if !self.flush_queue() {
            return false;
        }
        let Some(s) = &self.sock else { return false };
        if self.queue.is_empty() {
            match sock::send_nowait(s, frame) {
                Ok(n) if n == frame.len() => return true,
                Ok(n) => {
                    // The frame is committed to the stream: its tail must follow.
                    self.queue.push_sent(frame, n, class);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.disconnect();
                    return false;
                }
            }
        }
        match self.queue.push(frame, class) {
            Pushed::Queued => true,
            Pushed::Coalesced => {
                self.coalesced_total += 1;
                true
            }
            Pushed::Dropped => false,
        }
    }

    /// Sends a frame, reconnecting once if the hub went away. `on_no_hub` runs
    /// when nobody listens (the caller may spawn a hub); returns whether the
    /// frame was handed to the kernel or queued.
    pub fn send_frame(
        &mut self,
        frame: &[u8],
        class: Class<'_>,
        on_no_hub: &mut dyn FnMut(),
    ) -> bool {
        for attempt in 0..2 {
            if self.sock.is_none() {
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
            if self.write_frame(frame, class) {
                return true;
            }
            if self.sock.is_some() {
                // Connected but the queue is full: a dropped event, not a dead hub.
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
        let ok = self.send_frame(&frame, class_of(msg), on_no_hub);
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
        let ok = self.send_frame(&frame, publish_class(channel, event), on_no_hub);
        self.frame = frame;
        ok
    }

    /// A request/response exchange on a separate short-lived blocking
    /// connection (the shared one must never wait), bounded by `timeout`.
    pub fn query(&self, msg: &IngestMessage, timeout: Duration) -> Result<Vec<u8>, QueryError> {
        let mut s = sock::stream_socket(false).map_err(|_| QueryError::NoAnswer)?;
        sock::set_timeouts(&s, timeout).map_err(|_| QueryError::NoAnswer)?;
        sock::connect(&s, &self.socket_name).map_err(|_| QueryError::NoAnswer)?;
        // A squatter would answer progress() and hub_status() with anything.
        check_peer(&s).map_err(QueryError::Foreign)?;
        let mut frame = Vec::new();
        ingest::encode(
            &IngestMessage::Hello {
                version: self.version.clone(),
                dropped: 0,
            },
            &mut frame,
        );
        ingest::encode(msg, &mut frame);
        s.write_all(&frame).map_err(|_| QueryError::NoAnswer)?;
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
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return Err(QueryError::NoAnswer),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
