//! The storage root and everything opened under it, safe on a shared host.
//!
//! Other local users are untrusted. The root (default `sys_get_temp_dir()/upload-progress-<euid>`,
//! in the shared `/tmp`) could have been created first by someone else, who could then plant
//! `.app-secret` (the extension would sign with the attacker's secret) or symbolic links (a
//! `data.part` linked to a file of the pool's user would be overwritten by `writeChunk`). So:
//!
//! - the root must be a real directory (not a symlink) owned by the process's euid with no
//!   group/other permission bits; it is created with mode 0700 when missing, and an existing
//!   root that fails the check is refused, never chmod'ed;
//! - `.app-secret`, when present, must be a regular file owned by the euid with no group/other
//!   bits;
//! - everything under the root is opened relative to an open descriptor of the root
//!   (`openat`) with `O_NOFOLLOW`, one path component at a time, new files with `O_EXCL`,
//!   and checked after opening (`fstat`: type, owner, no group/other bits, and one link for
//!   files opened for writing, so a hard link to someone's file is refused too);
//! - new files get mode 0600 and new directories 0700 whatever the umask (`fchmod`).
//!
//! [`Root`] is the checked root; [`open_file_under_root`] is the one-call form for other
//! modules (pid and log files of the hub, the app secret).

use super::error::StorageError;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The generated app secret's file name in the root.
pub const SECRET_FILE: &str = ".app-secret";

/// How [`Dir::open_file`] opens a file. Every mode adds `O_NOFOLLOW | O_CLOEXEC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenHow {
    /// An existing file, read only.
    Read,
    /// An existing file, read and write.
    Write,
    /// A new file (`O_EXCL`), read and write, mode 0600.
    CreateNew,
    /// Create (mode 0600) or open, read and write; never truncates.
    CreateOrOpen,
    /// Create (mode 0600) or open for appending (logs).
    Append,
}

/// A directory opened without following links; names under it are opened relative to it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// The checked storage root (see the module documentation).
#[derive(Debug)]
pub struct Root(Dir);

impl std::ops::Deref for Root {
    type Target = Dir;
    fn deref(&self) -> &Dir {
        &self.0
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid never fails.
    unsafe { libc::geteuid() }
}

fn cname(name: &str) -> io::Result<CString> {
    // One component only: no separators, no `.`/`..`, no NUL.
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: all-zero is a valid stat; the descriptor is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer for the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why)
}

/// What is wrong with `st` for a file or directory we trust; `None` when nothing is.
fn problem_of(st: &libc::stat, want_dir: bool, single_link: bool) -> Option<String> {
    let kind = st.st_mode & libc::S_IFMT;
    if want_dir && kind != libc::S_IFDIR {
        return Some("is not a directory".into());
    }
    if !want_dir && kind != libc::S_IFREG {
        return Some("is not a regular file".into());
    }
    let me = euid();
    if st.st_uid != me {
        return Some(format!(
            "is owned by uid {}, not by this process's euid {me}",
            st.st_uid
        ));
    }
    if st.st_mode & 0o077 != 0 {
        return Some(format!(
            "has mode {:04o}: group/other permission bits must be clear (0{})",
            st.st_mode & 0o7777,
            if want_dir { "700" } else { "600" }
        ));
    }
    if single_link && st.st_nlink > 1 {
        return Some(format!(
            "has {} hard links (another name points to this file)",
            st.st_nlink
        ));
    }
    None
}

/// ELOOP from `O_NOFOLLOW` means "a symbolic link": say so.
fn explain(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => refused("is a symbolic link (refused)".into()),
        Some(libc::ENOTDIR) => io::Error::new(io::ErrorKind::NotFound, "is not a directory"),
        _ => e,
    }
}

impl Dir {
    /// The path this directory was opened as (for messages and path-based helpers).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open descriptor of the directory.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn openat(&self, name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
        let c = cname(name)?;
        loop {
            // SAFETY: valid descriptor and NUL-terminated name.
            let fd = unsafe {
                libc::openat(
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0o600 as libc::c_uint,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh descriptor we own.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // O_NOFOLLOW|O_DIRECTORY on a symlink is ENOTDIR: say what it really is.
            if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP))
                && self
                    .lstat(name)
                    .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
            {
                return Err(refused("is a symbolic link (refused)".into()));
            }
            return Err(explain(e));
        }
    }

    /// Opens the file `name` (one component) of this directory, see [`OpenHow`]. A new file
    /// gets mode 0600; an existing one must be a regular file owned by the euid with no
    /// group/other bits (and a single link when opened for writing).
    pub fn open_file(&self, name: &str, how: OpenHow) -> io::Result<File> {
        self.open_file_flags(name, how, 0)
    }

    /// [`Dir::open_file`] with extra `open` flags (`O_DIRECT`).
    pub fn open_file_flags(
        &self,
        name: &str,
        how: OpenHow,
        extra: libc::c_int,
    ) -> io::Result<File> {
        // O_NONBLOCK: a planted FIFO must not block the open; no effect on regular files.
        let access = match how {
            OpenHow::Read => libc::O_RDONLY,
            OpenHow::Append => libc::O_WRONLY | libc::O_APPEND,
            _ => libc::O_RDWR,
        } | libc::O_NONBLOCK
            | extra;
        // Create-or-open is O_EXCL first, so that we know whether the file is ours to chmod.
        let (fd, created) = match how {
            OpenHow::Read | OpenHow::Write => (self.openat(name, access)?, false),
            OpenHow::CreateNew => (
                self.openat(name, access | libc::O_CREAT | libc::O_EXCL)?,
                true,
            ),
            OpenHow::CreateOrOpen | OpenHow::Append => {
                match self.openat(name, access | libc::O_CREAT | libc::O_EXCL) {
                    Ok(fd) => (fd, true),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        (self.openat(name, access)?, false)
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if created {
            // Exactly 0600 whatever the umask.
            // SAFETY: open descriptor.
            if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let st = fstat(fd.as_fd())?;
        if let Some(why) = problem_of(&st, false, how != OpenHow::Read) {
            return Err(refused(why));
        }
        // Back to blocking I/O (regular files ignore it, but keep the descriptor plain).
        // SAFETY: open descriptor.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        Ok(File::from(fd))
    }

    /// Opens the subdirectory `name` without following links; it must be owned by the euid
    /// with no group/other bits.
    pub fn open_dir(&self, name: &str) -> io::Result<Dir> {
        let fd = self.openat(name, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let st = fstat(fd.as_fd())?;
        if let Some(why) = problem_of(&st, true, false) {
            return Err(refused(why));
        }
        Ok(Dir {
            fd,
            path: self.path.join(name),
        })
    }

    /// Creates the subdirectory `name` with mode 0700 (whatever the umask) and opens it.
    /// `AlreadyExists` when the name is taken.
    pub fn create_dir(&self, name: &str) -> io::Result<Dir> {
        let c = cname(name)?;
        // SAFETY: valid descriptor and name.
        if unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o700) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let dir = {
            let fd = self.openat(name, libc::O_RDONLY | libc::O_DIRECTORY)?;
            // SAFETY: open descriptor.
            if unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Dir {
                fd,
                path: self.path.join(name),
            }
        };
        let st = fstat(dir.fd())?;
        if let Some(why) = problem_of(&st, true, false) {
            return Err(refused(why));
        }
        Ok(dir)
    }

    /// `renameat` of two names of this directory.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (cname(from)?, cname(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: valid descriptor and names.
        if unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `linkat` of two names of this directory (fails when `to` exists).
    pub fn link(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (cname(from)?, cname(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: valid descriptor and names.
        if unsafe { libc::linkat(fd, f.as_ptr(), fd, t.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes the file `name` (never follows a link: unlinks the link itself).
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        let c = cname(name)?;
        // SAFETY: valid descriptor and name.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether `name` exists (without following a link).
    pub fn exists(&self, name: &str) -> bool {
        self.lstat(name).is_ok()
    }

    /// The modification time of `name` (not following a link); `None` when missing.
    pub fn mtime(&self, name: &str) -> Option<std::time::SystemTime> {
        let st = self.lstat(name).ok()?;
        let secs = u64::try_from(st.st_mtime).ok()?;
        let nanos = u32::try_from(st.st_mtime_nsec).unwrap_or(0);
        std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos))
    }

    fn lstat(&self, name: &str) -> io::Result<libc::stat> {
        let c = cname(name)?;
        // SAFETY: all-zero is a valid stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, name and pointer.
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }

    /// fsync of the directory, so that a rename or a new entry in it is durable.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: open descriptor.
        if unsafe { libc::fsync(self.fd.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// "storage directory <path> <why>" as a `StorageError::Io`.
fn root_error(path: &Path, why: &str) -> StorageError {
    StorageError::Io(format!(
        "storage directory {} {why}; refusing to use it (upload_progress.storage_dir must be a \
         directory owned by the PHP user with mode 0700)",
        path.display()
    ))
}

impl Root {
    /// Opens the root at `path` (made absolute), creating it with mode 0700 when missing
    /// (parents too), and checks it and its `.app-secret`. The error names the path and what
    /// is wrong.
    pub fn open(path: &Path) -> Result<Root, StorageError> {
        Root::open_inner(path, true)?.ok_or_else(|| root_error(path, "does not exist"))
    }

    /// [`Root::open`] without creating it: `Ok(None)` when it does not exist.
    pub fn open_existing(path: &Path) -> Result<Option<Root>, StorageError> {
        Root::open_inner(path, false)
    }

    fn open_inner(path: &Path, create: bool) -> Result<Option<Root>, StorageError> {
        if path.as_os_str().is_empty() {
            return Err(StorageError::InvalidArgument(
                "the storage directory is an empty path".to_string(),
            ));
        }
        let path = std::path::absolute(path).map_err(|e| root_error(path, &e.to_string()))?;
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| root_error(&path, "contains a NUL byte"))?;
        let open = || {
            // SAFETY: NUL-terminated path.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                // SAFETY: a fresh descriptor we own.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        };
        let mut created = false;
        let fd = match open() {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                if let Some(parent) = path.parent() {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)
                        .map_err(|e| root_error(&path, &format!("cannot be created: {e}")))?;
                }
                // SAFETY: NUL-terminated path.
                if unsafe { libc::mkdir(c.as_ptr(), 0o700) } == 0 {
                    created = true;
                } else {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::AlreadyExists {
                        return Err(root_error(&path, &format!("cannot be created: {e}")));
                    }
                }
                open().map_err(|e| root_error(&path, &explain(e).to_string()))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(_)
                if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                return Err(root_error(&path, "is a symbolic link"))
            }
            Err(e) => return Err(root_error(&path, &explain(e).to_string())),
        };
        if created {
            // The umask may have removed bits (0700 & ~umask); make it exactly 0700. Only a
            // directory this call made: an existing one is checked, never changed.
            let st = fstat(fd.as_fd()).map_err(|e| root_error(&path, &e.to_string()))?;
            if st.st_uid == euid() {
                // SAFETY: open descriptor.
                unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) };
            }
        }
        let st = fstat(fd.as_fd()).map_err(|e| root_error(&path, &e.to_string()))?;
        if let Some(why) = problem_of(&st, true, false) {
            return Err(root_error(&path, &why));
        }
        let root = Root(Dir { fd, path });
        match root.lstat(SECRET_FILE) {
            Ok(st) => {
                if let Some(why) = problem_of(&st, false, false) {
                    let p = root.path.join(SECRET_FILE);
                    return Err(StorageError::Io(format!(
                        "app secret file {} {why}; refusing to use the storage directory",
                        p.display()
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StorageError::Io(format!(
                    "app secret file {}: {e}",
                    root.path.join(SECRET_FILE).display()
                )))
            }
        }
        Ok(Some(root))
    }
}

/// Opens `name` (one component) under the checked root `root`, creating the root (0700)
/// when missing; see [`OpenHow`]. For other modules: pid and log files of the hub.
pub fn open_file_under_root(root: &Path, name: &str, how: OpenHow) -> Result<File, StorageError> {
    let r = Root::open(root)?;
    r.open_file(name, how)
        .map_err(|e| super::error::io_error("opening", &r.path().join(name), &e))
}

/// What is wrong with the storage root at `path` and its `.app-secret`, without creating
/// anything: `Ok(false)` when it does not exist yet (it is created on first use),
/// `Ok(true)` when it is fine. For `php --ri` and `Hub::run()`.
pub fn check(path: &Path) -> Result<bool, StorageError> {
    Root::open_existing(path).map(|r| r.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::{Read, Write};
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn root() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path().join("root");
        (tmp, r)
    }

    /// The helper other modules use for pid/log files: new files 0600 whatever the umask,
    /// appends go to the end, and a planted symlink, hard link, FIFO or foreign file is
    /// refused without being opened for writing (old code followed links with fs::write).
    #[test]
    fn open_file_under_root_refuses_planted_names() {
        let (tmp, r) = root();
        let mut f = open_file_under_root(&r, "hub.log", OpenHow::Append).unwrap();
        f.write_all(b"one\n").unwrap();
        let mut f = open_file_under_root(&r, "hub.log", OpenHow::Append).unwrap();
        f.write_all(b"two\n").unwrap();
        assert_eq!(fs::read(r.join("hub.log")).unwrap(), b"one\ntwo\n");
        assert_eq!(
            fs::metadata(r.join("hub.log")).unwrap().mode() & 0o7777,
            0o600
        );
        assert_eq!(fs::metadata(&r).unwrap().mode() & 0o7777, 0o700);
        let mut s = String::new();
        open_file_under_root(&r, "hub.log", OpenHow::Read)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "one\ntwo\n");

        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        symlink(&victim, r.join("hub.pid")).unwrap();
        for how in [
            OpenHow::Append,
            OpenHow::CreateOrOpen,
            OpenHow::Write,
            OpenHow::Read,
        ] {
            let e = open_file_under_root(&r, "hub.pid", how)
                .unwrap_err()
                .to_string();
            assert!(e.contains("symbolic link"), "{how:?}: {e}");
        }
        let e = open_file_under_root(&r, "hub.pid", OpenHow::CreateNew)
            .unwrap_err()
            .to_string();
        assert!(e.contains("File exists"), "{e}");
        fs::remove_file(r.join("hub.pid")).unwrap();
        fs::hard_link(&victim, r.join("hub.pid")).unwrap();
        let e = open_file_under_root(&r, "hub.pid", OpenHow::CreateOrOpen)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hard links"), "{e}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");

        fs::remove_file(r.join("hub.pid")).unwrap();
        let c = CString::new(r.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_file_under_root(&r, "fifo", OpenHow::Read)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");

        fs::write(r.join("foreign"), b"x").unwrap();
        fs::set_permissions(r.join("foreign"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(r.join("foreign"), Some(65534), None).unwrap();
        let e = open_file_under_root(&r, "foreign", OpenHow::Append)
            .unwrap_err()
            .to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");

        for bad in ["../x", "a/b", "..", "", "."] {
            assert!(
                open_file_under_root(&r, bad, OpenHow::Append).is_err(),
                "{bad}"
            );
        }
    }
}
