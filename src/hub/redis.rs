//! The Redis bridge between the hubs of several hosts (`upload_progress.redis_url`).
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

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, RedisResult,
    Script, Value,
};
use tokio::sync::{mpsc, watch, Notify};

use super::state::{push_json_str, upload_channel, Ctx};
use super::{lock, log, now_ms, now_us, Hub, Metrics};
use crate::protocol::ingest::{ProgressReport, StreamOutcome};
use crate::protocol::pusher;

/// Reports queued for Redis before the hub falls back to local handling.
const QUEUE: usize = 8192;
/// Stream fields of an upload aggregation are dropped after this much silence.
const STREAM_STALE_MS: u64 = 120_000;

/// Events and upload reports, as the ingest socket and the HTTP API hand them over.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Event {
        channel: String,
        event: String,
        data: String,
        seq: Option<u64>,
        exclude: Option<(u64, u32)>,
    },
    Progress(ProgressReport),
    StreamEnd {
        upload_id: String,
        stream: u64,
        outcome: StreamOutcome,
        stored_bytes: u64,
        chunks_done: u32,
    },
    Terminal {
        upload_id: String,
        event: String,
        fields: String,
    },
    /// A Progress, StreamEnd or Terminal of a plain tagged request: already
    /// checked against the Uploads this hub knows; the Redis script checks
    /// the Uploads of every host.
    Tagged(Box<Op>),
}

impl Op {
    fn channel(&self) -> String {
        match self {
            Op::Tagged(inner) => inner.channel(),
            Op::Event { channel, .. } => channel.clone(),
            Op::Progress(r) => upload_channel(&r.upload_id),
            Op::StreamEnd { upload_id, .. } | Op::Terminal { upload_id, .. } => {
                upload_channel(upload_id)
            }
        }
    }
}

pub(crate) fn is_upload_channel(channel: &str) -> bool {
    channel.starts_with("private-upload.")
}

/// The single-host path: what the hub does without Redis.
pub(crate) fn apply_local(hub: &Hub, op: Op) {
    let ctx = Ctx {
        m: &hub.m,
        cap: hub.tun.queue_cap,
    };
    if let Some(b) = &hub.redis {
        b.mark_unsynced(op.channel());
    }
    let mut st = lock(&hub.state);
    let op = match op {
        Op::Tagged(inner) => *inner,
        op => op,
    };
    match op {
        Op::Tagged(_) => {}
        Op::Event {
            channel,
            event,
            data,
            seq,
            exclude,
        } => {
            st.deliver(&ctx, &channel, &event, &data, seq, exclude);
        }
        Op::Progress(r) => st.progress(&ctx, &r),
        Op::StreamEnd {
            upload_id,
            stream,
            outcome,
            stored_bytes,
            chunks_done,
        } => st.stream_end(&ctx, &upload_id, stream, outcome, stored_bytes, chunks_done),
        Op::Terminal {
            upload_id,
            event,
            fields,
        } => st.terminal(&ctx, &upload_id, &event, &fields),
    }
}

/// Hands `op` to Redis when connected, else handles it locally.
pub(crate) fn dispatch(hub: &Hub, op: Op) {
    if let Some(b) = &hub.redis {
        let valid = pusher::validate_channel(&op.channel()).is_ok()
            && match &op {
                Op::Terminal { event, .. } => pusher::validate_event(event).is_ok(),
                Op::Tagged(inner) => match &**inner {
                    Op::Terminal { event, .. } => pusher::validate_event(event).is_ok(),
                    _ => true,
                },
                _ => true,
            };
        if valid && b.connected.load(Ordering::SeqCst) {
            match b.ops_tx.try_send(op) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(op))
                | Err(mpsc::error::TrySendError::Closed(op)) => {
                    Metrics::add(&b.errors, 1);
                    apply_local(hub, op);
                    return;
                }
            }
        }
    }
    apply_local(hub, op);
}

// ------------------------------------------------------------------ settings

use crate::redis_url::{key_prefix, redacted};
pub(crate) use crate::redis_url::{parse_redis_url, RedisSettings};

// ------------------------------------------------------------------ keys

struct Keys {
    prefix: String,
}

impl Keys {
    fn new(app_id: &str) -> Keys {
        Keys {
            prefix: key_prefix(app_id),
        }
    }
    fn latest(&self, ch: &str) -> String {
        format!("{}latest:{{{ch}}}", self.prefix)
    }
    fn agg(&self, ch: &str) -> String {
        format!("{}agg:{{{ch}}}", self.prefix)
    }
    /// The Upload state of the storage layer (`storage::redis_state`).
    fn upload_state(&self, ch: &str) -> String {
        format!("{}upload:{{{ch}}}", self.prefix)
    }
    fn events(&self, ch: &str) -> String {
        format!("{}ev:{{{ch}}}", self.prefix)
    }
    /// The hub channel of a Redis pub/sub channel name.
    fn channel_of<'a>(&self, redis_channel: &'a str) -> Option<&'a str> {
        redis_channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("ev:{")?
            .strip_suffix('}')
    }
}

/// Message on the pub/sub channel: `origin \n seq \n exclude \n event \n data`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Wire<'a> {
    pub origin: &'a str,
    pub seq: Option<u64>,
    pub exclude: Option<(u64, u32)>,
    pub event: &'a str,
    pub data: &'a str,
}

pub(crate) fn parse_wire(msg: &str) -> Option<Wire<'_>> {
    let mut it = msg.splitn(5, '\n');
    let origin = it.next()?;
    let seq = it.next()?;
    let exclude = it.next()?;
    let event = it.next()?;
    let data = it.next()?;
    let seq = if seq.is_empty() {
        None
    } else {
        Some(seq.parse().ok()?)
    };
    let exclude =
        exclude
            .split_once('.')
            .and_then(|(a, b)| match (a.parse::<u64>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) => Some((a, b)),
                _ => None,
            });
    Some(Wire {
        origin,
        seq,
        exclude,
        event,
        data,
    })
}

const EVENT_LUA: &str = r#"
local seq = ARGV[5]
if ARGV[9] == '1' then
  -- published on an upload channel: delivered, never kept as latest
elseif seq ~= '' then
  local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0') or 0
  if tonumber(seq) <= top then return 0 end
  redis.call('HSET', KEYS[1], 'top', seq, 'seq', seq, 'event', ARGV[3], 'data', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'seq', '', 'event', ARGV[3], 'data', ARGV[4])
end
if ARGV[9] ~= '1' then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6])) end
local msg = ARGV[2] .. '\n' .. seq .. '\n' .. ARGV[8] .. '\n' .. ARGV[3] .. '\n' .. ARGV[4]
if ARGV[7] == '1' then redis.call('SPUBLISH', ARGV[1], msg) else redis.call('PUBLISH', ARGV[1], msg) end
return 1
"#;

const UPLOAD_LUA: &str = r#"
local agg, latest = KEYS[1], KEYS[2]
local kind = ARGV[7]
if ARGV[19] == '1' then
  -- a plain tagged request never speaks on the channel of an Upload
  if redis.call('HGET', agg, 'upl') == '1' or redis.call('EXISTS', KEYS[3]) == 1 then
    return {'0', '', ''}
  end
else
  redis.call('HSET', agg, 'upl', '1')
end
local now = tonumber(ARGV[6])
local ttl = tonumber(ARGV[3])
local function fmt(n) return string.format('%.0f', n) end
local function hnum(k) return tonumber(redis.call('HGET', agg, k) or '0') or 0 end
if kind ~= 't' and redis.call('HGET', agg, 'fin') == '1' then return false end
local function next_seq()
  local top = tonumber(redis.call('HGET', latest, 'top') or '0') or 0
  return math.max(top + 1, tonumber(ARGV[5]))
end
local function emit(event, data, seq)
  redis.call('HSET', latest, 'top', fmt(seq), 'seq', fmt(seq), 'event', event, 'data', data)
  redis.call('EXPIRE', latest, ttl)
  redis.call('EXPIRE', agg, ttl)
  local msg = ARGV[2] .. '\n' .. fmt(seq) .. '\n\n' .. event .. '\n' .. data
  if ARGV[4] == '1' then redis.call('SPUBLISH', ARGV[1], msg) else redis.call('PUBLISH', ARGV[1], msg) end
  return {fmt(seq), event, data}
end
local total = hnum('total')
if kind == 't' then
  local seq = next_seq()
  local data = ARGV[16]
  if ARGV[17] == '0' and total > 0 then data = data .. '"bytes_total":' .. fmt(total) .. ',' end
  data = data .. '"seq":' .. fmt(seq) .. '}'
  local upl = redis.call('HGET', agg, 'upl')
  redis.call('DEL', agg)
  redis.call('HSET', agg, 'fin', '1')
  if upl then redis.call('HSET', agg, 'upl', upl) end
  return emit(ARGV[15], data, seq)
end
local rtotal, rcount = tonumber(ARGV[10]), tonumber(ARGV[11])
if rtotal > 0 then total = rtotal; redis.call('HSET', agg, 'total', ARGV[10]) end
if rcount > 0 then redis.call('HSET', agg, 'count', ARGV[11]) end
if total == 0 then
  local d = redis.call('HGET', latest, 'data')
  if d then
    local ok, v = pcall(cjson.decode, d)
    if ok and type(v) == 'table' and tonumber(v.bytes_total) then
      total = tonumber(v.bytes_total)
      redis.call('HSET', agg, 'total', fmt(total))
      if tonumber(v.chunk_count) then redis.call('HSET', agg, 'count', fmt(tonumber(v.chunk_count))) end
    end
  end
  if total == 0 then return false end
end
local stored, chunks = hnum('stored'), hnum('chunks')
local field = 's:' .. ARGV[9]
if kind == 'p' then
  redis.call('HSET', agg, field, ARGV[14] .. ':' .. ARGV[6])
else
  redis.call('HDEL', agg, field)
end
if kind ~= 'f' then
  stored = math.max(stored, tonumber(ARGV[12]))
  chunks = math.max(chunks, tonumber(ARGV[13]))
  redis.call('HSET', agg, 'stored', fmt(stored), 'chunks', fmt(chunks))
end
local inflight = 0
local all = redis.call('HGETALL', agg)
for i = 1, #all, 2 do
  local k = all[i]
  if string.sub(k, 1, 2) == 's:' then
    local b, t = string.match(all[i + 1], '^(%d+):(%d+)$')
    if b and now - tonumber(t) < tonumber(ARGV[18]) then
      inflight = inflight + tonumber(b)
    else
      redis.call('HDEL', agg, k)
    end
  end
end
local done = stored + inflight
if total > 0 and done > total then done = total end
local rt, rb, bps = hnum('rt'), hnum('rb'), hnum('bps')
local known = redis.call('HGET', agg, 'rk') == '1'
if rt == 0 or done < rb then
  redis.call('HSET', agg, 'rt', ARGV[6], 'rb', fmt(done))
elseif now - rt >= 300 then
  local inst = (done - rb) * 1000 / (now - rt)
  if known then bps = 0.6 * bps + 0.4 * inst else bps = inst end
  known = true
  redis.call('HSET', agg, 'rt', ARGV[6], 'rb', fmt(done), 'bps', tostring(bps), 'rk', '1')
end
local rate = 0
if known then rate = math.floor(bps + 0.5) end
local eta = 'null'
if total > 0 and done >= total then eta = '0'
elseif rate > 0 and total > 0 then eta = fmt(math.ceil((total - done) / rate)) end
local seq = next_seq()
local data = '{"upload_id":' .. ARGV[8] .. ',"seq":' .. fmt(seq) .. ',"state":"uploading","bytes_done":' .. fmt(done)
  .. ',"bytes_total":' .. fmt(total) .. ',"chunks_done":' .. fmt(chunks) .. ',"chunk_count":' .. fmt(hnum('count'))
  .. ',"rate_bps":' .. fmt(rate) .. ',"eta_s":' .. eta .. ',"ts_ms":' .. ARGV[6] .. '}'
return emit('progress', data, seq)
"#;

/// After an outage: drops the stream fields of this hub (ARGV[1] prefix) from an
/// upload aggregation; ARGV[2] = '1' marks the upload finished.
const RESET_LUA: &str = r#"
local all = redis.call('HKEYS', KEYS[1])
local p = ARGV[1]
for _, k in ipairs(all) do
  if string.sub(k, 1, #p) == p then redis.call('HDEL', KEYS[1], k) end
end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'fin', '1')
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
end
return 1
"#;

// ------------------------------------------------------------------ connection

#[derive(Clone)]
enum RConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl RConn {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            RConn::Single(c) => cmd.query_async(c).await,
            RConn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    async fn invoke<T: redis::FromRedisValue>(
        &mut self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self {
            RConn::Single(c) => inv.invoke_async(c).await,
            RConn::Cluster(c) => inv.invoke_async(c).await,
        }
    }

    async fn load(&mut self, s: &Script) -> RedisResult<()> {
        match self {
            RConn::Single(c) => s.load_async(c).await.map(|_| ()),
            RConn::Cluster(c) => s.load_async(c).await.map(|_| ()),
        }
    }

    async fn subscribe(&mut self, chans: &[String]) -> RedisResult<()> {
        match self {
            RConn::Single(c) => c.subscribe(chans).await,
            RConn::Cluster(c) => {
                // Sharded channels of different slots cannot share one command.
                for ch in chans {
                    c.ssubscribe(ch).await?;
                }
                Ok(())
            }
        }
    }

    async fn unsubscribe(&mut self, chans: &[String]) -> RedisResult<()> {
        match self {
            RConn::Single(c) => c.unsubscribe(chans).await,
            RConn::Cluster(c) => {
                for ch in chans {
                    c.sunsubscribe(ch).await?;
                }
                Ok(())
            }
        }
    }
}

// ------------------------------------------------------------------ bridge

/// Shared by the hub's tasks; see the module documentation.
pub(crate) struct Bridge {
    /// Random id of this hub, sent with every published event.
    pub id: String,
    settings: RedisSettings,
    keys: Keys,
    ttl: u64,
    conn: Mutex<Option<RConn>>,
    pub connected: AtomicBool,
    pub errors: AtomicU64,
    pub published: AtomicU64,
    pub received: AtomicU64,
    ops_tx: mpsc::Sender<Op>,
    ops_rx: Mutex<Option<mpsc::Receiver<Op>>>,
    /// Subscriptions changed, latest events were asked for, or an error was seen.
    wake: Notify,
    want_latest: Mutex<Vec<String>>,
    /// Channels with events handled locally while Redis was unreachable.
    unsynced: Mutex<HashSet<String>>,
    check_now: AtomicBool,
    event_script: Script,
    upload_script: Script,
    reset_script: Script,
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
            event_script: Script::new(EVENT_LUA),
            upload_script: Script::new(UPLOAD_LUA),
            reset_script: Script::new(RESET_LUA),
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

    fn mark_unsynced(&self, channel: String) {
        let mut u = lock(&self.unsynced);
        if u.len() < 100_000 {
            u.insert(channel);
        }
    }

    fn current(&self) -> Option<RConn> {
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
    let Some(b) = hub.redis.clone() else {
        return Vec::new();
    };
    let Some(rx) = lock(&b.ops_rx).take() else {
        return Vec::new();
    };
    log(format_args!(
        "redis: bridging events through {} as hub {}",
        b.describe(),
        b.id
    ));
    let w = Arc::downgrade(hub);
    vec![
        tokio::spawn(worker(w.clone(), b.clone(), rx, down.clone())),
        tokio::spawn(supervisor(w, b, down)),
    ]
}

// ------------------------------------------------------------------ worker

/// Runs the scripts in the order the reports arrived.
async fn worker(
    hub: Weak<Hub>,
    b: Arc<Bridge>,
    mut rx: mpsc::Receiver<Op>,
    mut down: watch::Receiver<bool>,
) {
    loop {
        let op = tokio::select! {
            _ = down.changed() => return,
            op = rx.recv() => match op { Some(op) => op, None => return },
        };
        let Some(hub) = hub.upgrade() else { return };
        let conn = if b.connected.load(Ordering::SeqCst) {
            b.current()
        } else {
            None
        };
        let Some(mut conn) = conn else {
            apply_local(&hub, op);
            continue;
        };
        match tokio::time::timeout(b.timeout, run_op(&hub, &b, &mut conn, &op)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                b.failed("publishing an event", &e);
                apply_local(&hub, op);
            }
            Err(_) => {
                b.failed("publishing an event", &"timed out");
                apply_local(&hub, op);
            }
        }
    }
}

/// Lower bound of the next seq of `channel`: above everything this hub delivered there.
fn seq_floor(hub: &Hub, channel: &str) -> u64 {
    let last = lock(&hub.state).last_seq(channel);
    last.saturating_add(1).max(now_us())
}

async fn run_op(hub: &Hub, b: &Bridge, conn: &mut RConn, op: &Op) -> RedisResult<()> {
    let (op, tagged) = match op {
        Op::Tagged(inner) => (&**inner, true),
        op => (op, false),
    };
    let ctx = Ctx {
        m: &hub.m,
        cap: hub.tun.queue_cap,
    };
    let sharded = if b.settings.cluster { "1" } else { "0" };
    match op {
        Op::Event {
            channel,
            event,
            data,
            seq,
            exclude,
        } => {
            let exclude_s = exclude.map_or(String::new(), |(a, r)| format!("{a}.{r}"));
            // Published events on an upload channel are delivered, never kept.
            let transient = seq.is_none() && is_upload_channel(channel);
            let mut inv = b.event_script.prepare_invoke();
            inv.key(b.keys.latest(channel))
                .arg(b.keys.events(channel))
                .arg(&b.id)
                .arg(event)
                .arg(data)
                .arg(seq.map_or(String::new(), |s| s.to_string()))
                .arg(b.ttl)
                .arg(sharded)
                .arg(exclude_s)
                .arg(if transient { "1" } else { "0" });
            let ok: i64 = conn.invoke(&inv).await?;
            if ok == 1 {
                Metrics::add(&b.published, 1);
                lock(&hub.state).deliver(&ctx, channel, event, data, *seq, *exclude);
            } else {
                Metrics::add(&hub.m.events_in, 1);
                Metrics::add(&hub.m.events_dropped, 1);
            }
        }
        Op::Tagged(_) => {}
        Op::Progress(_) | Op::StreamEnd { .. } | Op::Terminal { .. } => {
            let channel = op.channel();
            let mut upload_id = String::new();
            let mut kind = "p";
            let mut stream = 0u64;
            let (mut total, mut count, mut stored, mut chunks, mut inflight) =
                (0u64, 0u32, 0u64, 0u32, 0u64);
            let (mut t_event, mut t_prefix, mut t_has_total) = ("", String::new(), "0");
            match op {
                Op::Progress(r) => {
                    push_json_str(&mut upload_id, &r.upload_id);
                    stream = r.stream;
                    (total, count, stored, chunks, inflight) = (
                        r.bytes_total,
                        r.chunk_count,
                        r.stored_bytes,
                        r.chunks_done,
                        r.inflight,
                    );
                }
                Op::StreamEnd {
                    upload_id: id,
                    stream: s,
                    outcome,
                    stored_bytes,
                    chunks_done,
                } => {
                    push_json_str(&mut upload_id, id);
                    kind = if *outcome == StreamOutcome::Stored {
                        "s"
                    } else {
                        "f"
                    };
                    stream = *s;
                    (stored, chunks) = (*stored_bytes, *chunks_done);
                }
                Op::Terminal {
                    upload_id: id,
                    event,
                    fields,
                } => {
                    push_json_str(&mut upload_id, id);
                    kind = "t";
                    let (prefix, has_total) = terminal_prefix(id, event, fields);
                    t_event = event;
                    t_prefix = prefix;
                    t_has_total = if has_total { "1" } else { "0" };
                }
                Op::Event { .. } | Op::Tagged(_) => {}
            }
            let mut inv = b.upload_script.prepare_invoke();
            inv.key(b.keys.agg(&channel))
                .key(b.keys.latest(&channel))
                .key(b.keys.upload_state(&channel))
                .arg(b.keys.events(&channel))
                .arg(&b.id)
                .arg(b.ttl)
                .arg(sharded)
                .arg(seq_floor(hub, &channel))
                .arg(now_ms())
                .arg(kind)
                .arg(upload_id)
                .arg(format!("{}:{stream}", b.id))
                .arg(total)
                .arg(count)
                .arg(stored)
                .arg(chunks)
                .arg(inflight)
                .arg(t_event)
                .arg(t_prefix)
                .arg(t_has_total)
                .arg(STREAM_STALE_MS)
                .arg(if tagged { "1" } else { "0" });
            let r: Option<(String, String, String)> = conn.invoke(&inv).await?;
            match r {
                Some((_, event, _)) if event.is_empty() => {
                    // A tagged request for an Upload of some host.
                    Metrics::add(&hub.m.events_in, 1);
                    Metrics::add(&hub.m.events_dropped, 1);
                    Metrics::add(&hub.m.tagged_refused, 1);
                }
                Some((seq, event, data)) => {
                    Metrics::add(&b.published, 1);
                    let seq = seq.parse::<u64>().ok();
                    lock(&hub.state).deliver_remote(&ctx, &channel, &event, &data, seq, None);
                }
                None => {
                    Metrics::add(&hub.m.events_in, 1);
                    Metrics::add(&hub.m.events_dropped, 1);
                }
            }
        }
    }
    Ok(())
}

/// The data of a terminal report without `seq` and the closing brace:
/// `{"k":v,...,` (the script appends `"seq":N}`); whether the fields carry
/// `bytes_total`. The same members as `State::terminal` builds.
fn terminal_prefix(upload_id: &str, event: &str, fields: &str) -> (String, bool) {
    let obj = super::state::terminal_data(upload_id, event, fields);
    let has_total = obj.contains_key("bytes_total");
    let mut s = serde_json::Value::Object(obj).to_string();
    s.pop();
    s.push(',');
    (s, has_total)
}

// ------------------------------------------------------------------ supervisor

async fn connect(b: &Bridge) -> RedisResult<(RConn, mpsc::UnboundedReceiver<PushInfo>)> {
    let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
    let conn = if b.settings.cluster {
        let client = redis::cluster::ClusterClientBuilder::new(b.settings.urls.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(tx)
            .connection_timeout(b.timeout)
            .response_timeout(b.timeout)
            .retries(1)
            .build()?;
        RConn::Cluster(client.get_async_connection().await?)
    } else {
        let info = b.settings.urls[0].as_str().into_connection_info()?;
        let redis_settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let info = info.set_redis_settings(redis_settings);
        let client = redis::Client::open(info)?;
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(b.timeout))
            .set_response_timeout(Some(b.timeout))
            .set_push_sender(tx);
        RConn::Single(
            client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?,
        )
    };
    let mut conn = conn;
    conn.load(&b.event_script).await?;
    conn.load(&b.upload_script).await?;
    conn.load(&b.reset_script).await?;
    Ok((conn, rx))
}

async fn supervisor(hub: Weak<Hub>, b: Arc<Bridge>, mut down: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    let mut down_since: Option<Instant> = None;
    let mut last_fail_log: Option<Instant> = None;
    let mut first = true;
    loop {
        let r = tokio::select! {
            _ = down.changed() => return,
            r = tokio::time::timeout(b.timeout * 2, connect(&b)) => r,
        };
        let r = match r {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "connect timed out",
            ))),
        };
        match r {
            Ok((conn, pushes)) => {
                backoff = Duration::from_millis(100);
                let Some(h) = hub.upgrade() else { return };
                *lock(&b.conn) = Some(conn.clone());
                b.check_now.store(false, Ordering::SeqCst);
                b.connected.store(true, Ordering::SeqCst);
                match down_since.take() {
                    Some(t) => log(format_args!(
                        "redis: connected again to {} after {:.1} s; events go through Redis again",
                        b.describe(),
                        t.elapsed().as_secs_f64()
                    )),
                    None => log(format_args!("redis: connected to {}", b.describe())),
                }
                first = false;
                drop(h);
                let why = session(&hub, &b, conn, pushes, &mut down).await;
                b.connected.store(false, Ordering::SeqCst);
                *lock(&b.conn) = None;
                let Some(why) = why else { return };
                Metrics::add(&b.errors, 1);
                log(format_args!(
                    "redis: connection lost ({why}); events stay on this host until Redis is back"
                ));
                down_since = Some(Instant::now());
                last_fail_log = Some(Instant::now());
            }
            Err(e) => {
                Metrics::add(&b.errors, 1);
                if first {
                    log(format_args!(
                        "redis: cannot connect to {}: {e}; events stay on this host until it answers",
                        b.describe()
                    ));
                    first = false;
                    down_since = Some(Instant::now());
                    last_fail_log = Some(Instant::now());
                } else if last_fail_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    log(format_args!("redis: still unreachable: {e}"));
                    last_fail_log = Some(Instant::now());
                }
                tokio::select! {
                    _ = down.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Serves one connection; returns why it ended (None: the hub stops).
async fn session(
    hub: &Weak<Hub>,
    b: &Bridge,
    mut conn: RConn,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    down: &mut watch::Receiver<bool>,
) -> Option<String> {
    let mut subscribed: HashSet<String> = HashSet::new();
    let mut ping = tokio::time::interval(b.ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync = true;
    let mut need_reconcile = true;
    loop {
        // Subscriptions first, then the latest events asked for, so that nothing
        // published between the two is missed.
        if need_reconcile {
            if let Err(e) = reconcile(hub, b, &mut conn, &mut subscribed, resync).await {
                return Some(e);
            }
            need_reconcile = false;
        }
        if resync {
            if let Err(e) = write_back(hub, b, &mut conn).await {
                return Some(e);
            }
            resync = false;
        }
        let wanted: Vec<String> = std::mem::take(&mut *lock(&b.want_latest));
        for ch in wanted {
            if let Some((event, data, seq)) = b.fetch_latest(&ch).await {
                if let Some(h) = hub.upgrade() {
                    let ctx = Ctx {
                        m: &h.m,
                        cap: h.tun.queue_cap,
                    };
                    lock(&h.state).offer_latest(&ctx, &ch, &event, &data, seq);
                }
            }
        }
        tokio::select! {
            _ = down.changed() => return None,
            _ = b.wake.notified() => {
                need_reconcile = true;
                if b.check_now.swap(false, Ordering::SeqCst) {
                    if let Err(e) = health(b, &mut conn).await {
                        return Some(e);
                    }
                }
            }
            _ = ping.tick() => {
                if let Err(e) = health(b, &mut conn).await {
                    return Some(e);
                }
                // Also catches channels whose last subscriber was evicted
                // as a slow consumer.
                need_reconcile = true;
            }
            p = pushes.recv() => {
                let Some(p) = p else { return Some("connection closed".into()) };
                if p.kind == PushKind::Disconnection {
                    return Some("disconnected".into());
                }
                let h = hub.upgrade()?;
                on_push(&h, b, p);
                // Drain what else is queued without another trip through select.
                while let Ok(p) = pushes.try_recv() {
                    if p.kind == PushKind::Disconnection {
                        return Some("disconnected".into());
                    }
                    on_push(&h, b, p);
                }
            }
        }
    }
}

async fn health(b: &Bridge, conn: &mut RConn) -> Result<(), String> {
    let r = tokio::time::timeout(b.timeout, conn.query::<String>(&redis::cmd("PING"))).await;
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("PING failed: {e}")),
        Err(_) => Err(format!("no answer to PING within {:?}", b.timeout)),
    }
}

/// Brings the Redis subscriptions in line with the channels that have local subscribers.
async fn reconcile(
    hub: &Weak<Hub>,
    b: &Bridge,
    conn: &mut RConn,
    subscribed: &mut HashSet<String>,
    fetch_all: bool,
) -> Result<(), String> {
    let Some(h) = hub.upgrade() else {
        return Ok(());
    };
    let wanted: HashSet<String> = lock(&h.state)
        .subscribed_channels()
        .into_iter()
        .map(|c| b.keys.events(&c))
        .collect();
    drop(h);
    let add: Vec<String> = wanted.difference(subscribed).cloned().collect();
    let remove: Vec<String> = subscribed.difference(&wanted).cloned().collect();
    for part in add.chunks(500) {
        match tokio::time::timeout(b.timeout, conn.subscribe(part)).await {
            Ok(Ok(())) => subscribed.extend(part.iter().cloned()),
            Ok(Err(e)) => return Err(format!("SUBSCRIBE failed: {e}")),
            Err(_) => return Err("SUBSCRIBE timed out".into()),
        }
    }
    for part in remove.chunks(500) {
        match tokio::time::timeout(b.timeout, conn.unsubscribe(part)).await {
            Ok(Ok(())) => {
                for c in part {
                    subscribed.remove(c);
                }
            }
            Ok(Err(e)) => return Err(format!("UNSUBSCRIBE failed: {e}")),
            Err(_) => return Err("UNSUBSCRIBE timed out".into()),
        }
    }
    if fetch_all {
        // After a (re)connect: catch up with what was published meanwhile.
        let mut w = lock(&b.want_latest);
        for ch in &wanted {
            if let Some(c) = b.keys.channel_of(ch) {
                w.push(c.to_string());
            }
        }
    }
    Ok(())
}

/// After an outage: writes the latest events handled locally meanwhile back
/// to Redis (compare-and-set by seq, so nothing newer is overwritten) and
/// publishes them, so hosts whose clients missed them catch up.
async fn write_back(hub: &Weak<Hub>, b: &Bridge, conn: &mut RConn) -> Result<(), String> {
    let channels: Vec<String> = lock(&b.unsynced).drain().collect();
    if channels.is_empty() {
        return Ok(());
    }
    let Some(h) = hub.upgrade() else {
        return Ok(());
    };
    let mut n = 0usize;
    for ch in channels {
        let Some((event, data, seq)) = lock(&h.state).latest_parts(&ch) else {
            continue;
        };
        if ch.starts_with("private-upload.") {
            // The streams of this hub ended or went on unseen: they report
            // again if still running. A terminal event closes the aggregation.
            let terminal = matches!(
                event.as_str(),
                "complete" | "completed" | "aborted" | "abort" | "failed" | "fail" | "error"
            );
            let mut inv = b.reset_script.prepare_invoke();
            inv.key(b.keys.agg(&ch))
                .arg(format!("s:{}:", b.id))
                .arg(if terminal { "1" } else { "0" })
                .arg(b.ttl);
            match tokio::time::timeout(b.timeout, conn.invoke::<i64>(&inv)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("writing back {ch}: {e}")),
                Err(_) => return Err(format!("writing back {ch}: timed out")),
            }
        }
        let mut inv = b.event_script.prepare_invoke();
        inv.key(b.keys.latest(&ch))
            .arg(b.keys.events(&ch))
            .arg(&b.id)
            .arg(&event)
            .arg(&data)
            .arg(seq.map_or(String::new(), |s| s.to_string()))
            .arg(b.ttl)
            .arg(if b.settings.cluster { "1" } else { "0" })
            .arg("");
        match tokio::time::timeout(b.timeout, conn.invoke::<i64>(&inv)).await {
            Ok(Ok(_)) => n += 1,
            Ok(Err(e)) => return Err(format!("writing back {ch}: {e}")),
            Err(_) => return Err(format!("writing back {ch}: timed out")),
        }
    }
    if n > 0 {
        log(format_args!(
            "redis: wrote back the latest events of {n} channels handled locally during the outage"
        ));
    }
    Ok(())
}

fn on_push(hub: &Hub, b: &Bridge, p: PushInfo) {
    if !matches!(p.kind, PushKind::Message | PushKind::SMessage) {
        return;
    }
    let (Some(Value::BulkString(ch)), Some(Value::BulkString(payload))) =
        (p.data.first(), p.data.get(1))
    else {
        return;
    };
    let (Ok(ch), Ok(payload)) = (std::str::from_utf8(ch), std::str::from_utf8(payload)) else {
        return;
    };
    let Some(channel) = b.keys.channel_of(ch) else {
        return;
    };
    let Some(w) = parse_wire(payload) else {
        return;
    };
    if w.origin == b.id {
        return;
    }
    Metrics::add(&b.received, 1);
    let ctx = Ctx {
        m: &hub.m,
        cap: hub.tun.queue_cap,
    };
    lock(&hub.state).deliver_remote(&ctx, channel, w.event, w.data, w.seq, w.exclude);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("app{1}");
        let ch = "private-upload.abc";
        assert_eq!(k.latest(ch), "up:app_1_:latest:{private-upload.abc}");
        assert_eq!(k.agg(ch), "up:app_1_:agg:{private-upload.abc}");
        assert_eq!(k.events(ch), "up:app_1_:ev:{private-upload.abc}");
        assert_eq!(k.channel_of(&k.events(ch)), Some(ch));
        assert_eq!(k.channel_of("up:other:ev:{x}"), None);
    }

    #[test]
    fn wire_messages() {
        let w = parse_wire("hub1\n17\n3.99\nprogress\n{\"a\":\n1}").unwrap();
        assert_eq!(
            w,
            Wire {
                origin: "hub1",
                seq: Some(17),
                exclude: Some((3, 99)),
                event: "progress",
                data: "{\"a\":\n1}"
            }
        );
        let w = parse_wire("h\n\n\ne\n").unwrap();
        assert_eq!((w.seq, w.exclude, w.data), (None, None, ""));
        assert!(parse_wire("h\nx\n\ne\nd").is_none());
        assert!(parse_wire("h\n1").is_none());
    }

    #[test]
    fn terminal_prefixes() {
        let (p, has_total) =
            terminal_prefix("u1", "complete", r#"{"path":"/x","seq":4,"bytes_total":9}"#);
        assert!(has_total);
        let full = format!("{p}\"seq\":12}}");
        let v: serde_json::Value = serde_json::from_str(&full).unwrap();
        assert_eq!(v["seq"], 12);
        assert_eq!(v["state"], "complete");
        assert_eq!(v["upload_id"], "u1");
        assert_eq!(v["path"], "/x");
        let (p, has_total) = terminal_prefix("u1", "aborted", "not json");
        assert!(!has_total);
        let v: serde_json::Value = serde_json::from_str(&format!("{p}\"seq\":1}}")).unwrap();
        assert_eq!(v["state"], "aborted");
    }
}
