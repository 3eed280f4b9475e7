//! Counters behind `/metrics` and `QueryStatus`.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(crate) struct Metrics {
    pub connections: AtomicU64,
    pub events_in: AtomicU64,
    pub events_out: AtomicU64,
    pub events_dropped: AtomicU64,
    pub evictions: AtomicU64,
    pub ingest_connections: AtomicU64,
    pub ingest_errors: AtomicU64,
    /// Body reports of plain tagged requests for an id that is an Upload.
    pub tagged_refused: AtomicU64,
    /// TCP connections closed at accept (no descriptor to spare, per-address cap).
    pub tcp_refused: AtomicU64,
    /// Pending connections closed to make room for newer ones.
    pub pending_evicted: AtomicU64,
    /// Published events refused on upload channels (reserved name or a seq).
    pub published_refused: AtomicU64,
}

impl Metrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
