//! The upload aggregator of one host: folds the reports of PHP workers (per
//! body stream: in-flight bytes; per upload: stored bytes and chunks) into
//! `progress` events with a smoothed rate and an ETA, and builds terminal
//! events. It returns the events; the router delivers them. (With Redis the
//! same aggregation runs in `redis/upload.lua`, across hosts.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::event::{is_upload_channel, ChannelEvent, StreamEnd, Terminal, TerminalKind};
use super::now_ms;
use crate::protocol::frames::Progress;
use crate::protocol::ingest::{ProgressReport, StreamOutcome};

/// Upload aggregations kept at most (the oldest are forgotten first).
const MAX_UPLOADS: usize = 100_000;

/// Why a published event (`publish()`, the HTTP events API) is refused, if it
/// is: on an upload channel it must neither look like an upload event (name)
/// nor carry a `seq` (a client drops every later event whose seq is not above it).
pub(crate) fn refuse_published(channel: &str, event: &str, data: &str) -> Option<String> {
    if !is_upload_channel(channel) {
        return None;
    }
    if TerminalKind::is_upload_event(event) {
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

/// The uploads this host aggregates.
#[derive(Default)]
pub(crate) struct Uploads {
    map: HashMap<Box<str>, Upload>,
}

impl Uploads {
    /// A progress report; `seq` is the next seq of the upload's channel.
    pub fn progress(&mut self, r: &ProgressReport, seq: u64) -> Option<ChannelEvent> {
        let now = Instant::now();
        if !self.map.contains_key(r.upload_id.as_str()) {
            if self.map.len() >= MAX_UPLOADS {
                self.forget_oldest();
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
            self.map.insert(r.upload_id.as_str().into(), u);
        }
        let u = self.map.get_mut(r.upload_id.as_str())?;
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
        self.progress_event(&r.upload_id, seq)
    }

    /// A body stream ended. `latest` is the data of the channel's latest
    /// event, to rebuild an aggregation the hub forgot (restart); None when
    /// nothing is known about the upload's size.
    pub fn stream_end(
        &mut self,
        r: &StreamEnd,
        seq: u64,
        latest: Option<String>,
    ) -> Option<ChannelEvent> {
        if !self.map.contains_key(r.upload_id.as_str()) {
            self.revive(r, latest?)?;
        }
        let u = self.map.get_mut(r.upload_id.as_str())?;
        u.inflight.retain(|(s, _)| *s != r.stream);
        if r.outcome == StreamOutcome::Stored {
            u.stored = u.stored.max(r.stored_bytes);
            u.chunks_done = u.chunks_done.max(r.chunks_done);
        }
        u.last_at = Instant::now();
        self.progress_event(&r.upload_id, seq)
    }

    /// Rebuilds an aggregation from the latest progress event (after a hub restart).
    fn revive(&mut self, r: &StreamEnd, latest: String) -> Option<()> {
        let v = serde_json::from_str::<serde_json::Value>(&latest).ok()?;
        let num = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        if num("bytes_total") == 0 {
            return None;
        }
        let now = Instant::now();
        self.map.insert(
            r.upload_id.as_str().into(),
            Upload {
                bytes_total: num("bytes_total"),
                chunk_count: num("chunk_count") as u32,
                stored: r.stored_bytes,
                chunks_done: r.chunks_done,
                inflight: Vec::new(),
                rate: Rate::new(now, r.stored_bytes),
                last_at: now,
            },
        );
        Some(())
    }

    fn progress_event(&mut self, upload_id: &str, seq: u64) -> Option<ChannelEvent> {
        let now = Instant::now();
        let u = self.map.get_mut(upload_id)?;
        let done = u.bytes_done();
        u.rate.update(now, done);
        let rate = if u.rate.known {
            u.rate.bps.round().max(0.0) as u64
        } else {
            0
        };
        let eta_s = if u.bytes_total > 0 && done >= u.bytes_total {
            Some(0)
        } else if rate > 0 && u.bytes_total > 0 {
            Some((u.bytes_total - done).div_ceil(rate))
        } else {
            None
        };
        let data = Progress {
            upload_id,
            seq,
            state: "uploading",
            bytes_done: done,
            bytes_total: u.bytes_total,
            chunks_done: u.chunks_done,
            chunk_count: u.chunk_count,
            rate_bps: rate,
            eta_s,
            ts_ms: now_ms(),
        };
        Some(ChannelEvent {
            channel: super::event::upload_channel(upload_id),
            event: "progress".into(),
            data: serde_json::to_string(&data).unwrap_or_default(),
            seq: Some(seq),
            exclude: None,
        })
    }

    /// A terminal report: the aggregation ends; the event carries the
    /// report's fields, and the upload's size when the fields do not.
    pub fn terminal(&mut self, r: &Terminal, seq: u64) -> ChannelEvent {
        let mut obj = terminal_data(&r.upload_id, &r.event, &r.fields);
        if let Some(u) = self.map.remove(r.upload_id.as_str()) {
            if u.bytes_total > 0 && !obj.contains_key("bytes_total") {
                obj.insert("bytes_total".into(), u.bytes_total.into());
            }
        }
        obj.insert("seq".into(), seq.into());
        ChannelEvent {
            channel: super::event::upload_channel(&r.upload_id),
            event: r.event.clone(),
            data: serde_json::Value::Object(obj).to_string(),
            seq: Some(seq),
            exclude: None,
        }
    }

    /// A terminal event of the upload was delivered (here or on another host).
    pub fn finish(&mut self, upload_id: &str) {
        self.map.remove(upload_id);
    }

    fn forget_oldest(&mut self) {
        if let Some(k) = self
            .map
            .iter()
            .min_by_key(|(_, u)| u.last_at)
            .map(|(k, _)| k.clone())
        {
            self.map.remove(&k);
        }
    }

    /// Forgets uploads without a report for `retention`.
    pub fn sweep(&mut self, retention: Duration) {
        let now = Instant::now();
        self.map
            .retain(|_, u| now.saturating_duration_since(u.last_at) < retention);
    }
}

/// The members of a terminal upload event but `seq`: the report's own
/// fields (a JSON object text) with `upload_id`, `state` and `ts_ms`.
pub(crate) fn terminal_data(
    upload_id: &str,
    event: &str,
    fields: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let state = TerminalKind::of(event).map_or(event, |k| k.state());
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
