//! What ends a hub from outside: SIGTERM/SIGINT and the exit of the watched process.

use std::future::Future;
use std::time::Duration;

use super::log;

/// Resolves with the name of the first SIGTERM or SIGINT received.
pub(super) fn signals() -> impl Future<Output = String> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => tokio::select! {
                _ = t.recv() => "SIGTERM".to_string(),
                _ = i.recv() => "SIGINT".to_string(),
            },
            (Ok(mut t), Err(e)) | (Err(e), Ok(mut t)) => {
                log(format_args!("cannot install a signal handler: {e}"));
                t.recv().await;
                "signal".to_string()
            }
            (Err(e), Err(_)) => {
                log(format_args!("cannot install signal handlers: {e}"));
                std::future::pending().await
            }
        }
    }
}

/// Resolves when `pid` exits; never when there is none to watch.
pub(super) async fn watch(pid: Option<i32>) -> String {
    let Some(pid) = pid.filter(|p| *p > 0) else {
        return std::future::pending().await;
    };
    let gone = format!("watched process {pid} exited");
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: the fd was just returned by pidfd_open and is owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // `register_with_interest` only exists in recent tokio versions; the fd is
        // owned and stays open as long as the AsyncFd, which is what it asks for.
        #[allow(deprecated)]
        let afd = tokio::io::unix::AsyncFd::with_interest(owned, tokio::io::Interest::READABLE);
        if let Ok(afd) = afd {
            // A pidfd becomes readable when the process exits.
            let _ = afd.readable().await;
            return gone;
        }
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return gone;
    }
    loop {
        // SAFETY: kill with signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        if r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return gone;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
