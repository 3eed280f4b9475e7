//! The app secret generated once per storage directory when php.ini sets none,
//! shared by the hub and every worker of the host.
//!
//! The file is trusted only in a checked root (see `storage::root`): the root owned by the
//! euid and closed to group/other, `.app-secret` a regular file owned by the euid, mode 0600,
//! opened without following links. Anything else is an error naming the path and the
//! problem: a secret planted by another local user would let them sign channel auth.

use crate::storage::root::{OpenHow, Root, SECRET_FILE};
use crate::storage::StorageError;
use std::io::{self, Read, Write};
use std::path::Path;

fn read(root: &Root) -> io::Result<String> {
    let mut s = String::new();
    root.open_file(SECRET_FILE, OpenHow::Read)?
        .read_to_string(&mut s)?;
    Ok(s.trim().to_owned())
}

fn error(root: &Root, what: &str, e: &io::Error) -> StorageError {
    StorageError::Io(format!(
        "app secret file {}: {what}: {e}",
        root.path().join(SECRET_FILE).display()
    ))
}

/// Why the last [`load_or_create`] of this process failed (for messages of callers that
/// only see an empty secret).
static LAST_ERROR: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The error of the last failed [`load_or_create`], if the last call failed.
pub fn last_error() -> Option<String> {
    LAST_ERROR.lock().ok().and_then(|e| e.clone())
}

/// The secret of `storage_dir`, created (32 random bytes in hex, mode 0600) when missing.
pub fn load_or_create(storage_dir: &Path) -> Result<String, StorageError> {
    let result = load_or_create_inner(storage_dir);
    if let Ok(mut last) = LAST_ERROR.lock() {
        *last = result.as_ref().err().map(ToString::to_string);
    }
    result
}

fn load_or_create_inner(storage_dir: &Path) -> Result<String, StorageError> {
    let root = Root::open(storage_dir)?;
    match read(&root) {
        Ok(s) if !s.is_empty() => return Ok(s),
        Ok(_) => {
            return Err(StorageError::Io(format!(
                "app secret file {} is empty; remove it to have a new secret generated",
                root.path().join(SECRET_FILE).display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(&root, "cannot be read", &e)),
    }
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| StorageError::Io(e.to_string()))?;
    let secret = hex::encode(bytes);
    // Written aside then hard-linked: link() fails if another process won the
    // race, and nobody ever reads a half-written secret. O_EXCL: a stale name left
    // by a crashed process of the same pid is removed first, never written through.
    let tmp = format!("{SECRET_FILE}.{}", std::process::id());
    let _ = root.remove_file(&tmp);
    let written = (|| -> io::Result<()> {
        let mut f = root.open_file(&tmp, OpenHow::CreateNew)?;
        f.write_all(secret.as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = root.remove_file(&tmp);
        return Err(error(&root, "cannot be written", &e));
    }
    let linked = root.link(&tmp, SECRET_FILE);
    let _ = root.remove_file(&tmp);
    match linked {
        Ok(()) => Ok(secret),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read(&root).map_err(|e| error(&root, "cannot be read", &e))
        }
        Err(e) => Err(error(&root, "cannot be created", &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn created_once_with_mode_0600() {
        let dir = private_dir();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        let mode = fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Attacker: plants `.app-secret` readable by others, or as a symlink to a file of
    /// their choosing. Old code read either and signed with it.
    #[test]
    fn planted_or_loose_secret_files_are_refused() {
        let dir = private_dir();
        let p = dir.path().join(SECRET_FILE);
        fs::write(&p, "attacker").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains(".app-secret") && e.contains("0644"), "{e}");

        fs::remove_file(&p).unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, "attacker").unwrap();
        symlink(&target, &p).unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(".app-secret") && e.contains("not a regular file"),
            "{e}"
        );
    }

    /// A root other users may enter is refused, not chmod'ed.
    #[test]
    fn loose_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("0755") && e.contains("group/other"), "{e}");
        let mode = fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(!dir.path().join(SECRET_FILE).exists());
    }
}
