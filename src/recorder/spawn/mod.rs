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

mod files;
mod plan;
mod state;

pub use files::{open_hub_file, write_pid_file, PidFile};
pub use plan::{extension_path, find_php_binary, hub_spec, start_hub, SpawnLog};
pub use state::{
    backoff, now_ms, read_state, with_state, HubRun, SpawnState, BACKOFF_CAP, RAN_OK_AFTER,
};

use crate::config::Config;
use crate::recorder::client::{self, holder_uid, own_uid};
use crate::storage::root::OpenHow;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

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

/// Binds and listens on the ingest socket name.
pub fn bind_listener(name: &str) -> io::Result<OwnedFd> {
    if !name.starts_with('@') {
        // A path socket left by a dead hub blocks bind; it is stale only if
        // nobody accepts on it.
        if std::os::unix::net::UnixStream::connect(name)
            .is_err_and(|e| e.raw_os_error() == Some(libc::ECONNREFUSED))
        {
            let _ = std::fs::remove_file(name);
        }
    }
    client::listen(name).map(OwnedFd::from)
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
    let log_file = open_hub_file(Path::new(&spec.log_path), OpenHow::Append);
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

/// Why the settings handed over on `CONFIG_FD` cannot be used.
#[derive(Debug)]
pub enum InheritedConfigError {
    NotOpen(i32),
    Read(i32, io::Error),
    Malformed(i32, serde_json::Error),
}

impl std::fmt::Display for InheritedConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotOpen(fd) => write!(f, "descriptor {fd} of the settings is not open"),
            Self::Read(fd, e) => write!(f, "cannot read the settings on descriptor {fd}: {e}"),
            Self::Malformed(fd, e) => write!(f, "malformed settings on descriptor {fd}: {e}"),
        }
    }
}

impl std::error::Error for InheritedConfigError {}

/// The settings handed over by a spawner on `CONFIG_FD`: `None` when this
/// process was not spawned with any, `Some(Err)` when they cannot be read
/// (the hub must not run with other settings than the workers).
pub fn inherited_config() -> Option<Result<Config, InheritedConfigError>> {
    let fd: i32 = std::env::var(ENV_CONFIG_FD).ok()?.parse().ok()?;
    std::env::remove_var(ENV_CONFIG_FD);
    // SAFETY: fcntl(F_GETFD) only checks that the number is open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Some(Err(InheritedConfigError::NotOpen(fd)));
    }
    // SAFETY: the descriptor was handed to this process to own; closed on drop.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let mut text = Vec::new();
    Some(
        file.read_to_end(&mut text)
            .map_err(|e| InheritedConfigError::Read(fd, e))
            .and_then(|_| {
                serde_json::from_slice::<Config>(&text)
                    .map_err(|e| InheritedConfigError::Malformed(fd, e))
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

/// A temporary storage root for tests: the hub's files live in one (0700, or refused).
#[cfg(test)]
pub(crate) fn private_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    dir
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
        let dir = crate::recorder::spawn::private_tempdir();
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
        let dir = crate::recorder::spawn::private_tempdir();
        let target = dir.path().join("victim");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("hub.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_hub_file(&link, OpenHow::Append).unwrap_err();
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

    /// `/bin/true` as the hub, logging into `dir`.
    fn true_spec(dir: &tempfile::TempDir, name: String) -> SpawnSpec {
        SpawnSpec {
            program: "/bin/true".into(),
            args: vec![],
            env: vec![],
            log_path: dir.path().join("log").to_string_lossy().into_owned(),
            socket_name: name,
            config: None,
        }
    }

    #[test]
    fn a_foreign_holder_is_an_error_not_a_running_hub() {
        let name = format!("@upload-progress-spawn-squat-{}", std::process::id());
        let Some((pid, _report)) = crate::recorder::client::tests::foreign_listener(&name) else {
            return;
        };
        let dir = crate::recorder::spawn::private_tempdir();
        let spec = true_spec(&dir, name);
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
        // A bound socket that never listens, closed at the end.
        let fd = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        fd.bind(&client::sock_addr(&name).unwrap()).unwrap();
        let dir = crate::recorder::spawn::private_tempdir();
        let spec = true_spec(&dir, name);
        let outcome = spawn(&spec).unwrap();
        drop(fd);
        assert_eq!(outcome, SpawnOutcome::NotAccepting);
    }
}
