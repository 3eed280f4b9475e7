//! Per-host spawn bookkeeping: a small state file next to the hub's log, shared by
//! every worker of the host under flock, says when the next spawn may start and why the
//! last hub exited (respawns back off exponentially).

use super::files::open_hub_file;
use crate::storage::root::OpenHow;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest pause between two spawns of a failing hub.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// A hub that served this long "ran successfully": the backoff starts over.
// Failures worth backing off from (port taken, no secret, foreign socket) end
// a hub within milliseconds; a hub killed later (OOM killer, an operator) must
// come back at once, or the events published meanwhile are lost.
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
    let mut file = open_hub_file(path, OpenHow::CreateOrOpen)?;
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

/// The running hub's side of the spawn state (the hub process, never an FPM worker): a
/// hub still serving after `RAN_OK_AFTER` ran successfully and the workers' backoff starts
/// over; a hub that fails leaves its reason for the workers to log once.
pub struct HubRun {
    state_file: PathBuf,
    done: Arc<AtomicBool>,
}

impl HubRun {
    pub fn start(state_file: PathBuf) -> HubRun {
        let done = Arc::new(AtomicBool::new(false));
        let (flag, path) = (done.clone(), state_file.clone());
        let _ = std::thread::Builder::new()
            .name("upload-progress-ran-ok".into())
            .spawn(move || {
                std::thread::sleep(RAN_OK_AFTER);
                let _ = with_state(&path, |s| {
                    if !flag.load(Ordering::SeqCst) {
                        s.ran_ok();
                    }
                });
            });
        HubRun { state_file, done }
    }

    /// The hub stopped with an error: the workers log `reason` once and back off.
    pub fn failed(&self, reason: &str) {
        let _ = with_state(&self.state_file, |s| {
            self.done.store(true, Ordering::SeqCst);
            s.exited(reason);
        });
    }
}

impl Drop for HubRun {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let dir = crate::recorder::spawn::private_tempdir();
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
