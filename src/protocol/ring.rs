//! A shared-memory ring per PHP process for ingest frames: `publish()` and the
//! progress reports become a memory copy instead of a `send()` system call.
//!
//! The PHP process creates the ring (a memfd) and passes it to the hub with
//! the Hello frame (`SCM_RIGHTS`); the socket stays open for liveness and as a
//! doorbell. Single producer (the PHP process), single consumer (the hub):
//!
//! - The producer copies whole frames (the usual length-prefixed ones) at
//!   `tail`, then publishes the new `tail` (release). A frame that does not fit
//!   is dropped, like a full socket.
//! - The consumer copies `[head, tail)` out of the shared memory before it
//!   parses anything (the producer cannot change what is being decoded), then
//!   publishes the new `head`.
//! - While the hub is busy it polls the ring every millisecond (so a burst of
//!   events costs no system call at all); once idle it sets `sleeping`, checks
//!   the ring once more, and waits on the socket. A producer that finds
//!   `sleeping` set after writing clears it and sends a one-frame doorbell.
//!   Both sides store, then fence (SeqCst), then load the other's word, so a
//!   frame is never left behind with the hub asleep.
//! - While polling, the hub stamps `heartbeat_ms`; a producer that sees the
//!   stamp stale checks the socket (the hub may have died while awake).
//!
//! Nothing in the shared header is trusted: indexes out of range disable the
//! ring (the hub closes that connection; the PHP process falls back to a new
//! connection).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Bytes of frames a ring holds: about 1 700 progress or publish frames of
/// 300 bytes (a socket buffer holds about 170).
pub const RING_CAPACITY: usize = 512 * 1024;
const HEADER_BYTES: usize = 256;
const MAGIC: u32 = 0x5550_5231; // "UPR1"

#[repr(C)]
struct Header {
    magic: AtomicU32,
    capacity: AtomicU32,
    /// Set by the hub once it mapped the ring.
    accepted: AtomicU32,
    /// Set by the hub before it waits on the socket; cleared by whoever wakes it.
    sleeping: AtomicU32,
    _pad0: [u8; 48],
    head: AtomicU64,
    _pad1: [u8; 56],
    tail: AtomicU64,
    _pad2: [u8; 56],
    heartbeat_ms: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES);

/// A mapped ring; the producer and the consumer each hold one.
pub struct Ring {
    base: *mut u8,
    map_len: usize,
    capacity: u64,
    fd: OwnedFd,
}

// SAFETY: the mapping is shared memory accessed through atomics (header) and
// through copies guarded by the head/tail protocol (data); the pointer stays
// valid until Drop.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

/// What [`Ring::push`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Written; `wake`: the hub sleeps, send it a doorbell.
    Written { wake: bool },
    /// Not enough room: the frame is dropped.
    Full,
    /// The header is damaged: stop using this ring.
    Broken,
}

/// A ring whose shared indexes make no sense.
#[derive(Debug, PartialEq, Eq)]
pub struct Corrupt;

impl Ring {
    /// A new ring in a memfd (producer side).
    pub fn create() -> io::Result<Ring> {
        let name = c"upload-progress-ring";
        // SAFETY: memfd_create with a valid C string.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = HEADER_BYTES + RING_CAPACITY;
        // SAFETY: ftruncate on our memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let ring = Ring::map(fd, len)?;
        let h = ring.header();
        h.capacity.store(RING_CAPACITY as u32, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(ring)
    }

    /// Maps a ring received from a PHP process (consumer side), checking its
    /// size and header.
    pub fn open(fd: OwnedFd) -> io::Result<Ring> {
        // SAFETY: fstat into a zeroed stat buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = HEADER_BYTES + RING_CAPACITY;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size as u64 != len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a ring: {} bytes", st.st_size),
            ));
        }
        let ring = Ring::map(fd, len)?;
        let h = ring.header();
        if h.magic.load(Ordering::Acquire) != MAGIC
            || h.capacity.load(Ordering::Relaxed) as usize != RING_CAPACITY
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad ring header",
            ));
        }
        Ok(ring)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Ring> {
        // SAFETY: a fresh shared mapping of a file of at least `len` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Ring {
            base: p.cast(),
            map_len: len,
            capacity: RING_CAPACITY as u64,
            fd,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with HEADER_BYTES for the header, page aligned.
        unsafe { &*(self.base as *const Header) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: within the mapping.
        unsafe { self.base.add(HEADER_BYTES) }
    }

    // ---- producer ----

    /// True once the hub mapped this ring.
    pub fn accepted(&self) -> bool {
        self.header().accepted.load(Ordering::Acquire) != 0
    }

    /// Copies one whole frame into the ring.
    pub fn push(&self, frame: &[u8]) -> Push {
        let h = self.header();
        let tail = h.tail.load(Ordering::Relaxed);
        let head = h.head.load(Ordering::Acquire);
        let used = tail.wrapping_sub(head);
        if used > self.capacity {
            return Push::Broken;
        }
        let len = frame.len() as u64;
        if len > self.capacity - used {
            return Push::Full;
        }
        self.copy_in(tail, frame);
        h.tail.store(tail + len, Ordering::Release);
        fence(Ordering::SeqCst);
        let wake =
            h.sleeping.load(Ordering::Relaxed) != 0 && h.sleeping.swap(0, Ordering::AcqRel) != 0;
        Push::Written { wake }
    }

    /// The hub's last stamp while it was awake (unix ms), 0 before the first.
    pub fn heartbeat_ms(&self) -> u64 {
        self.header().heartbeat_ms.load(Ordering::Relaxed)
    }

    /// The hub waits for a doorbell.
    pub fn hub_sleeping(&self) -> bool {
        self.header().sleeping.load(Ordering::Relaxed) != 0
    }

    fn copy_in(&self, at: u64, bytes: &[u8]) {
        let pos = (at % self.capacity) as usize;
        let first = bytes.len().min(self.capacity as usize - pos);
        // SAFETY: both ranges are inside the data area; the consumer does not
        // read [tail, tail + len) before the release store of the new tail.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data().add(pos), first);
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr().add(first),
                self.data(),
                bytes.len() - first,
            );
        }
    }

    // ---- consumer ----

    /// Marks the ring as mapped by the hub.
    pub fn accept(&self) {
        self.header().accepted.store(1, Ordering::Release);
    }

    /// The producer's current tail, for a snapshot taken before reading the socket.
    pub fn tail(&self) -> u64 {
        self.header().tail.load(Ordering::Acquire)
    }

    /// Appends the bytes in `[head, upto)` to `out` and frees them; returns how
    /// many. `upto` comes from [`Ring::tail`].
    pub fn take(&self, upto: u64, out: &mut Vec<u8>) -> Result<usize, Corrupt> {
        let h = self.header();
        let head = h.head.load(Ordering::Relaxed);
        let n = upto.wrapping_sub(head);
        if n > self.capacity {
            return Err(Corrupt);
        }
        if n == 0 {
            return Ok(0);
        }
        let pos = (head % self.capacity) as usize;
        let first = (n as usize).min(self.capacity as usize - pos);
        out.reserve(n as usize);
        // SAFETY: [head, upto) was published by the producer's release store
        // (read with acquire in tail()); both ranges are in the data area.
        unsafe {
            let data = self.data();
            out.extend_from_slice(std::slice::from_raw_parts(data.add(pos), first));
            out.extend_from_slice(std::slice::from_raw_parts(data, n as usize - first));
        }
        h.head.store(upto, Ordering::Release);
        Ok(n as usize)
    }

    /// Stamps the heartbeat (unix ms) while polling.
    pub fn beat(&self, now_ms: u64) {
        self.header().heartbeat_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Before waiting on the socket: sets `sleeping`, then true when the ring
    /// is still empty (safe to wait); false (and awake again) when a frame
    /// arrived meanwhile.
    pub fn try_sleep(&self) -> bool {
        let h = self.header();
        h.sleeping.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if h.tail.load(Ordering::Relaxed) != h.head.load(Ordering::Relaxed) {
            h.sleeping.store(0, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Awake again (woken by the socket, a doorbell or shutdown).
    pub fn wake(&self) {
        self.header().sleeping.store(0, Ordering::Relaxed);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe {
            libc::munmap(self.base.cast(), self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Ring, Ring) {
        let producer = Ring::create().unwrap();
        // SAFETY: dup of a valid descriptor.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(producer.fd().as_raw_fd())) };
        let consumer = Ring::open(dup).unwrap();
        consumer.accept();
        (producer, consumer)
    }

    #[test]
    fn frames_cross_in_order_and_wrap_around() {
        let (p, c) = pair();
        assert!(p.accepted());
        let mut got = Vec::new();
        let mut sent = Vec::new();
        // ~3 laps of the ring with frames of odd sizes.
        for i in 0..6000u32 {
            let frame: Vec<u8> = (0..(i % 700 + 1)).map(|b| (b as u8) ^ (i as u8)).collect();
            match p.push(&frame) {
                Push::Written { wake } => assert!(!wake),
                other => panic!("{other:?} at {i}"),
            }
            sent.extend_from_slice(&frame);
            if i % 97 == 0 {
                c.take(c.tail(), &mut got).unwrap();
            }
        }
        c.take(c.tail(), &mut got).unwrap();
        assert_eq!(got, sent);
    }

    #[test]
    fn a_full_ring_drops_and_recovers() {
        let (p, c) = pair();
        let frame = vec![7u8; 1000];
        let mut n = 0;
        while p.push(&frame) != Push::Full {
            n += 1;
        }
        assert_eq!(n, RING_CAPACITY / 1000);
        let mut out = Vec::new();
        assert_eq!(c.take(c.tail(), &mut out).unwrap(), n * 1000);
        assert!(matches!(p.push(&frame), Push::Written { .. }));
    }

    #[test]
    fn doorbell_only_when_the_hub_sleeps() {
        let (p, c) = pair();
        assert!(c.try_sleep());
        assert!(p.hub_sleeping());
        assert_eq!(p.push(b"abc"), Push::Written { wake: true });
        // The producer cleared the flag: one doorbell per sleep.
        assert_eq!(p.push(b"def"), Push::Written { wake: false });
        // Data waiting: the hub must not go to sleep.
        assert!(!c.try_sleep());
        assert!(!p.hub_sleeping());
        let mut out = Vec::new();
        c.take(c.tail(), &mut out).unwrap();
        assert_eq!(out, b"abcdef");
        assert!(c.try_sleep());
        c.wake();
        assert_eq!(p.push(b"g"), Push::Written { wake: false });
    }

    #[test]
    fn damaged_indexes_are_refused_not_followed() {
        let (p, c) = pair();
        p.push(b"hello").unwrap_written();
        // A producer (or anyone mapping the memfd) writes a tail far ahead.
        c.header().tail.store(u64::MAX / 2, Ordering::Relaxed);
        let mut out = Vec::new();
        assert_eq!(c.take(c.tail(), &mut out), Err(Corrupt));
        assert!(out.is_empty());
        assert_eq!(p.push(b"x"), Push::Broken);
    }

    #[test]
    fn only_rings_are_opened() {
        let f = tempfile::tempfile().unwrap();
        assert!(Ring::open(OwnedFd::from(f)).is_err());
        let f = tempfile::tempfile().unwrap();
        f.set_len((HEADER_BYTES + RING_CAPACITY) as u64).unwrap();
        assert!(Ring::open(OwnedFd::from(f)).is_err(), "no magic");
    }

    impl Push {
        fn unwrap_written(self) {
            assert!(matches!(self, Push::Written { .. }), "{self:?}");
        }
    }
}
