//! Chunk writes in progress on this thread, so that a write abandoned without unwinding can
//! be cleaned up later.
//!
//! In PHP a fatal error or a timeout inside `writeChunk`'s body read is a `longjmp` (bailout)
//! over the Rust frames of [`super::Store::write_chunk`]: their destructors never run, so the
//! lock file (holding the chunk's OFD lock) and the data file would stay open, and the lock
//! held, for the life of the worker, with the chunk's range still reserved. Every write
//! therefore registers its descriptors and the range to give back here while it runs;
//! [`release_abandoned`] (called by the PHP layer when it catches the bailout, and at request
//! end and start) punches the range and closes the descriptors of writes whose frames were
//! skipped. A write that returns normally (or unwinds) removes its entry itself.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

struct Slot {
    token: u64,
    fds: Vec<RawFd>,
    /// (descriptor of the data file, offset, len): the range to punch when abandoned.
    punch: Option<(RawFd, u64, u64)>,
}

thread_local! {
    static SLOTS: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
    static NEXT: Cell<u64> = const { Cell::new(1) };
}

/// The registration of one chunk write; dropping it (normal return) forgets the entry.
pub(crate) struct InFlight {
    token: u64,
}

impl InFlight {
    pub(crate) fn new() -> InFlight {
        let token = NEXT.with(|n| {
            let t = n.get();
            n.set(t.wrapping_add(1));
            t
        });
        SLOTS.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                s.push(Slot {
                    token,
                    fds: Vec::new(),
                    punch: None,
                });
            }
        });
        InFlight { token }
    }

    fn with(&self, f: impl FnOnce(&mut Slot)) {
        SLOTS.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                if let Some(slot) = s.iter_mut().find(|x| x.token == self.token) {
                    f(slot);
                }
            }
        });
    }

    /// A descriptor the write owns (closed when abandoned).
    pub(crate) fn hold(&self, file: &File) {
        self.hold_fd(file.as_raw_fd());
    }

    /// [`InFlight::hold`] for a descriptor of a directory handle.
    pub(crate) fn hold_fd(&self, fd: RawFd) {
        self.with(|s| s.fds.push(fd));
    }

    /// The range of `data` to punch when abandoned.
    pub(crate) fn punch_on_abandon(&self, data: &File, offset: u64, len: u64) {
        let fd = data.as_raw_fd();
        self.with(|s| s.punch = Some((fd, offset, len)));
    }

    /// Nothing to punch any more (the chunk is durable).
    pub(crate) fn keep_data(&self) {
        self.with(|s| s.punch = None);
    }

    /// `file` is about to be closed by its owner.
    pub(crate) fn forget(&self, file: &File) {
        let fd = file.as_raw_fd();
        self.with(|s| {
            s.fds.retain(|&x| x != fd);
            if s.punch.is_some_and(|(p, _, _)| p == fd) {
                s.punch = None;
            }
        });
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        SLOTS.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                s.retain(|x| x.token != self.token);
            }
        });
    }
}

/// Cleans up the chunk writes of this thread whose frames were skipped (see the module
/// documentation): punches their reserved ranges and closes their descriptors, which
/// releases their chunk locks. Returns how many there were. Only call it when no write is
/// running on this thread (between requests, or after catching a bailout).
pub fn release_abandoned() -> usize {
    let slots = SLOTS.with(|s| s.try_borrow_mut().map(|mut s| std::mem::take(&mut *s)));
    let Ok(slots) = slots else { return 0 };
    let n = slots.len();
    for slot in slots {
        if let Some((fd, offset, len)) = slot.punch {
            // SAFETY: the descriptor belongs to a `File` whose frame was skipped by the
            // bailout, so nothing else closes or uses it; it is borrowed for the call.
            let f = std::mem::ManuallyDrop::new(unsafe {
                <File as std::os::fd::FromRawFd>::from_raw_fd(fd)
            });
            let _ = super::sys::release(&f, offset, len);
        }
        for fd in slot.fds {
            // SAFETY: as above: the owner will never close it; we are the only one.
            unsafe { libc::close(fd) };
        }
    }
    n
}

/// Writes in progress on this thread (tests).
#[cfg(test)]
pub(crate) fn count() -> usize {
    SLOTS.with(|s| s.borrow().len())
}
