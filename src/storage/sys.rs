//! Thin wrappers over the Linux calls the store needs: OFD byte-range locks, fallocate,
//! statvfs and directory fsync.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// An exclusive open-file-description (OFD) lock on one byte of a file.
///
/// OFD locks (`F_OFD_SETLKW`) belong to the open file description, not to the process: two
/// `File`s opened separately conflict even inside one process (so threads behave like
/// processes), the kernel drops the lock when the last descriptor of the description is
/// closed (a SIGKILLed holder leaves no stale lock), and Linux NFS clients forward them to the
/// server, so hosts that share the directory exclude each other too.
/// The lock is released when the guard is dropped.
pub(crate) struct ByteLock<'a> {
    file: &'a File,
    byte: u64,
}

impl<'a> ByteLock<'a> {
    /// Waits until the exclusive lock on `byte` of `file` is ours (tests only: production
    /// waits are bounded, see [`ByteLock::acquire_within`]).
    #[cfg(test)]
    pub(crate) fn acquire(file: &'a File, byte: u64) -> io::Result<ByteLock<'a>> {
        loop {
            match set_lock(file, byte, libc::F_WRLCK, true) {
                Ok(()) => return Ok(ByteLock { file, byte }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes the exclusive lock on `byte`, waiting at most `wait`; `Ok(None)` when it is
    /// still held by someone else then. Polls with `F_OFD_SETLK` (1 ms doubling to 50 ms)
    /// instead of blocking in `F_OFD_SETLKW`: a blocked waiter could only be freed by a
    /// signal, and PHP must never wait forever behind a request that trickles its body.
    pub(crate) fn acquire_within(
        file: &'a File,
        byte: u64,
        wait: Duration,
    ) -> io::Result<Option<ByteLock<'a>>> {
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(lock) = ByteLock::try_acquire(file, byte)? {
                return Ok(Some(lock));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Takes the exclusive lock on `byte` when nobody holds it; `Ok(None)` when it is busy.
    pub(crate) fn try_acquire(file: &'a File, byte: u64) -> io::Result<Option<ByteLock<'a>>> {
        match set_lock(file, byte, libc::F_WRLCK, false) {
            Ok(()) => Ok(Some(ByteLock { file, byte })),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN) | Some(libc::EACCES) | Some(libc::EINTR)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for ByteLock<'_> {
    fn drop(&mut self) {
        // Closing the file would release it too; an error here cannot be acted upon.
        let _ = set_lock(self.file, self.byte, libc::F_UNLCK, false);
    }
}

fn set_lock(file: &File, byte: u64, kind: libc::c_int, wait: bool) -> io::Result<()> {
    let start = libc::off_t::try_from(byte)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "lock offset out of range"))?;
    // SAFETY: `flock` is a plain C struct for which all-zero bytes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl.l_pid = 0; // required to be 0 for OFD locks
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    // SAFETY: the descriptor is open for the lifetime of `file` and `fl` is a valid flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Who holds a conflicting lock on `byte` (test helper): `true` when someone else does.
#[cfg(test)]
pub(crate) fn is_locked_by_other(file: &File, byte: u64) -> io::Result<bool> {
    // SAFETY: as in `set_lock`.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: as in `set_lock`.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_OFD_GETLK,
            &mut fl as *mut libc::flock,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Reserves disk blocks for `[offset, offset+len)` of `file` (Linux `fallocate`, mode 0), so a
/// full disk is reported before the chunk body is read. Filesystems without support
/// (EOPNOTSUPP, ENOSYS) are fine: the write path reports ENOSPC there. Never emulated by
/// writing zeros (that is what `posix_fallocate` would do, doubling the bytes written).
pub(crate) fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, 0, offset, len)
}

/// Gives back the disk blocks of `[offset, offset+len)` of `file` (a chunk that failed):
/// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`, so the file keeps its size and reads zeros
/// there. Partial blocks at the edges are zeroed within the range only, so neighbouring
/// chunks are untouched. Filesystems without hole punching are left as they are.
pub(crate) fn release(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    fallocate(file, mode, offset, len)
}

/// `fallocate(2)` retried on EINTR; a filesystem (or range) that does not support `mode`
/// is left as it is.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Ok(());
    };
    loop {
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => return Ok(()),
            _ => return Err(e),
        }
    }
}

/// Bytes available to an unprivileged user on the filesystem of `path` (statvfs).
pub(crate) fn free_space(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero is a valid statvfs; `c` is a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers for the duration of the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    (st.f_bavail as u64).checked_mul(st.f_frsize as u64)
}
