//! Routes every event the hub handles. Ingest and the HTTP API hand their
//! events to `route`; with Redis the bridge takes them (and hands back what
//! it cannot take, which is then delivered here, on this host); what Redis
//! answers or other hubs publish comes back through `from_redis`. WebSocket
//! sessions tell the router when their subscriptions change, so that the
//! bridge follows the channels with local subscribers.

use super::channels::{Ctx, Subscribed};
use super::event::{ChannelEvent, Event};
use super::{lock, Hub};

impl Hub {
    /// What delivery needs besides the state: counters and the queue cap.
    pub fn ctx(&self) -> Ctx<'_> {
        Ctx {
            metrics: &self.metrics,
            cap: self.tunables.queue_cap,
        }
    }
}

/// Routes `ev`: through Redis when the bridge takes it, else on this host.
pub(crate) fn route(hub: &Hub, ev: Event) {
    let ev = match &hub.redis {
        Some(bridge) => match bridge.offer(ev) {
            Ok(()) => return,
            Err(ev) => ev,
        },
        None => ev,
    };
    deliver_local(hub, ev);
}

/// An event the bridge took but could not publish (Redis failed meanwhile).
pub(crate) fn handed_back(hub: &Hub, ev: Event) {
    deliver_local(hub, ev);
}

/// The single-host path: published events are delivered, upload reports are
/// folded by this host's aggregator. With a bridge the channel is written
/// back to Redis once it is reachable again.
fn deliver_local(hub: &Hub, ev: Event) {
    if let Some(bridge) = &hub.redis {
        bridge.mark_unsynced(ev.channel());
    }
    let ctx = hub.ctx();
    let mut state = lock(&hub.state);
    match ev {
        Event::Channel(e) => {
            state.deliver(&ctx, &e);
        }
        Event::Upload(r) | Event::Tagged(r) => state.report(&ctx, &r),
    }
}

/// An event that came through Redis: published by another hub, or built by a
/// script for this one.
pub(crate) fn from_redis(hub: &Hub, ev: &ChannelEvent) {
    lock(&hub.state).deliver(&hub.ctx(), ev);
}

/// A latest event fetched from Redis after a subscribe or a reconnect.
pub(crate) fn latest_from_redis(hub: &Hub, ev: &ChannelEvent) {
    lock(&hub.state).offer_latest(&hub.ctx(), ev);
}

/// A connection subscribed to `channel`.
pub(crate) fn subscribed(hub: &Hub, channel: &str, sub: &Subscribed) {
    if let Some(bridge) = &hub.redis {
        bridge.occupancy_changed();
        if sub.first {
            bridge.subscriptions_changed();
        }
        if sub.replay.is_none() {
            // Another host may have the latest event: it is replayed through
            // the connection's queue, after subscription_succeeded.
            bridge.request_latest(channel);
        }
    }
}

/// Connections unsubscribed; `emptied`: a channel lost its last local subscriber.
pub(crate) fn unsubscribed(hub: &Hub, emptied: bool) {
    if let Some(bridge) = &hub.redis {
        bridge.occupancy_changed();
        if emptied {
            bridge.subscriptions_changed();
        }
    }
}

/// Close code of a terminated connection (Pusher's "unauthorized" range: do
/// not reconnect with the same credentials).
const TERMINATED: u16 = 4009;

/// Closes this hub's connections of presence member `user_id` (asked through
/// the HTTP API here, or by another hub through Redis).
pub(crate) fn terminate_local(hub: &Hub, user_id: &str) {
    let conns = lock(&hub.state).channels.connections_of(user_id);
    for c in conns {
        c.close(TERMINATED, "Connection terminated by the server");
    }
}
