//! Starting the hub from a PHP-FPM worker: bind the ingest socket (the lock:
//! the kernel frees the name when its holder dies), then double-fork and exec
//! the PHP CLI running `UploadProgress\Hub::run()`, handing it the bound socket.
//!
//! Everything the child needs is prepared before fork: between fork and exec
//! only async-signal-safe calls are made (the worker may hold locks in malloc).

use crate::recorder::client::sockaddr;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The descriptor number the hub finds its listening ingest socket on.
pub const INGEST_FD: i32 = 3;
pub const ENV_INGEST_FD: &str = "UPLOAD_PROGRESS_INGEST_FD";
pub const ENV_WATCH_PID: &str = "UPLOAD_PROGRESS_WATCH_PID";

pub struct SpawnSpec {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log_path: String,
    pub socket_name: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SpawnOutcome {
    Spawned,
    /// The socket name is taken: another process runs or starts the hub.
    AlreadyRunning,
}

/// Binds and listens on the ingest socket name.
pub fn bind_listener(name: &str) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(name)?;
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if !name.starts_with('@') {
        // A path socket left by a dead hub blocks bind; it is stale only if
        // nobody accepts on it.
        if let Ok((a, l)) = sockaddr(name) {
            // SAFETY: probe connect on a throwaway socket.
            unsafe {
                let probe = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if probe >= 0 {
                    let rc = libc::connect(probe, (&a as *const libc::sockaddr_un).cast(), l);
                    let err = io::Error::last_os_error().raw_os_error();
                    libc::close(probe);
                    if rc != 0 && err == Some(libc::ECONNREFUSED) {
                        let _ = std::fs::remove_file(name);
                    }
                }
            }
        }
    }
    // SAFETY: addr is a valid sockaddr_un of len bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in argument"))
}

/// Spawns the hub unless one holds the socket name already.
pub fn spawn(spec: &SpawnSpec) -> io::Result<SpawnOutcome> {
    let listener = match bind_listener(&spec.socket_name) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            return Ok(SpawnOutcome::AlreadyRunning)
        }
        Err(e) => return Err(e),
    };
    let program = cstring(&spec.program)?;
    let mut argv_owned = vec![program.clone()];
    for a in &spec.args {
        argv_owned.push(cstring(a)?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut env_owned = Vec::new();
    for (k, v) in &spec.env {
        env_owned.push(cstring(&format!("{k}={v}"))?);
    }
    env_owned.push(cstring(&format!("{ENV_INGEST_FD}={INGEST_FD}"))?);
    let mut envp: Vec<*const libc::c_char> = env_owned.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let log = cstring(&spec.log_path)?;
    let devnull = c"/dev/null";
    let lfd = listener.as_raw_fd();

    // SAFETY: fork; the child only calls async-signal-safe functions on
    // memory prepared above, then execs or _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            libc::setsid();
            let grandchild = libc::fork();
            if grandchild != 0 {
                libc::_exit(if grandchild < 0 { 1 } else { 0 });
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in [
                libc::SIGPIPE,
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGHUP,
                libc::SIGCHLD,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            if lfd == INGEST_FD {
                libc::fcntl(lfd, libc::F_SETFD, 0);
            } else if libc::dup2(lfd, INGEST_FD) < 0 {
                libc::_exit(126);
            }
            let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
            if null >= 0 {
                libc::dup2(null, 0);
            }
            let out = libc::open(
                log.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
                0o600,
            );
            let out = if out >= 0 { out } else { null };
            if out >= 0 {
                libc::dup2(out, 1);
                libc::dup2(out, 2);
            }
            // Every inherited descriptor but 0-3 goes: a leaked FPM listen
            // socket or FastCGI connection in a long-lived hub is an outage.
            if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0 {
                for fd in 4..65536 {
                    libc::close(fd);
                }
            }
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    drop(listener);
    let mut status = 0;
    // SAFETY: reaping our own short-lived child; the hub is its orphan.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(SpawnOutcome::Spawned)
}

/// The listening ingest socket handed over by a spawner, if any.
pub fn inherited_listener() -> Option<OwnedFd> {
    let fd: i32 = std::env::var(ENV_INGEST_FD).ok()?.parse().ok()?;
    std::env::remove_var(ENV_INGEST_FD);
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on a descriptor number that may not be a socket.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || ty != libc::SOCK_STREAM {
        return None;
    }
    // SAFETY: the descriptor was handed to this process to own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: mark it close-on-exec again.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_name_is_a_lock() {
        let name = format!("@upload-progress-spawn-test-{}", std::process::id());
        let first = bind_listener(&name).unwrap();
        let second = bind_listener(&name);
        assert_eq!(second.unwrap_err().raw_os_error(), Some(libc::EADDRINUSE));
        drop(first);
        assert!(
            bind_listener(&name).is_ok(),
            "the kernel frees the name with its holder"
        );
    }

    #[test]
    fn spawned_child_gets_the_socket_on_fd_3_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let name = format!("@upload-progress-spawn-exec-{}", std::process::id());
        let spec = SpawnSpec {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "echo fd3=$UPLOAD_PROGRESS_INGEST_FD; ls /proc/self/fd | sort -n | tr '\\n' ' '"
                    .into(),
            ],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            log_path: log.to_string_lossy().into_owned(),
            socket_name: name.clone(),
        };
        assert_eq!(spawn(&spec).unwrap(), SpawnOutcome::Spawned);
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(' ') && text.lines().count() >= 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(text.contains("fd3=3"), "{text}");
        let fds: Vec<&str> = text
            .lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        // 0,1,2,3 and the one `ls` opens for /proc/self/fd.
        assert!(fds.len() <= 5, "leaked descriptors: {fds:?}");
    }
}
