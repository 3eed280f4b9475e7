//! The Redis bridge between the hubs of several hosts (`upload_progress.redis_url`).
//!
//! Layout: `mod.rs` the bridge (what the router offers it, what it hands
//! back), `worker.rs` runs the scripts in order, `session.rs` the connection
//! life (subscriptions, catch-up, write-back, pushes of other hubs),
//! `connection.rs` one server or a cluster, `wire.rs` key names and the
//! pub/sub message, `scripts.rs` + `*.lua` the scripts with named arguments.
//!
//! Design (see docs/scaling.md):
//! - Every event a hub produces (PHP `publish()`, the HTTP events API, upload
//!   reports of its PHP workers) goes through one Lua script in Redis that
//!   keeps the channel's latest event (`up:<app>:latest:{<channel>}`, a hash
//!   with a TTL of `expire_seconds`), drops it when its seq is not above the
//!   highest seq stored there, and publishes it on `up:<app>:ev:{<channel>}`
//!   with the id of the origin hub. The origin hub delivers the script's
//!   answer to its own clients and ignores its echo; other hubs deliver what
//!   they receive.
//! - A hub subscribes in Redis only to the channels its own clients are
//!   subscribed to (reconciled after every local subscribe/unsubscribe).
//! - Upload aggregation across hosts: the raw progress reports of PHP workers
//!   (per body stream: in-flight bytes; per upload: stored bytes and chunks
//!   from the shared manifest) are folded by a second Lua script into
//!   `up:<app>:agg:{<channel>}` (stream fields expire after 2 minutes of
//!   silence), which builds the `progress` event from the sum of all hosts'
//!   streams, assigns its seq as max(latest seq + 1, now_us, the local floor),
//!   stores it as latest and publishes it: one round trip, atomic, and every
//!   host sees the same bytes_done and strictly rising seqs.
//! - Redis Cluster (`?cluster=1`): the same keys and channel hash to one slot
//!   per channel (`{<channel>}` hash tag), events go with SPUBLISH/SSUBSCRIBE.
//! - Outage: while Redis is unreachable every event is handled locally
//!   (the single-host behaviour); the channels touched meanwhile are written
//!   back when Redis is back, the subscriptions are restored and the latest
//!   events of subscribed channels fetched. A PING every second on the
//!   connection (which also carries the RESP3 pub/sub pushes) detects a
//!   silently dead connection.

mod connection;
mod occupancy;
mod scripts;
mod session;
mod wire;
mod worker;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use self::connection::RedisConn;
use self::scripts::{Publisher, Scripts};
use self::wire::Keys;
use super::event::{upload_channel, Event, UploadReport};
use super::{lock, log, Hub, Metrics};
use crate::protocol::pusher;
use crate::redis_url::redacted;
pub(crate) use crate::redis_url::{parse_redis_url, RedisSettings};

/// Events queued for Redis before the hub falls back to local handling.
const QUEUE: usize = 8192;

/// Shared by the hub's tasks; see the module documentation.
pub(crate) struct Bridge {
    /// Random id of this hub, sent with every published event.
    pub id: String,
    settings: RedisSettings,
    keys: Keys,
    ttl: u64,
    conn: Mutex<Option<RedisConn>>,
    pub connected: AtomicBool,
    pub errors: AtomicU64,
    pub published: AtomicU64,
    pub received: AtomicU64,
    ops_tx: mpsc::Sender<Event>,
    ops_rx: Mutex<Option<mpsc::Receiver<Event>>>,
    /// Subscriptions changed, latest events were asked for, or an error was seen.
    wake: Notify,
    want_latest: Mutex<Vec<String>>,
    /// Channels with events handled locally while Redis was unreachable.
    unsynced: Mutex<HashSet<String>>,
    check_now: AtomicBool,
    /// This hub's channel occupancy changed since it was last written.
    occupancy_dirty: AtomicBool,
    /// Wakes the session to write the occupancy (without a reconcile).
    occupancy_wake: Notify,
    scripts: Scripts,
    ping_every: Duration,
    timeout: Duration,
}

impl Bridge {
    pub fn new(
        settings: RedisSettings,
        app_id: &str,
        ttl: u64,
        id: String,
        ping_every: Duration,
        timeout: Duration,
    ) -> Bridge {
        let (ops_tx, ops_rx) = mpsc::channel(QUEUE);
        Bridge {
            id,
            settings,
            keys: Keys::new(app_id),
            ttl: ttl.max(60),
            conn: Mutex::new(None),
            connected: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
            ops_tx,
            ops_rx: Mutex::new(Some(ops_rx)),
            wake: Notify::new(),
            want_latest: Mutex::new(Vec::new()),
            unsynced: Mutex::new(HashSet::new()),
            check_now: AtomicBool::new(false),
            occupancy_dirty: AtomicBool::new(true),
            occupancy_wake: Notify::new(),
            scripts: Scripts::new(),
            ping_every,
            timeout,
        }
    }

    pub fn describe(&self) -> String {
        let urls: Vec<String> = self.settings.urls.iter().map(|u| redacted(u)).collect();
        format!(
            "{}{}",
            urls.join(","),
            if self.settings.cluster {
                " (cluster, sharded pub/sub)"
            } else {
                ""
            }
        )
    }

    /// Takes `ev` to publish it through Redis, or hands it back: Redis is
    /// down, the queue is full, or the event is invalid (handled locally,
    /// where it is dropped and counted).
    pub fn offer(&self, ev: Event) -> Result<(), Event> {
        let valid = pusher::validate_channel(&ev.channel()).is_ok()
            && match &ev {
                Event::Upload(UploadReport::Terminal(t))
                | Event::Tagged(UploadReport::Terminal(t)) => {
                    pusher::validate_event(&t.event).is_ok()
                }
                _ => true,
            };
        if !valid || !self.connected.load(Ordering::SeqCst) {
            return Err(ev);
        }
        self.ops_tx.try_send(ev).map_err(|e| {
            Metrics::add(&self.errors, 1);
            match e {
                mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => ev,
            }
        })
    }

    fn publisher(&self) -> Publisher<'_> {
        Publisher {
            keys: &self.keys,
            origin: &self.id,
            ttl_s: self.ttl,
            sharded: self.settings.cluster,
        }
    }

    /// Local subscriptions changed: reconcile the Redis subscriptions soon.
    pub fn subscriptions_changed(&self) {
        self.wake.notify_one();
    }

    /// A local subscribe found no latest event: fetch it from Redis and replay it.
    pub fn request_latest(&self, channel: &str) {
        if !self.connected.load(Ordering::SeqCst) {
            return;
        }
        lock(&self.want_latest).push(channel.to_string());
        self.wake.notify_one();
    }

    /// An event of `channel` was handled on this host only: written back to
    /// Redis once it is reachable again.
    pub fn mark_unsynced(&self, channel: String) {
        let mut u = lock(&self.unsynced);
        if u.len() < 100_000 {
            u.insert(channel);
        }
    }

    fn current(&self) -> Option<RedisConn> {
        lock(&self.conn).clone()
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        Metrics::add(&self.errors, 1);
        if !self.check_now.swap(true, Ordering::SeqCst) {
            log(format_args!("redis: {what} failed: {e}"));
        }
        self.wake.notify_one();
    }

    /// SET NX EX of an events API signature: Some(false) when another hub (or
    /// this one) already accepted it; None when Redis is not usable (the
    /// per-hub memory still refuses local replays).
    pub async fn first_seen_signature(&self, signature: &str, ttl_s: u64) -> Option<bool> {
        if !self.connected.load(Ordering::SeqCst) {
            return None;
        }
        let mut c = self.current()?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{}sig:{}", self.keys.prefix, signature.trim()))
            .arg("1")
            .arg("NX")
            .arg("EX")
            .arg(ttl_s);
        match tokio::time::timeout(self.timeout, c.query::<Option<String>>(&cmd)).await {
            Ok(Ok(r)) => Some(r.is_some()),
            Ok(Err(e)) => {
                self.failed("remembering a signature", &e);
                None
            }
            Err(_) => {
                self.failed("remembering a signature", &"timed out");
                None
            }
        }
    }

    /// The latest event data of an upload as Redis knows it (for `progress()`).
    pub async fn latest_upload_data(&self, upload_id: &str) -> Option<String> {
        let (_, data, _) = self.fetch_latest(&upload_channel(upload_id)).await?;
        Some(data)
    }

    async fn fetch_latest(&self, channel: &str) -> Option<(String, String, Option<u64>)> {
        if !self.connected.load(Ordering::SeqCst) {
            return None;
        }
        let mut c = self.current()?;
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.keys.latest(channel))
            .arg("event")
            .arg("data")
            .arg("seq");
        let r = tokio::time::timeout(
            self.timeout,
            c.query::<(Option<String>, Option<String>, Option<String>)>(&cmd),
        )
        .await;
        match r {
            Ok(Ok((Some(event), Some(data), seq))) => {
                let seq = seq.and_then(|s| s.parse::<u64>().ok());
                Some((event, data, seq))
            }
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                self.failed("reading a latest event", &e);
                None
            }
            Err(_) => {
                self.failed("reading a latest event", &"timed out");
                None
            }
        }
    }
}

/// Starts the bridge's tasks; they end when `down` changes.
pub(crate) fn start(
    hub: &Arc<Hub>,
    down: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(bridge) = hub.redis.clone() else {
        return Vec::new();
    };
    let Some(rx) = lock(&bridge.ops_rx).take() else {
        return Vec::new();
    };
    log(format_args!(
        "redis: bridging events through {} as hub {}",
        bridge.describe(),
        bridge.id
    ));
    let w = Arc::downgrade(hub);
    vec![
        tokio::spawn(worker::worker(w.clone(), bridge.clone(), rx, down.clone())),
        tokio::spawn(session::supervisor(w, bridge, down)),
    ]
}
