//! Channels, subscribers, fan-out, latest events and upload aggregation.
//!
//! Everything here runs under the hub's state mutex and never waits: a
//! subscriber whose queue is full is evicted, not waited for.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{lock, now_ms, now_us, Metrics};
use crate::protocol::ingest::{ProgressReport, StreamOutcome};
use crate::protocol::pusher;

/// Bytes of retained latest events above which the oldest ones of channels
/// without subscribers are dropped early.
const MAX_LATEST_BYTES: usize = 64 << 20;
/// Upload aggregations kept at most (the oldest are forgotten first).
const MAX_UPLOADS: usize = 100_000;

// ---------------------------------------------------------------- connections

/// The part of a WebSocket connection that other tasks see: a small bounded
/// queue of serialized frames and a close request.
pub(crate) struct Conn {
    pub id: u64,
    pub rand: u32,
    q: Mutex<Queue>,
    pub notify: Notify,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Utf8Bytes>,
    close: Option<(u16, &'static str)>,
}

pub(crate) enum Push {
    Ok,
    /// The queue was full: the connection is now marked for eviction.
    Full,
    Closed,
}

pub(crate) enum Pop {
    Msg(Utf8Bytes),
    Close(u16, &'static str),
    Empty,
}

impl Conn {
    pub fn new(id: u64, rand: u32) -> Conn {
        Conn {
            id,
            rand,
            q: Mutex::new(Queue::default()),
            notify: Notify::new(),
        }
    }

    pub fn socket_id(&self) -> String {
        format!("{}.{}", self.id, self.rand)
    }

    /// Queues a frame; never blocks. A full queue marks the connection as a
    /// slow consumer (closed with 4100).
    pub fn push(&self, frame: Utf8Bytes, cap: usize) -> Push {
        let mut q = lock(&self.q);
        if q.close.is_some() {
            return Push::Closed;
        }
        if q.items.len() >= cap {
            q.items = VecDeque::new();
            q.close = Some((4100, "Slow consumer: too many undelivered messages"));
            drop(q);
            self.notify.notify_one();
            return Push::Full;
        }
        q.items.push_back(frame);
        drop(q);
        self.notify.notify_one();
        Push::Ok
    }

    /// Asks the connection's task to close with `code`; false when already closing.
    pub fn close(&self, code: u16, reason: &'static str) -> bool {
        let mut q = lock(&self.q);
        if q.close.is_some() {
            return false;
        }
        q.close = Some((code, reason));
        q.items = VecDeque::new();
        drop(q);
        self.notify.notify_one();
        true
    }

    /// Next thing the connection's task must do. A close request wins over
    /// queued frames.
    pub fn pop(&self) -> Pop {
        let mut q = lock(&self.q);
        if let Some((code, reason)) = q.close {
            return Pop::Close(code, reason);
        }
        match q.items.pop_front() {
            Some(m) => Pop::Msg(m),
            None => {
                if q.items.capacity() > 16 {
                    q.items = VecDeque::new();
                }
                Pop::Empty
            }
        }
    }
}

// ---------------------------------------------------------------- frames

/// Appends `s` as a JSON string literal.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                use std::fmt::Write;
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `{"event":E,"channel":C,"data":"<data as a JSON string>"}`.
pub(crate) fn frame(event: &str, channel: Option<&str>, data: &str) -> String {
    let mut out = String::with_capacity(40 + event.len() + data.len() * 11 / 10);
    out.push_str("{\"event\":");
    push_json_str(&mut out, event);
    if let Some(c) = channel {
        out.push_str(",\"channel\":");
        push_json_str(&mut out, c);
    }
    out.push_str(",\"data\":");
    push_json_str(&mut out, data);
    out.push('}');
    out
}

/// `{"event":E,"channel":C,"data":<object>}`: errors carry objects, as Pusher sends them.
pub(crate) fn frame_obj(event: &str, channel: Option<&str>, data: &serde_json::Value) -> String {
    let mut out = String::with_capacity(80);
    out.push_str("{\"event\":");
    push_json_str(&mut out, event);
    if let Some(c) = channel {
        out.push_str(",\"channel\":");
        push_json_str(&mut out, c);
    }
    out.push_str(",\"data\":");
    out.push_str(&data.to_string());
    out.push('}');
    out
}

/// The `data` string of a serialized frame.
fn frame_data(frame: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct F {
        data: String,
    }
    serde_json::from_str::<F>(frame).ok().map(|f| f.data)
}

/// `seq` of an event whose data is a JSON object with a numeric `seq`.
pub(crate) fn data_seq(data: &str) -> Option<u64> {
    if !data.contains("\"seq\"") {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct S {
        seq: Option<serde_json::Value>,
    }
    let s: S = serde_json::from_str(data).ok()?;
    match s.seq? {
        serde_json::Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        _ => None,
    }
}

/// Names of the events the hub makes on `private-upload.<id>` (and the aliases
/// it treats as terminal).
pub(crate) const UPLOAD_EVENTS: [&str; 8] = [
    "progress",
    "complete",
    "completed",
    "aborted",
    "abort",
    "failed",
    "fail",
    "error",
];

/// Why a published event (`publish()`, the HTTP events API) is refused, if it
/// is: on an upload channel it must neither look like an upload event (name)
/// nor carry a `seq` (a client drops every later event whose seq is not above it).
pub(crate) fn refuse_published(channel: &str, event: &str, data: &str) -> Option<String> {
    if !channel.starts_with("private-upload.") {
        return None;
    }
    if UPLOAD_EVENTS.contains(&event) {
        return Some(format!(
            "event {event:?} on {channel:?} is reserved for the upload's own events"
        ));
    }
    if data.contains("\"seq\"") {
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(data) {
            if m.contains_key("seq") {
                return Some(format!(
                    "data with a \"seq\" member on {channel:?}: seq is the upload's own"
                ));
            }
        }
    }
    None
}

// ---------------------------------------------------------------- state

struct Channel {
    subs: HashMap<u64, Arc<Conn>>,
    latest: Option<Utf8Bytes>,
    last_seq: u64,
    last_event: Instant,
    /// A terminal upload event was delivered: later reports of that upload are stale.
    finished: bool,
    presence: Option<Box<Presence>>,
}

impl Channel {
    fn new() -> Channel {
        Channel {
            subs: HashMap::new(),
            latest: None,
            last_seq: 0,
            last_event: Instant::now(),
            finished: false,
            presence: None,
        }
    }
}

#[derive(Default)]
struct Presence {
    /// user id → (user_info JSON text, connections of that user)
    members: HashMap<String, (String, u32)>,
    by_conn: HashMap<u64, String>,
}

struct Upload {
    bytes_total: u64,
    chunk_count: u32,
    stored: u64,
    chunks_done: u32,
    inflight: Vec<(u64, u64)>,
    rate: Rate,
    last_at: Instant,
}

/// Smoothed bytes per second.
struct Rate {
    anchor_t: Instant,
    anchor_b: u64,
    bps: f64,
    known: bool,
}

impl Rate {
    const WINDOW: Duration = Duration::from_millis(300);

    fn new(now: Instant, bytes: u64) -> Rate {
        Rate {
            anchor_t: now,
            anchor_b: bytes,
            bps: 0.0,
            known: false,
        }
    }

    fn update(&mut self, now: Instant, bytes: u64) {
        if bytes < self.anchor_b {
            // Bytes were lost (failed stream): restart the window from here.
            self.anchor_b = bytes;
            self.anchor_t = now;
            return;
        }
        let dt = now.saturating_duration_since(self.anchor_t);
        if dt < Self::WINDOW {
            return;
        }
        let inst = (bytes - self.anchor_b) as f64 / dt.as_secs_f64();
        self.bps = if self.known {
            0.6 * self.bps + 0.4 * inst
        } else {
            inst
        };
        self.known = true;
        self.anchor_t = now;
        self.anchor_b = bytes;
    }
}

impl Upload {
    fn bytes_done(&self) -> u64 {
        let sum = self
            .stored
            .saturating_add(self.inflight.iter().map(|(_, b)| *b).sum::<u64>());
        if self.bytes_total > 0 {
            sum.min(self.bytes_total)
        } else {
            sum
        }
    }
}

pub(crate) struct Ctx<'a> {
    pub m: &'a Metrics,
    pub cap: usize,
}

#[derive(Default)]
pub(crate) struct State {
    channels: HashMap<Box<str>, Channel>,
    uploads: HashMap<Box<str>, Upload>,
    pub subscriptions: usize,
    latest_bytes: usize,
}

/// What a subscribe produced: the `subscription_succeeded` data and the
/// latest event to replay.
pub(crate) struct Subscribed {
    pub data: String,
    pub replay: Option<Utf8Bytes>,
    /// The channel had no local subscriber before.
    pub first: bool,
}

pub(crate) fn upload_channel(upload_id: &str) -> String {
    format!("private-upload.{upload_id}")
}

impl State {
    /// Channels with at least one subscriber.
    pub fn channel_count(&self) -> usize {
        self.channels
            .values()
            .filter(|c| !c.subs.is_empty())
            .count()
    }

    /// Channels known, including those that only keep a latest event.
    pub fn retained_count(&self) -> usize {
        self.channels.len()
    }

    /// Sends `event` to every subscriber of `channel` (but `exclude`) and
    /// keeps it as the channel's latest event. False when dropped as stale.
    pub fn deliver(
        &mut self,
        ctx: &Ctx<'_>,
        channel: &str,
        event: &str,
        data: &str,
        seq: Option<u64>,
        exclude: Option<(u64, u32)>,
    ) -> bool {
        Metrics::add(&ctx.m.events_in, 1);
        if !self.channels.contains_key(channel) {
            self.channels.insert(channel.into(), Channel::new());
        }
        let Some(ch) = self.channels.get_mut(channel) else {
            return false;
        };
        if seq.is_none() && channel.starts_with("private-upload.") {
            // Published (not made by the hub from upload reports): delivered,
            // but it never becomes the channel's latest event, moves its seq
            // or ends it.
            let text = Utf8Bytes::from(frame(event, Some(channel), data));
            let evicted = fan_out(ctx, ch, &text, exclude);
            self.subscriptions = self.subscriptions.saturating_sub(evicted);
            if ch.subs.is_empty() && ch.latest.is_none() {
                self.channels.remove(channel);
            }
            return true;
        }
        if let Some(s) = seq {
            if s <= ch.last_seq {
                Metrics::add(&ctx.m.events_dropped, 1);
                return false;
            }
            ch.last_seq = s;
        }
        let text = Utf8Bytes::from(frame(event, Some(channel), data));
        let evicted = fan_out(ctx, ch, &text, exclude);
        self.latest_bytes += text.len();
        if let Some(old) = ch.latest.replace(text) {
            self.latest_bytes = self.latest_bytes.saturating_sub(old.len());
        }
        ch.last_event = Instant::now();
        self.subscriptions = self.subscriptions.saturating_sub(evicted);
        if self.latest_bytes > MAX_LATEST_BYTES {
            self.trim_latest(MAX_LATEST_BYTES * 3 / 4);
        }
        true
    }

    /// Next seq of an upload event on `channel`: rises with every event and
    /// across hub restarts (unix microseconds).
    fn next_seq(&self, channel: &str) -> u64 {
        let last = self.channels.get(channel).map_or(0, |c| c.last_seq);
        last.saturating_add(1).max(now_us())
    }

    pub fn subscribe(
        &mut self,
        ctx: &Ctx<'_>,
        conn: &Arc<Conn>,
        channel: &str,
        member: Option<(String, String)>,
    ) -> Subscribed {
        if !self.channels.contains_key(channel) {
            self.channels.insert(channel.into(), Channel::new());
        }
        let Some(ch) = self.channels.get_mut(channel) else {
            return Subscribed {
                data: "{}".into(),
                replay: None,
                first: false,
            };
        };
        let first = ch.subs.is_empty();
        if ch.subs.insert(conn.id, conn.clone()).is_none() {
            self.subscriptions += 1;
        }
        let mut data = "{}".to_string();
        if let Some((user_id, info)) = member {
            let p = ch.presence.get_or_insert_with(Default::default);
            let mut added = None;
            if p.by_conn.insert(conn.id, user_id.clone()).is_none() {
                let e = p
                    .members
                    .entry(user_id.clone())
                    .or_insert_with(|| (info.clone(), 0));
                e.1 += 1;
                if e.1 == 1 {
                    added = Some(format!(
                        "{{\"user_id\":{},\"user_info\":{}}}",
                        serde_json::Value::String(user_id),
                        info
                    ));
                }
            }
            let mut ids = Vec::with_capacity(p.members.len());
            let mut hash = serde_json::Map::new();
            for (id, (info, _)) in &p.members {
                ids.push(serde_json::Value::String(id.clone()));
                let v = serde_json::from_str(info).unwrap_or(serde_json::Value::Null);
                hash.insert(id.clone(), v);
            }
            data = serde_json::json!({"presence": {"ids": ids, "hash": hash, "count": p.members.len()}})
                .to_string();
            if let Some(added) = added {
                let text =
                    Utf8Bytes::from(frame("pusher_internal:member_added", Some(channel), &added));
                let n = fan_out(ctx, ch, &text, Some((conn.id, conn.rand)));
                self.subscriptions = self.subscriptions.saturating_sub(n);
            }
        }
        let replay = self.channels.get(channel).and_then(|c| c.latest.clone());
        if replay.is_some() {
            Metrics::add(&ctx.m.events_out, 1);
        }
        Subscribed {
            data,
            replay,
            first,
        }
    }

    /// Removes `conn` from `channel`; true when the channel has no local subscriber left.
    pub fn unsubscribe(&mut self, ctx: &Ctx<'_>, conn: &Conn, channel: &str) -> bool {
        let Some(ch) = self.channels.get_mut(channel) else {
            return false;
        };
        let had = !ch.subs.is_empty();
        if ch.subs.remove(&conn.id).is_some() {
            self.subscriptions = self.subscriptions.saturating_sub(1);
        }
        let mut removed_user = None;
        if let Some(p) = ch.presence.as_mut() {
            if let Some(uid) = p.by_conn.remove(&conn.id) {
                if let Some(e) = p.members.get_mut(&uid) {
                    e.1 = e.1.saturating_sub(1);
                    if e.1 == 0 {
                        p.members.remove(&uid);
                        removed_user = Some(uid);
                    }
                }
            }
            if p.members.is_empty() {
                ch.presence = None;
            }
        }
        if let Some(uid) = removed_user {
            let data = format!("{{\"user_id\":{}}}", serde_json::Value::String(uid));
            let text = Utf8Bytes::from(frame(
                "pusher_internal:member_removed",
                Some(channel),
                &data,
            ));
            let n = fan_out(ctx, ch, &text, None);
            self.subscriptions = self.subscriptions.saturating_sub(n);
        }
        let emptied = had && ch.subs.is_empty();
        if ch.subs.is_empty() && ch.latest.is_none() {
            self.channels.remove(channel);
        }
        emptied
    }

    // ------------------------------------------------------------ redis bridge

    /// Highest seq delivered on `channel` (0: none).
    pub fn last_seq(&self, channel: &str) -> u64 {
        self.channels.get(channel).map_or(0, |c| c.last_seq)
    }

    /// Channels with at least one local subscriber.
    pub fn subscribed_channels(&self) -> Vec<Box<str>> {
        self.channels
            .iter()
            .filter(|(_, c)| !c.subs.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Event name, data and seq of the latest event of `channel`.
    pub fn latest_parts(&self, channel: &str) -> Option<(String, String, Option<u64>)> {
        #[derive(serde::Deserialize)]
        struct F {
            event: String,
            data: String,
        }
        let ch = self.channels.get(channel)?;
        let f: F = serde_json::from_str(ch.latest.as_ref()?.as_str()).ok()?;
        let seq = data_seq(&f.data).filter(|s| *s == ch.last_seq);
        Some((f.event, f.data, seq))
    }

    /// Delivers an event that came through Redis (or was built there); a
    /// terminal upload event closes the local aggregation of that upload.
    pub fn deliver_remote(
        &mut self,
        ctx: &Ctx<'_>,
        channel: &str,
        event: &str,
        data: &str,
        seq: Option<u64>,
        exclude: Option<(u64, u32)>,
    ) -> bool {
        if !self.deliver(ctx, channel, event, data, seq, exclude) {
            return false;
        }
        if seq.is_none() {
            return true;
        }
        if let Some(id) = channel.strip_prefix("private-upload.") {
            if matches!(
                event,
                "complete" | "completed" | "aborted" | "abort" | "failed" | "fail" | "error"
            ) {
                self.uploads.remove(id);
                if let Some(ch) = self.channels.get_mut(channel) {
                    ch.finished = true;
                }
            }
        }
        true
    }

    /// A latest event fetched from Redis: delivered when it is newer than
    /// what this hub has (by seq; without seq only when there is nothing).
    pub fn offer_latest(
        &mut self,
        ctx: &Ctx<'_>,
        channel: &str,
        event: &str,
        data: &str,
        seq: Option<u64>,
    ) -> bool {
        let Some(ch) = self.channels.get(channel) else {
            return false;
        };
        let newer = match seq {
            Some(s) => s > ch.last_seq,
            None => ch.latest.is_none(),
        };
        newer && self.deliver_remote(ctx, channel, event, data, seq, None)
    }

    /// The JSON data of the latest event of `private-upload.<id>`.
    pub fn latest_upload_data(&self, upload_id: &str) -> Option<String> {
        let ch = self.channels.get(upload_channel(upload_id).as_str())?;
        frame_data(ch.latest.as_ref()?.as_str())
    }

    // ------------------------------------------------------------ uploads

    fn upload_is_finished(&self, channel: &str) -> bool {
        self.channels.get(channel).is_some_and(|c| c.finished)
    }

    pub fn progress(&mut self, ctx: &Ctx<'_>, r: &ProgressReport) {
        let channel = upload_channel(&r.upload_id);
        if pusher::validate_channel(&channel).is_err() || self.upload_is_finished(&channel) {
            Metrics::add(&ctx.m.events_dropped, 1);
            return;
        }
        let now = Instant::now();
        if !self.uploads.contains_key(r.upload_id.as_str()) {
            if self.uploads.len() >= MAX_UPLOADS {
                self.forget_oldest_upload();
            }
            let u = Upload {
                bytes_total: r.bytes_total,
                chunk_count: r.chunk_count,
                stored: r.stored_bytes,
                chunks_done: r.chunks_done,
                inflight: Vec::new(),
                rate: Rate::new(now, r.stored_bytes),
                last_at: now,
            };
            self.uploads.insert(r.upload_id.as_str().into(), u);
        }
        let Some(u) = self.uploads.get_mut(r.upload_id.as_str()) else {
            return;
        };
        if r.bytes_total > 0 {
            u.bytes_total = r.bytes_total;
        }
        if r.chunk_count > 0 {
            u.chunk_count = r.chunk_count;
        }
        u.stored = u.stored.max(r.stored_bytes);
        u.chunks_done = u.chunks_done.max(r.chunks_done);
        match u.inflight.iter_mut().find(|(s, _)| *s == r.stream) {
            Some(e) => e.1 = r.inflight,
            None => {
                if u.inflight.len() < 1024 {
                    u.inflight.push((r.stream, r.inflight))
                }
            }
        }
        u.last_at = now;
        self.emit_progress(ctx, &r.upload_id, &channel);
    }

    pub fn stream_end(
        &mut self,
        ctx: &Ctx<'_>,
        upload_id: &str,
        stream: u64,
        outcome: StreamOutcome,
        stored_bytes: u64,
        chunks_done: u32,
    ) {
        let channel = upload_channel(upload_id);
        if pusher::validate_channel(&channel).is_err() || self.upload_is_finished(&channel) {
            Metrics::add(&ctx.m.events_dropped, 1);
            return;
        }
        if !self.uploads.contains_key(upload_id)
            && !self.revive_upload(upload_id, &channel, stored_bytes, chunks_done)
        {
            // Nothing known about its size (the hub restarted): nothing to report.
            Metrics::add(&ctx.m.events_dropped, 1);
            return;
        }
        let Some(u) = self.uploads.get_mut(upload_id) else {
            return;
        };
        u.inflight.retain(|(s, _)| *s != stream);
        if outcome == StreamOutcome::Stored {
            u.stored = u.stored.max(stored_bytes);
            u.chunks_done = u.chunks_done.max(chunks_done);
        }
        u.last_at = Instant::now();
        self.emit_progress(ctx, upload_id, &channel);
    }

    /// Rebuilds an aggregation from the latest progress event (after a hub restart).
    fn revive_upload(
        &mut self,
        upload_id: &str,
        channel: &str,
        stored_bytes: u64,
        chunks_done: u32,
    ) -> bool {
        let Some(data) = self
            .channels
            .get(channel)
            .and_then(|c| c.latest.as_ref())
            .and_then(|f| frame_data(f.as_str()))
        else {
            return false;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) else {
            return false;
        };
        let num = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        if num("bytes_total") == 0 {
            return false;
        }
        let now = Instant::now();
        self.uploads.insert(
            upload_id.into(),
            Upload {
                bytes_total: num("bytes_total"),
                chunk_count: num("chunk_count") as u32,
                stored: stored_bytes,
                chunks_done,
                inflight: Vec::new(),
                rate: Rate::new(now, stored_bytes),
                last_at: now,
            },
        );
        true
    }

    fn emit_progress(&mut self, ctx: &Ctx<'_>, upload_id: &str, channel: &str) {
        let seq = self.next_seq(channel);
        let now = Instant::now();
        let Some(u) = self.uploads.get_mut(upload_id) else {
            return;
        };
        let done = u.bytes_done();
        u.rate.update(now, done);
        let rate = if u.rate.known {
            u.rate.bps.round().max(0.0) as u64
        } else {
            0
        };
        let eta = if u.bytes_total > 0 && done >= u.bytes_total {
            "0".to_string()
        } else if rate > 0 && u.bytes_total > 0 {
            (u.bytes_total - done).div_ceil(rate).to_string()
        } else {
            "null".to_string()
        };
        let mut data = String::with_capacity(256);
        data.push_str("{\"upload_id\":");
        push_json_str(&mut data, upload_id);
        use std::fmt::Write;
        let _ = write!(
            data,
            ",\"seq\":{seq},\"state\":\"uploading\",\"bytes_done\":{done},\"bytes_total\":{},\"chunks_done\":{},\"chunk_count\":{},\"rate_bps\":{rate},\"eta_s\":{eta},\"ts_ms\":{}}}",
            u.bytes_total,
            u.chunks_done,
            u.chunk_count,
            now_ms()
        );
        self.deliver(ctx, channel, "progress", &data, Some(seq), None);
    }

    pub fn terminal(&mut self, ctx: &Ctx<'_>, upload_id: &str, event: &str, fields: &str) {
        let channel = upload_channel(upload_id);
        if pusher::validate_channel(&channel).is_err() || pusher::validate_event(event).is_err() {
            Metrics::add(&ctx.m.events_dropped, 1);
            return;
        }
        let mut obj = terminal_data(upload_id, event, fields);
        let upload = self.uploads.remove(upload_id);
        if let Some(u) = &upload {
            if u.bytes_total > 0 && !obj.contains_key("bytes_total") {
                obj.insert("bytes_total".into(), u.bytes_total.into());
            }
        }
        let seq = self.next_seq(&channel);
        obj.insert("seq".into(), seq.into());
        let data = serde_json::Value::Object(obj).to_string();
        if self.deliver(ctx, &channel, event, &data, Some(seq), None) {
            if let Some(ch) = self.channels.get_mut(channel.as_str()) {
                ch.finished = true;
            }
        }
    }

    fn forget_oldest_upload(&mut self) {
        if let Some(k) = self
            .uploads
            .iter()
            .min_by_key(|(_, u)| u.last_at)
            .map(|(k, _)| k.clone())
        {
            self.uploads.remove(&k);
        }
    }

    // ------------------------------------------------------------ memory bounds

    /// Forgets idle uploads and latest events of channels without subscribers
    /// older than `retention`.
    pub fn sweep(&mut self, retention: Duration) {
        let now = Instant::now();
        self.uploads
            .retain(|_, u| now.saturating_duration_since(u.last_at) < retention);
        let mut freed = 0usize;
        self.channels.retain(|_, c| {
            let keep = !c.subs.is_empty()
                || (c.latest.is_some() && now.saturating_duration_since(c.last_event) < retention);
            if !keep {
                freed += c.latest.as_ref().map_or(0, |l| l.len());
            }
            keep
        });
        self.latest_bytes = self.latest_bytes.saturating_sub(freed);
    }

    /// Drops the oldest latest events of channels without subscribers until
    /// at most `target` bytes are retained.
    fn trim_latest(&mut self, target: usize) {
        let mut idle: Vec<(Instant, Box<str>)> = self
            .channels
            .iter()
            .filter(|(_, c)| c.subs.is_empty() && c.latest.is_some())
            .map(|(k, c)| (c.last_event, k.clone()))
            .collect();
        idle.sort();
        for (_, k) in idle {
            if self.latest_bytes <= target {
                break;
            }
            if let Some(c) = self.channels.remove(&k) {
                let n = c.latest.as_ref().map_or(0, |l| l.len());
                self.latest_bytes = self.latest_bytes.saturating_sub(n);
            }
        }
    }
}

/// Queues `text` to every subscriber of `ch` but `exclude`; returns how many
/// subscribers were evicted as slow consumers (already removed from `ch`).
fn fan_out(
    ctx: &Ctx<'_>,
    ch: &mut Channel,
    text: &Utf8Bytes,
    exclude: Option<(u64, u32)>,
) -> usize {
    let mut evicted: Vec<u64> = Vec::new();
    let mut sent = 0u64;
    for (id, c) in &ch.subs {
        if exclude.is_some_and(|(i, r)| i == *id && r == c.rand) {
            continue;
        }
        match c.push(text.clone(), ctx.cap) {
            Push::Ok => sent += 1,
            Push::Full => evicted.push(*id),
            Push::Closed => {}
        }
    }
    Metrics::add(&ctx.m.events_out, sent);
    if !evicted.is_empty() {
        Metrics::add(&ctx.m.evictions, evicted.len() as u64);
        Metrics::add(&ctx.m.events_dropped, evicted.len() as u64);
        for id in &evicted {
            ch.subs.remove(id);
        }
    }
    evicted.len()
}

/// The members of a terminal upload event but `seq`: the report's own
/// fields (a JSON object text) with `upload_id`, `state` and `ts_ms`.
pub(crate) fn terminal_data(
    upload_id: &str,
    event: &str,
    fields: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let state = match event {
        "complete" | "completed" => "complete",
        "aborted" | "abort" => "aborted",
        "failed" | "fail" | "error" => "failed",
        other => other,
    };
    let mut obj = match serde_json::from_str::<serde_json::Value>(fields) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    obj.remove("seq");
    obj.insert("upload_id".into(), upload_id.into());
    obj.insert("state".into(), state.into());
    obj.insert("ts_ms".into(), now_ms().into());
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(m: &Metrics) -> Ctx<'_> {
        Ctx { m, cap: 4 }
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\u0001é\"");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\n\u{1}é");
        let f = frame("e", Some("c"), "{\"x\":1}");
        assert_eq!(f, r#"{"event":"e","channel":"c","data":"{\"x\":1}"}"#);
        assert_eq!(frame_data(&f).unwrap(), "{\"x\":1}");
    }

    #[test]
    fn seq_is_read_from_objects_only() {
        assert_eq!(data_seq(r#"{"seq":5,"a":1}"#), Some(5));
        assert_eq!(data_seq(r#"{"a":"seq"}"#), None);
        assert_eq!(data_seq(r#"{"seq":"5"}"#), None);
        assert_eq!(data_seq(r#"["seq"]"#), None);
        assert_eq!(data_seq("plain"), None);
    }

    #[test]
    fn stale_seq_is_dropped_and_latest_kept() {
        let m = Metrics::default();
        let mut st = State::default();
        let c = Arc::new(Conn::new(1, 7));
        st.subscribe(&ctx(&m), &c, "ch", None);
        assert!(st.deliver(&ctx(&m), "ch", "e", r#"{"seq":5}"#, Some(5), None));
        assert!(!st.deliver(&ctx(&m), "ch", "e", r#"{"seq":5}"#, Some(5), None));
        assert!(!st.deliver(&ctx(&m), "ch", "e", r#"{"seq":4}"#, Some(4), None));
        assert!(st.deliver(&ctx(&m), "ch", "e", r#"{"seq":6}"#, Some(6), None));
        assert_eq!(Metrics::get(&m.events_dropped), 2);
        let mut got = vec![];
        while let Pop::Msg(x) = c.pop() {
            got.push(x.to_string());
        }
        assert_eq!(got.len(), 2);
        assert!(got[1].contains("\\\"seq\\\":6"));
    }

    #[test]
    fn full_queue_evicts() {
        let m = Metrics::default();
        let mut st = State::default();
        let c = Arc::new(Conn::new(1, 7));
        st.subscribe(&ctx(&m), &c, "ch", None);
        for _ in 0..5 {
            st.deliver(&ctx(&m), "ch", "e", "x", None, None);
        }
        assert_eq!(Metrics::get(&m.evictions), 1);
        assert_eq!(st.subscriptions, 0);
        assert!(matches!(c.pop(), Pop::Close(4100, _)));
    }

    #[test]
    fn aggregation_of_parallel_streams() {
        let m = Metrics::default();
        let mut st = State::default();
        let c = Arc::new(Conn::new(1, 7));
        st.subscribe(&ctx(&m), &c, "private-upload.u1", None);
        let rep = |stream, inflight, stored, done| ProgressReport {
            upload_id: "u1".into(),
            stream,
            bytes_total: 1000,
            chunk_count: 10,
            stored_bytes: stored,
            chunks_done: done,
            inflight,
        };
        st.progress(&ctx(&m), &rep(1, 50, 0, 0));
        st.progress(&ctx(&m), &rep(2, 70, 0, 0));
        st.stream_end(&ctx(&m), "u1", 1, StreamOutcome::Stored, 100, 1);
        st.stream_end(&ctx(&m), "u1", 2, StreamOutcome::Failed, 100, 1);
        let data = st.latest_upload_data("u1").unwrap();
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["bytes_done"], 100);
        assert_eq!(v["chunks_done"], 1);
        assert_eq!(v["state"], "uploading");
        let mut done = vec![];
        while let Pop::Msg(_) = c.pop() {
            done.push(());
        }
        // Queue cap 4 and 4 events: nothing evicted.
        assert_eq!(done.len(), 4);
        st.terminal(&ctx(&m), "u1", "complete", r#"{"path":"/x","seq":1}"#);
        let v: serde_json::Value =
            serde_json::from_str(&st.latest_upload_data("u1").unwrap()).unwrap();
        assert_eq!(v["state"], "complete");
        assert_eq!(v["bytes_total"], 1000);
        assert_eq!(v["path"], "/x");
        assert!(v["seq"].as_u64().unwrap() > 1);
        // Late reports after the terminal event are dropped.
        st.progress(&ctx(&m), &rep(3, 5, 0, 0));
        let v: serde_json::Value =
            serde_json::from_str(&st.latest_upload_data("u1").unwrap()).unwrap();
        assert_eq!(v["state"], "complete");
    }

    #[test]
    fn sweep_forgets_idle_channels() {
        let m = Metrics::default();
        let mut st = State::default();
        st.deliver(&ctx(&m), "a", "e", "x", None, None);
        assert_eq!(st.retained_count(), 1);
        st.sweep(Duration::from_secs(3600));
        assert_eq!(st.retained_count(), 1);
        st.sweep(Duration::ZERO);
        assert_eq!(st.retained_count(), 0);
        assert_eq!(st.latest_bytes, 0);
    }
}
