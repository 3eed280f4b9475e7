//! The hub's own files in the storage root (pid, log, spawn state), opened through the
//! storage's checked root: no symlink followed, another user's file, a FIFO or a file
//! with other links refused, new files 0600 whatever the umask.

use crate::storage::root::{open_file_under_root, OpenHow};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Opens `path` (a file directly in the storage root) the way `how` says.
pub fn open_hub_file(path: &Path, how: OpenHow) -> io::Result<File> {
    let (Some(root), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file name in a directory", path.display()),
        ));
    };
    open_file_under_root(root, name, how).map_err(io::Error::other)
}

/// Replaces the contents of the pid file with this process's pid.
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    let mut f = open_hub_file(path, OpenHow::CreateOrOpen)?;
    f.set_len(0)?;
    f.write_all(std::process::id().to_string().as_bytes())
}

/// The hub's pid file while it runs: removed on drop, unless another hub's pid is in it
/// by then (a hub started after this one took the name over).
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn write(path: &Path) -> io::Result<PidFile> {
        write_pid_file(path)?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if std::fs::read_to_string(&self.0)
            .is_ok_and(|p| p.trim() == std::process::id().to_string())
        {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_is_removed_only_while_it_names_this_process() {
        let dir = crate::recorder::spawn::private_tempdir();
        let path = dir.path().join("hub.pid");
        drop(PidFile::write(&path).unwrap());
        assert!(!path.exists());
        let pid = PidFile::write(&path).unwrap();
        std::fs::write(&path, "1").unwrap();
        drop(pid);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "1",
            "another hub's"
        );
    }
}
