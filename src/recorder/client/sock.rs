//! The Unix stream sockets of the ingest path, through socket2 (abstract names as
//! `@name`, like `ss` prints them).

use socket2::{Domain, SockAddr, Socket, Type};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// The address of a path or an `@abstract` name.
pub fn sock_addr(name: &str) -> io::Result<SockAddr> {
    let bytes = match name.strip_prefix('@') {
        Some(rest) if !rest.is_empty() => [b"\0", rest.as_bytes()].concat(),
        None if !name.is_empty() => name.as_bytes().to_vec(),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("socket name {name:?} is empty"),
            ))
        }
    };
    use std::os::unix::ffi::OsStrExt;
    SockAddr::unix(std::ffi::OsStr::from_bytes(&bytes)).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket name {name:?} is too long"),
        )
    })
}

/// A close-on-exec Unix stream socket.
pub fn stream_socket(nonblocking: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    s.set_nonblocking(nonblocking)?;
    Ok(s)
}

pub fn connect(s: &Socket, name: &str) -> io::Result<()> {
    s.connect(&sock_addr(name)?)
}

/// A listening socket bound to `name`.
pub fn listen(name: &str, backlog: i32) -> io::Result<Socket> {
    let s = stream_socket(false)?;
    s.bind(&sock_addr(name)?)?;
    s.listen(backlog)?;
    Ok(s)
}

/// The effective uid of this process: the only uid a hub of ours runs as.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid never fails.
    unsafe { libc::geteuid() }
}

/// The uid of the process at the other end of a connected Unix socket (for a
/// listening peer: the one that called listen()). std's `peer_cred` is unstable and
/// socket2 has no getter for SO_PEERCRED.
pub fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
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

/// Sends as much of `buf` as the socket takes without waiting (no SIGPIPE).
pub fn send_nowait(s: &Socket, buf: &[u8]) -> io::Result<usize> {
    s.send_with_flags(buf, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
}

/// Whether the peer closed the connection (a read would see EOF or an error).
pub fn peer_gone(s: &Socket) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    match s.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// Waits up to `timeout` for room to write on `s`; false on timeout or error.
pub fn wait_writable(s: &Socket, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one pollfd on our own descriptor.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n == 1 && p.revents & libc::POLLOUT != 0
}

/// Blocking I/O on `s` bounded by `timeout` per call.
pub fn set_timeouts(s: &Socket, timeout: Duration) -> io::Result<()> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}
