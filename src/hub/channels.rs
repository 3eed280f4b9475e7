//! Channels: their local subscribers, presence members and latest event, and
//! the fan-out of one event to the subscribers of one channel.
//!
//! Everything here runs under the hub's state mutex and never waits: a
//! subscriber whose queue is full is evicted, not waited for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::conn::{Conn, Push};
use super::event::{is_upload_channel, upload_channel, ChannelEvent, SocketId};
use super::frames::{data_seq, frame, frame_data, frame_parts};
use super::{now_us, Metrics};
use crate::protocol::frames::{Member, PresenceData, PresenceSucceeded};

/// Bytes of retained latest events above which the oldest ones of channels
/// without subscribers are dropped early.
const MAX_LATEST_BYTES: usize = 64 << 20;

/// What fan-out needs besides the channel: the counters and the queue cap.
pub(crate) struct Ctx<'a> {
    pub metrics: &'a Metrics,
    pub cap: usize,
}

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
    /// user id → (user_info, connections of that user)
    members: HashMap<String, (serde_json::Value, u32)>,
    by_conn: HashMap<u64, String>,
}

/// A presence member: user id and `user_info`.
pub(crate) type MemberInfo = (String, serde_json::Value);

/// What a subscribe produced: the `subscription_succeeded` data and the
/// latest event to replay.
pub(crate) struct Subscribed {
    pub data: String,
    pub replay: Option<Utf8Bytes>,
    /// The channel had no local subscriber before.
    pub first: bool,
}

/// Who is on the channels of a hub (or of all hubs, merged): what the HTTP
/// API's channel queries answer from. With Redis each hub keeps its own in
/// Redis (see docs/scaling.md); the field names are short, it is written often.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Occupancy {
    #[serde(rename = "c")]
    pub channels: BTreeMap<String, ChannelOccupancy>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ChannelOccupancy {
    #[serde(rename = "s")]
    pub subscriptions: usize,
    /// User ids of the presence members.
    #[serde(rename = "u", default, skip_serializing_if = "BTreeSet::is_empty")]
    pub users: BTreeSet<String>,
}

impl Occupancy {
    /// Adds the channels of another hub (subscriptions add up, users unite).
    pub fn merge(&mut self, other: Occupancy) {
        for (name, o) in other.channels {
            let c = self.channels.entry(name).or_default();
            c.subscriptions += o.subscriptions;
            c.users.extend(o.users);
        }
    }
}

/// The channels of this hub.
#[derive(Default)]
pub(crate) struct Channels {
    channels: HashMap<Box<str>, Channel>,
    pub subscriptions: usize,
    latest_bytes: usize,
}

impl Channels {
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

    /// Sends `ev` to every subscriber of its channel (but `exclude`) and
    /// keeps it as the channel's latest event. False when dropped as stale.
    pub fn deliver(&mut self, ctx: &Ctx<'_>, ev: &ChannelEvent) -> bool {
        Metrics::add(&ctx.metrics.events_in, 1);
        let channel = ev.channel.as_str();
        let Some(ch) = channel_mut(&mut self.channels, channel) else {
            return false;
        };
        if ev.seq.is_none() && is_upload_channel(channel) {
            // Published (not made by the hub from upload reports): delivered,
            // but it never becomes the channel's latest event, moves its seq
            // or ends it.
            let text = frame(&ev.event, Some(channel), &ev.data);
            let evicted = fan_out(ctx, ch, &text, ev.exclude);
            self.subscriptions = self.subscriptions.saturating_sub(evicted);
            if ch.subs.is_empty() && ch.latest.is_none() {
                self.channels.remove(channel);
            }
            return true;
        }
        if let Some(s) = ev.seq {
            if s <= ch.last_seq {
                Metrics::add(&ctx.metrics.events_dropped, 1);
                return false;
            }
            ch.last_seq = s;
        }
        let text = frame(&ev.event, Some(channel), &ev.data);
        let evicted = fan_out(ctx, ch, &text, ev.exclude);
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
    pub fn next_seq(&self, channel: &str) -> u64 {
        self.last_seq(channel).saturating_add(1).max(now_us())
    }

    pub fn subscribe(
        &mut self,
        ctx: &Ctx<'_>,
        conn: &Arc<Conn>,
        channel: &str,
        member: Option<MemberInfo>,
    ) -> Subscribed {
        let Some(ch) = channel_mut(&mut self.channels, channel) else {
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
                    .or_insert_with(|| (info, 0));
                e.1 += 1;
                if e.1 == 1 {
                    let m = Member {
                        user_id: &user_id,
                        user_info: Some(&e.0),
                    };
                    added = Some(serde_json::to_string(&m).unwrap_or_default());
                }
            }
            let hash: BTreeMap<&str, &serde_json::Value> = p
                .members
                .iter()
                .map(|(id, (info, _))| (id.as_str(), info))
                .collect();
            let presence = PresenceSucceeded {
                presence: PresenceData {
                    ids: hash.keys().copied().collect(),
                    count: hash.len(),
                    hash,
                },
            };
            data = serde_json::to_string(&presence).unwrap_or_default();
            if let Some(added) = added {
                let text = frame("pusher_internal:member_added", Some(channel), &added);
                let n = fan_out(ctx, ch, &text, Some(conn.socket_id()));
                self.subscriptions = self.subscriptions.saturating_sub(n);
            }
        }
        let replay = ch.latest.clone();
        if replay.is_some() {
            Metrics::add(&ctx.metrics.events_out, 1);
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
            let m = Member {
                user_id: &uid,
                user_info: None,
            };
            let data = serde_json::to_string(&m).unwrap_or_default();
            let text = frame("pusher_internal:member_removed", Some(channel), &data);
            let n = fan_out(ctx, ch, &text, None);
            self.subscriptions = self.subscriptions.saturating_sub(n);
        }
        let emptied = had && ch.subs.is_empty();
        if ch.subs.is_empty() && ch.latest.is_none() {
            self.channels.remove(channel);
        }
        emptied
    }

    /// Highest seq delivered on `channel` (0: none).
    pub fn last_seq(&self, channel: &str) -> u64 {
        self.channels.get(channel).map_or(0, |c| c.last_seq)
    }

    pub fn is_finished(&self, channel: &str) -> bool {
        self.channels.get(channel).is_some_and(|c| c.finished)
    }

    pub fn mark_finished(&mut self, channel: &str) {
        if let Some(ch) = self.channels.get_mut(channel) {
            ch.finished = true;
        }
    }

    /// Channels with at least one local subscriber.
    pub fn subscribed_channels(&self) -> Vec<Box<str>> {
        self.channels
            .iter()
            .filter(|(_, c)| !c.subs.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Subscribers and presence members of the channels with local
    /// subscribers whose name starts with `prefix`.
    pub fn occupancy(&self, prefix: &str) -> Occupancy {
        let mut out = Occupancy::default();
        for (name, c) in &self.channels {
            if c.subs.is_empty() || !name.starts_with(prefix) {
                continue;
            }
            let users = c
                .presence
                .as_ref()
                .map(|p| p.members.keys().cloned().collect())
                .unwrap_or_default();
            out.channels.insert(
                name.to_string(),
                ChannelOccupancy {
                    subscriptions: c.subs.len(),
                    users,
                },
            );
        }
        out
    }

    /// The connections of presence member `user_id`, on any channel.
    pub fn connections_of(&self, user_id: &str) -> Vec<Arc<Conn>> {
        let mut out: Vec<Arc<Conn>> = Vec::new();
        for c in self.channels.values() {
            let Some(p) = &c.presence else { continue };
            for (conn, uid) in &p.by_conn {
                if uid == user_id && !out.iter().any(|o| o.id == *conn) {
                    if let Some(x) = c.subs.get(conn) {
                        out.push(x.clone());
                    }
                }
            }
        }
        out
    }

    /// Event name, data and seq of the latest event of `channel`.
    pub fn latest_parts(&self, channel: &str) -> Option<(String, String, Option<u64>)> {
        let ch = self.channels.get(channel)?;
        let (event, data) = frame_parts(ch.latest.as_ref()?.as_str())?;
        let seq = data_seq(&data).filter(|s| *s == ch.last_seq);
        Some((event, data, seq))
    }

    /// The data of the latest event of `channel`.
    pub fn latest_data(&self, channel: &str) -> Option<String> {
        frame_data(self.channels.get(channel)?.latest.as_ref()?.as_str())
    }

    /// The JSON data of the latest event of `private-upload.<id>`.
    pub fn latest_upload_data(&self, upload_id: &str) -> Option<String> {
        self.latest_data(&upload_channel(upload_id))
    }

    /// True when a latest event fetched from Redis is newer than what this hub
    /// has (by seq; without seq only when there is nothing) on a channel it knows.
    pub fn wants_latest(&self, channel: &str, seq: Option<u64>) -> bool {
        let Some(ch) = self.channels.get(channel) else {
            return false;
        };
        match seq {
            Some(s) => s > ch.last_seq,
            None => ch.latest.is_none(),
        }
    }

    /// Forgets latest events of channels without subscribers older than `retention`.
    pub fn sweep(&mut self, retention: Duration) {
        let now = Instant::now();
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

    #[cfg(test)]
    pub fn latest_bytes(&self) -> usize {
        self.latest_bytes
    }
}

/// The channel named `name`, created when unknown (without allocating a key
/// for one that exists: this runs for every event).
fn channel_mut<'a>(
    channels: &'a mut HashMap<Box<str>, Channel>,
    name: &str,
) -> Option<&'a mut Channel> {
    if !channels.contains_key(name) {
        channels.insert(name.into(), Channel::new());
    }
    channels.get_mut(name)
}

/// Queues `text` to every subscriber of `ch` but `exclude`; returns how many
/// subscribers were evicted as slow consumers (already removed from `ch`).
fn fan_out(ctx: &Ctx<'_>, ch: &mut Channel, text: &Utf8Bytes, exclude: Option<SocketId>) -> usize {
    let mut evicted: Vec<u64> = Vec::new();
    let mut sent = 0u64;
    for (id, c) in &ch.subs {
        if exclude.is_some_and(|x| x == c.socket_id()) {
            continue;
        }
        match c.push(text.clone(), ctx.cap) {
            Push::Ok => sent += 1,
            Push::Full => evicted.push(*id),
            Push::Closed => {}
        }
    }
    Metrics::add(&ctx.metrics.events_out, sent);
    if !evicted.is_empty() {
        Metrics::add(&ctx.metrics.evictions, evicted.len() as u64);
        Metrics::add(&ctx.metrics.events_dropped, evicted.len() as u64);
        for id in &evicted {
            ch.subs.remove(id);
        }
    }
    evicted.len()
}
