//! The hub's clock and its log (stderr, a file on the storage disk).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::lock;

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix time in microseconds.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Size of the hub log (a regular file on fd 2) above which it is rotated once:
/// renamed to `<name>.1` (replacing the previous one) and reopened.
const LOG_CAP: u64 = 8 << 20;

/// One log line on stderr: `2026-11-21T05:22:03.123Z upload_progress hub[pid]: message`.
pub(crate) fn log(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    // stderr is a log file on the storage disk: a full disk must not panic
    // whatever task is logging (eprintln! would).
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "{} upload_progress hub[{}]: {}",
        timestamp(now_ms()),
        std::process::id(),
        args
    );
    // Under the stderr lock: no other line is written while fd 2 is swapped.
    let _ = rotate_log(2, &[1], LOG_CAP);
    drop(err);
}

/// When `fd` is a regular file larger than `cap`: renames it to `<path>.1`,
/// opens a new file at its path (0600, never through a link) and dup2s it onto
/// `fd` and onto those of `also` that share the old file. True when rotated.
pub(crate) fn rotate_log(
    fd: std::os::fd::RawFd,
    also: &[std::os::fd::RawFd],
    cap: u64,
) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let stat = |fd| {
        // SAFETY: fstat writes into the zeroed struct it is given.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st)
    };
    let Some(st) = stat(fd) else {
        return Ok(false);
    };
    if (st.st_mode & libc::S_IFMT) != libc::S_IFREG || (st.st_size as u64) < cap {
        return Ok(false);
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{fd}"))?;
    if path.as_os_str().as_bytes().ends_with(b" (deleted)") || !path.is_absolute() {
        return Ok(false);
    }
    let mut old = path.clone().into_os_string();
    old.push(".1");
    std::fs::rename(&path, &old)?;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid C string; the new descriptor is owned below.
    let nfd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_WRONLY
                | libc::O_CREAT
                | libc::O_EXCL
                | libc::O_APPEND
                | libc::O_NOFOLLOW
                | libc::O_CLOEXEC,
            0o600,
        )
    };
    if nfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    for &other in also {
        if stat(other).is_some_and(|o| o.st_dev == st.st_dev && o.st_ino == st.st_ino) {
            // SAFETY: both descriptors are open; dup2 replaces `other` atomically.
            unsafe { libc::dup2(nfd, other) };
        }
    }
    // SAFETY: as above; then the temporary descriptor is closed.
    unsafe {
        libc::dup2(nfd, fd);
        libc::close(nfd);
    }
    Ok(true)
}

/// A log line that may repeat at network speed (refused connections,
/// malformed frames): written at most once per 10 s, with the number of
/// occurrences since the previous line.
pub(crate) struct RateLog(Mutex<(Option<Instant>, u64)>);

impl RateLog {
    pub const EVERY: Duration = Duration::from_secs(10);

    pub const fn new() -> RateLog {
        RateLog(Mutex::new((None, 0)))
    }

    /// Logs `args` unless a line was logged less than 10 s ago; true when written.
    pub fn log(&self, args: std::fmt::Arguments<'_>) -> bool {
        let mut g = lock(&self.0);
        let now = Instant::now();
        if g.0
            .is_some_and(|t| now.saturating_duration_since(t) < Self::EVERY)
        {
            g.1 += 1;
            return false;
        }
        let more = std::mem::take(&mut g.1);
        g.0 = Some(now);
        drop(g);
        if more > 0 {
            log(format_args!(
                "{args} (and {more} more like it since the previous such line)"
            ));
        } else {
            log(args);
        }
        true
    }
}

fn timestamp(ms: u64) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(ms as i64);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_log_counts_instead_of_writing() {
        let r = RateLog::new();
        assert!(r.log(format_args!("first")));
        for _ in 0..1000 {
            assert!(!r.log(format_args!("again")));
        }
        assert_eq!(lock(&r.0).1, 1000);
        // After 10 s the next line carries the count.
        lock(&r.0).0 = Some(Instant::now() - RateLog::EVERY);
        assert!(r.log(format_args!("later")));
        assert_eq!(lock(&r.0).1, 0);
    }

    /// Before: the log grew without bound (15 MB in 2 s under a flood).
    #[test]
    fn log_is_rotated_once_past_its_cap() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.log");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let other = f.try_clone().unwrap();
        f.write_all(&[b'a'; 1000]).unwrap();
        assert!(!rotate_log(f.as_raw_fd(), &[other.as_raw_fd()], 4096).unwrap());
        f.write_all(&[b'b'; 4000]).unwrap();
        assert!(rotate_log(f.as_raw_fd(), &[other.as_raw_fd()], 4096).unwrap());
        let rotated = dir.path().join("hub.log.1");
        assert_eq!(std::fs::metadata(&rotated).unwrap().len(), 5000);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // Both descriptors now write to the new file.
        f.write_all(b"new\n").unwrap();
        (&other).write_all(b"too\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\ntoo\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second rotation replaces the previous .1: at most two files.
        f.write_all(&[b'c'; 5000]).unwrap();
        assert!(rotate_log(f.as_raw_fd(), &[], 4096).unwrap());
        assert_eq!(std::fs::metadata(&rotated).unwrap().len(), 5008);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
