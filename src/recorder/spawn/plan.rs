//! What a worker spawns (the PHP CLI running `UploadProgress\Hub::run()` with this
//! extension) and when (the per-host backoff). The PHP layer only supplies what only the
//! engine knows (PHP_BINDIR, the version) and where to log.

use super::state::{now_ms, with_state, BACKOFF_CAP};
use super::{spawn, SpawnOutcome, SpawnSpec, ENV_WATCH_PID};
use crate::config::Config;
use std::ffi::c_void;
use std::io;
use std::path::Path;

/// Absolute path of this extension's shared object (dladdr on our own code).
pub fn extension_path() -> Option<String> {
    // SAFETY: dladdr on the address of a function of this library.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(extension_path as *const c_void, &mut info) == 0 || info.dli_fname.is_null()
        {
            return None;
        }
        let path = std::ffi::CStr::from_ptr(info.dli_fname)
            .to_string_lossy()
            .into_owned();
        std::fs::canonicalize(&path)
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
            .or(Some(path))
    }
}

/// The PHP CLI binary for the hub: `configured` (php.ini's `upload_progress.php_binary`),
/// else `php<major.minor>` or `php` in `bindir`, else common places.
pub fn find_php_binary(configured: &str, bindir: Option<&str>, version: &str) -> Option<String> {
    if !configured.is_empty() {
        return Some(configured.to_owned());
    }
    let bindir = bindir.unwrap_or("/usr/bin");
    let candidates = [
        format!("{bindir}/php{version}"),
        format!("{bindir}/php"),
        format!("/usr/bin/php{version}"),
        "/usr/local/bin/php".into(),
        "/usr/bin/php".into(),
    ];
    candidates
        .into_iter()
        .find(|c| std::fs::metadata(c).is_ok_and(|m| m.is_file()))
}

/// The hub's command: `program -n -d extension=<ext> -r 'UploadProgress\Hub::run();'`,
/// watching `watch_pid`, with `cfg` on a descriptor.
pub fn hub_spec(
    cfg: &Config,
    program: String,
    extension: &str,
    watch_pid: i32,
) -> Option<SpawnSpec> {
    // Only what is not a setting: the settings themselves go on a descriptor
    // (see `spawn`), since argv is public and INI re-parsing changes values.
    let args = vec![
        "-n".to_owned(),
        "-d".into(),
        format!("extension={extension}"),
        "-r".into(),
        "UploadProgress\\Hub::run();".into(),
    ];
    let config = serde_json::to_vec(cfg).ok()?;
    let env = vec![
        (
            "PATH".to_owned(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        (ENV_WATCH_PID.to_owned(), watch_pid.to_string()),
    ];
    Some(SpawnSpec {
        program,
        args,
        env,
        log_path: cfg.hub_file("log").to_string_lossy().into_owned(),
        socket_name: cfg.hub_socket.clone(),
        config: Some(config),
    })
}

/// What the caller should log after `start_hub`.
pub trait SpawnLog {
    /// A line for the PHP error log.
    fn warn(&mut self, msg: &str);
    /// A line logged once per process.
    fn warn_once(&mut self, msg: &str);
    /// Why `uid` holding the socket name is a problem (with the caller's settings).
    fn foreign_message(&self, uid: u32) -> String;
}

/// Spawns the hub of `spec` if the per-host backoff in `state_path` allows it. The spawn
/// happens under the state's lock (a few ms), so two workers never both count one attempt.
pub fn start_hub(
    spec: &SpawnSpec,
    state_path: &Path,
    log: &mut dyn SpawnLog,
) -> io::Result<SpawnOutcome> {
    let attempt = with_state(state_path, |st| {
        let t = now_ms();
        if !st.reason.is_empty() && !st.logged {
            st.logged = true;
            log.warn(&format!(
                "upload_progress: the hub exited: {}; next start in {} s (then backing off up to {} s)",
                st.reason,
                st.next_spawn_in_s(t),
                BACKOFF_CAP.as_secs()
            ));
        }
        if !st.try_start(t) {
            return Ok(SpawnOutcome::AlreadyRunning);
        }
        let outcome = spawn(spec);
        match &outcome {
            Ok(SpawnOutcome::Spawned | SpawnOutcome::SpawnedWithoutLog(_)) => {}
            Ok(SpawnOutcome::Foreign(uid)) => {
                st.exited(&log.foreign_message(*uid));
                st.logged = true; // the caller reports it, once
            }
            // Counted as a failed spawn (backoff), and logged once from the state.
            Ok(SpawnOutcome::NotAccepting) => st.exited(&format!(
                "the ingest socket {} is bound by a process that does not accept \
                 connections (not a hub of this user); set upload_progress.hub_socket \
                 to a path in a directory only this user can write",
                spec.socket_name
            )),
            _ => st.undo_start(t),
        }
        outcome
    });
    match attempt {
        Ok(outcome) => outcome,
        // Without the state file (storage root unusable) the caller's per-process
        // pause still holds.
        Err(e) => {
            log.warn_once(&format!(
                "upload_progress: cannot use {}: {e}",
                state_path.display()
            ));
            spawn(spec)
        }
    }
}
