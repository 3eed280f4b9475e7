//! What the tasks of one hub share: configuration, state, counters, ids.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::conn::Conn;
use super::state::State;
use super::{limits, redis, replay, Metrics, Tunables};
use crate::config::Config;

/// Upload ids remembered by `Hub::note_upload`.
pub(super) const MAX_UPLOADS_SEEN: usize = 100_000;

/// Everything the tasks of one hub share.
pub(crate) struct Hub {
    pub cfg: Config,
    pub version: String,
    pub tunables: Tunables,
    pub started: Instant,
    /// The address actually bound (the port is known even when `listen` says 0).
    pub listen_addr: String,
    pub state: Mutex<State>,
    pub conns: Mutex<HashMap<u64, Arc<Conn>>>,
    pub metrics: Metrics,
    /// The Redis bridge, when `redis_url` is set (and valid).
    pub redis: Option<Arc<redis::Bridge>>,
    /// Events API signatures already accepted.
    pub replay: Mutex<replay::Signatures>,
    /// Ids this hub saw Upload reports for (bounded; the storage directory
    /// and the Redis state are the durable answer).
    pub uploads_seen: Mutex<std::collections::HashSet<Box<str>>>,
    /// The descriptor budget of TCP clients.
    pub limits: Arc<limits::Limits>,
    pub(super) next_id: AtomicU64,
    pub(super) seed: u64,
    pub stopping: AtomicBool,
    pub(super) stop_tx: mpsc::Sender<String>,
}

/// Locks a mutex, ignoring poisoning (no code panics while holding one, and a
/// hub that keeps serving is better than one that dies).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// Asks the serve loop to stop (hand-over).
    pub fn request_stop(&self, reason: String) {
        let _ = self.stop_tx.try_send(reason);
    }

    /// A fresh connection id and the random half of its socket id.
    pub fn new_conn_ids(&self) -> (u64, u32) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let r = splitmix64(self.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        (id, (r % 1_000_000_000) as u32)
    }

    /// Remembers that `id` is an Upload (its reports come from `Upload`).
    pub fn note_upload(&self, id: &str) {
        let mut seen = lock(&self.uploads_seen);
        if seen.contains(id) {
            return;
        }
        if seen.len() >= MAX_UPLOADS_SEEN {
            // Forgetting is safe: the storage directory still answers.
            seen.clear();
        }
        seen.insert(id.into());
    }

    /// True when `id` is an Upload: its reports came here, its directory is in
    /// storage_dir (the Redis script checks the Redis state).
    pub fn is_upload(&self, id: &str) -> bool {
        if lock(&self.uploads_seen).contains(id) {
            return true;
        }
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return false;
        }
        std::fs::symlink_metadata(self.cfg.storage_dir.join(id)).is_ok_and(|m| m.is_dir())
    }

    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// `QueryStatus` answer.
    pub fn status_json(&self) -> String {
        let (channels, subscriptions) = {
            let state = lock(&self.state);
            (state.channels.channel_count(), state.channels.subscriptions)
        };
        serde_json::json!({
            "running": true,
            "pid": std::process::id(),
            "listen": self.listen_addr,
            "connections": Metrics::get(&self.metrics.connections),
            "channels": channels,
            "subscriptions": subscriptions,
            "uptime_s": self.uptime_s(),
            "version": self.version,
            "events_in": Metrics::get(&self.metrics.events_in),
            "events_out": Metrics::get(&self.metrics.events_out),
            "events_dropped": Metrics::get(&self.metrics.events_dropped),
            "slow_consumer_evictions": Metrics::get(&self.metrics.evictions),
            "redis": self.redis.as_ref().map(|b| serde_json::json!({
                "connected": b.connected.load(Ordering::Relaxed),
                "hub_id": b.id,
                "errors": Metrics::get(&b.errors),
            })),
        })
        .to_string()
    }
}

pub(super) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(super) fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_ok() {
        u64::from_le_bytes(b)
    } else {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        splitmix64(t ^ u64::from(std::process::id()))
    }
}
