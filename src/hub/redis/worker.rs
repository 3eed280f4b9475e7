//! Runs the scripts for the events the bridge took, in the order they
//! arrived; what Redis answers goes to the router, and what cannot be
//! published (Redis failed meanwhile) is handed back to it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use redis::RedisResult;
use tokio::sync::{mpsc, watch};

use super::connection::RedisConn;
use super::scripts::{EventArgs, UploadArgs};
use super::Bridge;
use crate::hub::event::{is_upload_channel, ChannelEvent, Event};
use crate::hub::{lock, now_ms, now_us, router, Hub, Metrics};

pub(super) async fn worker(
    hub: Weak<Hub>,
    bridge: Arc<Bridge>,
    mut rx: mpsc::Receiver<Event>,
    mut down: watch::Receiver<bool>,
) {
    loop {
        let ev = tokio::select! {
            _ = down.changed() => return,
            ev = rx.recv() => match ev { Some(ev) => ev, None => return },
        };
        let Some(hub) = hub.upgrade() else { return };
        let conn = if bridge.connected.load(Ordering::SeqCst) {
            bridge.current()
        } else {
            None
        };
        let Some(mut conn) = conn else {
            router::handed_back(&hub, ev);
            continue;
        };
        match tokio::time::timeout(bridge.timeout, publish(&hub, &bridge, &mut conn, &ev)).await {
            Ok(Ok(Some(answer))) => router::from_redis(&hub, &answer),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                bridge.failed("publishing an event", &e);
                router::handed_back(&hub, ev);
            }
            Err(_) => {
                bridge.failed("publishing an event", &"timed out");
                router::handed_back(&hub, ev);
            }
        }
    }
}

/// Lower bound of the next seq of `channel`: above everything this hub delivered there.
fn seq_floor(hub: &Hub, channel: &str) -> u64 {
    let last = lock(&hub.state).channels.last_seq(channel);
    last.saturating_add(1).max(now_us())
}

fn dropped(hub: &Hub) {
    Metrics::add(&hub.metrics.events_in, 1);
    Metrics::add(&hub.metrics.events_dropped, 1);
}

/// Runs the script of `ev`; the event to deliver on this host, if any.
async fn publish(
    hub: &Hub,
    bridge: &Bridge,
    conn: &mut RedisConn,
    ev: &Event,
) -> RedisResult<Option<ChannelEvent>> {
    let publisher = bridge.publisher();
    let (report, tagged) = match ev {
        Event::Channel(e) => {
            let args = EventArgs {
                channel: &e.channel,
                event: &e.event,
                data: &e.data,
                seq: e.seq,
                exclude: e.exclude.map_or(String::new(), |s| s.to_string()),
                // Published events on an upload channel are delivered, never kept.
                transient: e.seq.is_none() && is_upload_channel(&e.channel),
            };
            let inv = args.invocation(&bridge.scripts.event, &publisher);
            let ok: i64 = conn.invoke(&inv).await?;
            if ok != 1 {
                dropped(hub);
                return Ok(None);
            }
            Metrics::add(&bridge.published, 1);
            return Ok(Some(e.clone()));
        }
        Event::Upload(r) => (r, false),
        Event::Tagged(r) => (r, true),
    };
    let channel = report.channel();
    let args = UploadArgs {
        seq_floor: seq_floor(hub, &channel),
        channel,
        now_ms: now_ms(),
        tagged,
    };
    let inv = args.invocation(&bridge.scripts.upload, &publisher, report);
    let r: Option<(String, String, String)> = conn.invoke(&inv).await?;
    Ok(answer(hub, bridge, args.channel, r))
}

/// The event an upload script answered, if any.
fn answer(
    hub: &Hub,
    bridge: &Bridge,
    channel: String,
    r: Option<(String, String, String)>,
) -> Option<ChannelEvent> {
    match r {
        Some((_, event, _)) if event.is_empty() => {
            // A tagged request for an Upload of some host.
            dropped(hub);
            Metrics::add(&hub.metrics.tagged_refused, 1);
            None
        }
        Some((seq, event, data)) => {
            Metrics::add(&bridge.published, 1);
            Some(ChannelEvent {
                channel,
                event,
                data,
                seq: seq.parse::<u64>().ok(),
                exclude: None,
            })
        }
        None => {
            dropped(hub);
            None
        }
    }
}
