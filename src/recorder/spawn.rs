//! Starting the hub from a PHP-FPM worker: bind the ingest socket (the lock:
//! the kernel frees the name when its holder dies), then double-fork and exec
//! the PHP CLI running `UploadProgress\Hub::run()`, handing it the bound socket
//! on fd 3 and the worker's resolved settings (JSON in a memfd) on fd 4.
//! Settings never travel in argv or the environment: `/proc/<pid>/cmdline` is
//! readable by every user, and re-parsing values as INI changes them.
//!
//! Everything the child needs is prepared before fork: between fork and exec
//! only async-signal-safe calls are made (the worker may hold locks in malloc).
//!
//! Respawns back off per host: a small state file next to the hub's log
//! (`SpawnState`, shared by every worker of the host under flock) says when
//! the next spawn may start and why the last hub exited.

use crate::config::Config;
use crate::recorder::client::{holder_uid, own_uid, sockaddr};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The descriptor number the hub finds its listening ingest socket on.
pub const INGEST_FD: i32 = 3;
/// The descriptor number the hub finds its settings on (JSON, see `Config`).
pub const CONFIG_FD: i32 = 4;
pub const ENV_INGEST_FD: &str = "UPLOAD_PROGRESS_INGEST_FD";
pub const ENV_CONFIG_FD: &str = "UPLOAD_PROGRESS_CONFIG_FD";
pub const ENV_WATCH_PID: &str = "UPLOAD_PROGRESS_WATCH_PID";

pub struct SpawnSpec {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log_path: String,
    pub socket_name: String,
    /// The settings the hub runs with, serialized; handed over on CONFIG_FD.
    pub config: Option<Vec<u8>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SpawnOutcome {
    Spawned,
    /// Spawned with stdout/stderr on /dev/null: the log file was refused.
    SpawnedWithoutLog(String),
    /// The socket name is taken by a process of ours: another process runs or
    /// starts the hub.
    AlreadyRunning,
    /// The socket name is held by a process of another uid: an error (no hub
    /// of ours can start under that name), never "a hub already runs".
    Foreign(u32),
    /// The name is bound but nobody accepts on it (a squatter that does not
    /// listen, whose uid cannot be read): an error too.
    NotAccepting,
}

/// Opens (creating with 0600) a file of the hub in the storage root without
/// following a symlink planted at `path`, and refuses one that belongs to
/// another uid, is not a regular file or has other links; the mode is made
/// 0600 whatever the umask. Until the storage-root checks land, this is the
/// minimal guard for the pid, log and spawn-state files.
pub fn open_private_file(path: &Path, append: bool) -> io::Result<File> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))?;
    let mut flags = libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY;
    flags |= if append {
        libc::O_WRONLY | libc::O_APPEND
    } else {
        libc::O_RDWR
    };
    // SAFETY: open(2) with a NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), flags, 0o600 as libc::c_uint) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ELOOP) {
            return Err(io::Error::other(format!(
                "{} is a symbolic link: refused",
                path.display()
            )));
        }
        return Err(e);
    }
    // SAFETY: fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: stat is plain old data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on our descriptor.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_uid != own_uid() {
        return Err(io::Error::other(format!(
            "{} belongs to uid {}, not to this user (uid {}): refused",
            path.display(),
            st.st_uid,
            own_uid()
        )));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink != 1 {
        return Err(io::Error::other(format!(
            "{} is not a plain file with a single link: refused",
            path.display()
        )));
    }
    if st.st_mode & 0o7777 != 0o600 {
        // SAFETY: fchmod on our descriptor.
        if unsafe { libc::fchmod(fd, 0o600) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// Replaces the contents of the pid file with this process's pid.
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    let mut f = open_private_file(path, false)?;
    f.set_len(0)?;
    f.write_all(std::process::id().to_string().as_bytes())
}

/// Longest pause between two spawns of a failing hub.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// A hub that served this long "ran successfully": the backoff starts over.
/// Failures worth backing off from (port taken, no secret, foreign socket) end
/// a hub within milliseconds; a hub killed later (OOM killer, an operator) must
/// come back at once, or the events published meanwhile are lost.
pub const RAN_OK_AFTER: Duration = Duration::from_secs(1);

/// Per-host spawn bookkeeping, in `hub-<host>-<hash>.spawn` (0600).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpawnState {
    /// Hubs spawned since one last ran successfully.
    pub failures: u32,
    /// Unix time (ms) before which no worker spawns again.
    pub next_at_ms: u64,
    /// Why the last hub exited, in its own words; "" when unknown.
    pub reason: String,
    /// Whether a worker already logged `reason`.
    pub logged: bool,
    /// The uid of another user's process found on the socket name, once logged.
    pub foreign_uid: Option<u32>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 1 s, 2 s, 4 s … capped at `BACKOFF_CAP`, after the n-th spawn in a row.
pub fn backoff(spawns: u32) -> Duration {
    let exp = spawns.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exp).min(BACKOFF_CAP)
}

impl SpawnState {
    /// Whether a spawn may start at `now`; when it may, it is counted (the
    /// next one waits twice as long unless this hub runs successfully).
    pub fn try_start(&mut self, now: u64) -> bool {
        if now < self.next_at_ms {
            return false;
        }
        self.failures = self.failures.saturating_add(1);
        self.next_at_ms = now + backoff(self.failures).as_millis() as u64;
        true
    }

    /// A spawn that did not happen after all (a hub was already starting).
    pub fn undo_start(&mut self, now: u64) {
        self.failures = self.failures.saturating_sub(1);
        self.next_at_ms = if self.failures == 0 {
            0
        } else {
            now + backoff(self.failures).as_millis() as u64
        };
    }

    /// A hub ran successfully: the next one (if ever needed) starts at once.
    pub fn ran_ok(&mut self) {
        *self = SpawnState::default();
    }

    /// The hub exited with `reason`: remembered, to be logged once.
    pub fn exited(&mut self, reason: &str) {
        if self.reason != reason {
            self.reason = reason.to_owned();
            self.logged = false;
        }
    }

    /// Seconds until the next spawn may start (0: now).
    pub fn next_spawn_in_s(&self, now: u64) -> u64 {
        self.next_at_ms.saturating_sub(now).div_ceil(1000)
    }
}

/// Runs `f` on the host's spawn state under an exclusive lock (flock), and
/// writes the state back when `f` changed it.
pub fn with_state<R>(path: &Path, f: impl FnOnce(&mut SpawnState) -> R) -> io::Result<R> {
    let mut file = open_private_file(path, false)?;
    // SAFETY: flock on our descriptor; held for microseconds by any worker.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let before: SpawnState = serde_json::from_str(&text).unwrap_or_default();
    let mut state = before.clone();
    let out = f(&mut state);
    if state != before {
        let json = serde_json::to_vec(&state).map_err(io::Error::other)?;
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(&json)?;
    }
    // The lock goes with the descriptor.
    Ok(out)
}

/// Reads the state without taking the lock for long (status pages).
pub fn read_state(path: &Path) -> Option<SpawnState> {
    if std::fs::symlink_metadata(path).is_err() {
        return None;
    }
    with_state(path, |s| s.clone()).ok()
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

/// Moves `fd` to a number above the ones the child sets up (0-4), so that
/// the dup2 calls after fork never overwrite a source.
fn high_fd(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > CONFIG_FD {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on our descriptor.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, CONFIG_FD + 1) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// An anonymous in-memory file holding `bytes`, read from the start.
fn memfd_with(bytes: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: memfd_create with a static name.
    let fd = unsafe { libc::memfd_create(c"upload-progress-config".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

/// Spawns the hub unless one holds the socket name already.
pub fn spawn(spec: &SpawnSpec) -> io::Result<SpawnOutcome> {
    let listener = match bind_listener(&spec.socket_name) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            // Our own spawners listen right after bind: give one a moment.
            let holder = holder_uid(&spec.socket_name).or_else(|| {
                std::thread::sleep(Duration::from_millis(20));
                holder_uid(&spec.socket_name)
            });
            return Ok(match holder {
                Some(uid) if uid == own_uid() => SpawnOutcome::AlreadyRunning,
                Some(uid) => SpawnOutcome::Foreign(uid),
                None => SpawnOutcome::NotAccepting,
            });
        }
        Err(e) => return Err(e),
    };
    let listener = high_fd(listener)?;
    let config = match &spec.config {
        Some(bytes) => Some(high_fd(memfd_with(bytes)?)?),
        None => None,
    };
    // Opened here, not in the child: no symlink is followed, another user's
    // file is refused, and the mode is 0600 whatever the umask. Without a
    // usable log the hub still starts, writing to /dev/null.
    let log_file = open_private_file(Path::new(&spec.log_path), true);
    let log_error = log_file.as_ref().err().map(ToString::to_string);
    let log = match log_file {
        Ok(f) => Some(high_fd(OwnedFd::from(f))?),
        Err(_) => None,
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
    if config.is_some() {
        env_owned.push(cstring(&format!("{ENV_CONFIG_FD}={CONFIG_FD}"))?);
    }
    let mut envp: Vec<*const libc::c_char> = env_owned.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let devnull = c"/dev/null";
    let lfd = listener.as_raw_fd();
    let cfd = config.as_ref().map_or(-1, |f| f.as_raw_fd());
    let out = log.as_ref().map_or(-1, |f| f.as_raw_fd());

    // SAFETY: fork; the child only calls async-signal-safe functions on
    // memory prepared above, then execs or _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above. Every source descriptor is above 4 (high_fd),
        // so the dup2 calls below never overwrite one another.
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
            let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
            if null > 0 {
                libc::dup2(null, 0);
            }
            if libc::dup2(lfd, INGEST_FD) < 0 {
                libc::_exit(126);
            }
            if cfd >= 0 && libc::dup2(cfd, CONFIG_FD) < 0 {
                libc::_exit(126);
            }
            let out = if out >= 0 { out } else { 0 };
            libc::dup2(out, 1);
            libc::dup2(out, 2);
            // Every inherited descriptor but 0-4 goes: a leaked FPM listen
            // socket or FastCGI connection in a long-lived hub is an outage.
            if libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32) != 0 {
                for fd in 5..65536 {
                    libc::close(fd);
                }
            }
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    drop(listener);
    drop(config);
    drop(log);
    let mut status = 0;
    // SAFETY: reaping our own short-lived child; the hub is its orphan.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(match log_error {
        Some(e) => SpawnOutcome::SpawnedWithoutLog(e),
        None => SpawnOutcome::Spawned,
    })
}

/// The settings handed over by a spawner on `CONFIG_FD`: `None` when this
/// process was not spawned with any, `Some(Err)` when they cannot be read
/// (the hub must not run with other settings than the workers).
pub fn inherited_config() -> Option<Result<Config, String>> {
    let fd: i32 = std::env::var(ENV_CONFIG_FD).ok()?.parse().ok()?;
    std::env::remove_var(ENV_CONFIG_FD);
    // SAFETY: fcntl(F_GETFD) only checks that the number is open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Some(Err(format!("descriptor {fd} of the settings is not open")));
    }
    // SAFETY: the descriptor was handed to this process to own; closed on drop.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let mut text = Vec::new();
    Some(
        file.read_to_end(&mut text)
            .map_err(|e| format!("cannot read the settings on descriptor {fd}: {e}"))
            .and_then(|_| {
                serde_json::from_slice::<Config>(&text)
                    .map_err(|e| format!("malformed settings on descriptor {fd}: {e}"))
            }),
    )
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

    fn wait_for(path: &Path, ok: impl Fn(&str) -> bool) -> String {
        let mut text = String::new();
        for _ in 0..150 {
            text = std::fs::read_to_string(path).unwrap_or_default();
            if ok(&text) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        text
    }

    #[test]
    fn spawned_child_gets_socket_and_settings_on_fds_3_4_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let name = format!("@upload-progress-spawn-exec-{}", std::process::id());
        let spec = SpawnSpec {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "echo fd3=$UPLOAD_PROGRESS_INGEST_FD fd4=$UPLOAD_PROGRESS_CONFIG_FD; \
                 cat <&4; echo; ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; \
                 stat -L -c %a /proc/self/fd/1"
                    .into(),
            ],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            log_path: log.to_string_lossy().into_owned(),
            socket_name: name.clone(),
            config: Some(b"{\"secret\":\"a;b\\\"c\"}".to_vec()),
        };
        // SAFETY: umask is process-wide; the worst a parallel test sees is
        // a more permissive default for a moment.
        let old = unsafe { libc::umask(0) };
        let outcome = spawn(&spec).unwrap();
        unsafe { libc::umask(old) };
        assert_eq!(outcome, SpawnOutcome::Spawned);
        let text = wait_for(&log, |t| t.lines().count() >= 4);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"fd3=3 fd4=4"), "{text}");
        assert_eq!(lines.get(1), Some(&"{\"secret\":\"a;b\\\"c\"}"), "{text}");
        let fds: Vec<&str> = lines.get(2).unwrap_or(&"").split_whitespace().collect();
        // 0-4 and the one `ls` opens for /proc/self/fd.
        assert!(fds.len() <= 6, "leaked descriptors: {fds:?}");
        assert_eq!(
            lines.get(3),
            Some(&"600"),
            "log mode whatever the umask: {text}"
        );
    }

    #[test]
    fn the_log_is_never_a_planted_symlink_nor_a_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("hub.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_private_file(&link, true).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let name = format!("@upload-progress-spawn-link-{}", std::process::id());
        let spec = SpawnSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo written".into()],
            env: vec![],
            log_path: link.to_string_lossy().into_owned(),
            socket_name: name,
            config: None,
        };
        assert!(matches!(
            spawn(&spec).unwrap(),
            SpawnOutcome::SpawnedWithoutLog(_)
        ));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");

        // SAFETY: geteuid never fails.
        if unsafe { libc::geteuid() } == 0 {
            let foreign = dir.path().join("foreign.pid");
            std::fs::write(&foreign, "1").unwrap();
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
            let e = write_pid_file(&foreign).unwrap_err();
            assert!(e.to_string().contains("uid 65534"), "{e}");
            assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "1");
        }
        let pid = dir.path().join("hub.pid");
        // SAFETY: as above.
        let old = unsafe { libc::umask(0o022) };
        write_pid_file(&pid).unwrap();
        unsafe { libc::umask(old) };
        let meta = std::fs::metadata(&pid).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&pid).unwrap(),
            std::process::id().to_string()
        );
    }

    #[test]
    fn a_foreign_holder_is_an_error_not_a_running_hub() {
        let name = format!("@upload-progress-spawn-squat-{}", std::process::id());
        let Some((pid, _report)) = crate::recorder::client::tests::foreign_listener(&name) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let spec = SpawnSpec {
            program: "/bin/true".into(),
            args: vec![],
            env: vec![],
            log_path: dir.path().join("log").to_string_lossy().into_owned(),
            socket_name: name,
            config: None,
        };
        let outcome = spawn(&spec).unwrap();
        // SAFETY: ending and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert_eq!(outcome, SpawnOutcome::Foreign(65534));
    }

    #[test]
    fn a_bound_name_nobody_accepts_on_is_an_error() {
        let name = format!("@upload-progress-spawn-bound-{}", std::process::id());
        let (addr, len) = sockaddr(&name).unwrap();
        // SAFETY: a bound socket that never listens, closed at the end.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert_eq!(
            unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) },
            0
        );
        let dir = tempfile::tempdir().unwrap();
        let spec = SpawnSpec {
            program: "/bin/true".into(),
            args: vec![],
            env: vec![],
            log_path: dir.path().join("log").to_string_lossy().into_owned(),
            socket_name: name,
            config: None,
        };
        let outcome = spawn(&spec).unwrap();
        unsafe { libc::close(fd) };
        assert_eq!(outcome, SpawnOutcome::NotAccepting);
    }

    #[test]
    fn respawns_back_off_exponentially_and_reset_after_a_good_run() {
        let mut s = SpawnState::default();
        let t0 = 1_000_000;
        assert!(s.try_start(t0), "the first spawn is immediate");
        assert!(!s.try_start(t0 + 999));
        assert!(s.try_start(t0 + 1000));
        assert_eq!(s.next_spawn_in_s(t0 + 1000), 2);
        let mut t = t0 + 1000;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let wait = s.next_at_ms - t;
            waits.push(wait / 1000);
            t += wait;
            assert!(s.try_start(t));
        }
        assert_eq!(&waits[..6], &[2, 4, 8, 16, 32, 64]);
        assert_eq!(*waits.last().unwrap(), 300, "capped at 5 min: {waits:?}");
        s.exited("cannot listen: Address in use");
        assert!(!s.logged);
        s.logged = true;
        s.exited("cannot listen: Address in use");
        assert!(s.logged, "the same reason is logged once");
        s.ran_ok();
        assert_eq!(s, SpawnState::default());
        assert!(s.try_start(t + 1));
    }

    #[test]
    fn the_state_is_shared_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.spawn");
        assert!(with_state(&path, |s| s.try_start(10_000)).unwrap());
        // Another worker (another open of the same file) sees the backoff.
        assert!(!with_state(&path, |s| s.try_start(10_500)).unwrap());
        assert_eq!(read_state(&path).unwrap().failures, 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
