//! The bridge's connection life: connect with backoff, keep the Redis
//! subscriptions in line with the channels that have local subscribers,
//! fetch latest events, write back what was handled locally during an
//! outage, and hand what other hubs publish to the router.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch};

use super::connection::{connect, RedisConn};
use super::occupancy::{parse_terminate, write_occupancy};
use super::scripts::{reset_invocation, EventArgs};
use super::wire::parse_wire;
use super::Bridge;
use crate::hub::event::{is_upload_channel, ChannelEvent, TerminalKind};
use crate::hub::{lock, log, router, Hub, Metrics};

/// Least time between two writes of this hub's occupancy snapshot.
const OCCUPANCY_GAP: Duration = Duration::from_millis(50);

pub(super) async fn supervisor(
    hub: Weak<Hub>,
    bridge: Arc<Bridge>,
    mut down: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut down_since: Option<Instant> = None;
    let mut last_fail_log: Option<Instant> = None;
    let mut first = true;
    loop {
        let r = tokio::select! {
            _ = down.changed() => return,
            r = tokio::time::timeout(bridge.timeout * 2, connect(&bridge)) => r,
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
                *lock(&bridge.conn) = Some(conn.clone());
                bridge.check_now.store(false, Ordering::SeqCst);
                bridge.connected.store(true, Ordering::SeqCst);
                match down_since.take() {
                    Some(t) => log(format_args!(
                        "redis: connected again to {} after {:.1} s; events go through Redis again",
                        bridge.describe(),
                        t.elapsed().as_secs_f64()
                    )),
                    None => log(format_args!("redis: connected to {}", bridge.describe())),
                }
                first = false;
                drop(h);
                let why = session(&hub, &bridge, conn, pushes, &mut down).await;
                bridge.connected.store(false, Ordering::SeqCst);
                *lock(&bridge.conn) = None;
                let Some(why) = why else { return };
                Metrics::add(&bridge.errors, 1);
                log(format_args!(
                    "redis: connection lost ({why}); events stay on this host until Redis is back"
                ));
                down_since = Some(Instant::now());
                last_fail_log = Some(Instant::now());
            }
            Err(e) => {
                Metrics::add(&bridge.errors, 1);
                if first {
                    log(format_args!(
                        "redis: cannot connect to {}: {e}; events stay on this host until it answers",
                        bridge.describe()
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
    bridge: &Bridge,
    mut conn: RedisConn,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    down: &mut watch::Receiver<bool>,
) -> Option<String> {
    let mut subscribed: HashSet<String> = HashSet::new();
    let mut ping = tokio::time::interval(bridge.ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync = true;
    let mut need_reconcile = true;
    let mut last_occupancy: Option<Instant> = None;
    loop {
        // Subscriptions first, then the latest events asked for, so that nothing
        // published between the two is missed.
        if need_reconcile {
            if let Err(e) = reconcile(hub, bridge, &mut conn, &mut subscribed, resync).await {
                return Some(e);
            }
            need_reconcile = false;
        }
        if resync {
            if let Err(e) = write_back(hub, bridge, &mut conn).await {
                return Some(e);
            }
            resync = false;
        }
        // At most one snapshot per OCCUPANCY_GAP under subscription churn
        // (it lists every channel with a local subscriber).
        let mut occupancy_due = None;
        if bridge.occupancy_dirty.load(Ordering::SeqCst) {
            let due = last_occupancy.map_or(Instant::now(), |t| t + OCCUPANCY_GAP);
            if due <= Instant::now() {
                bridge.occupancy_dirty.store(false, Ordering::SeqCst);
                let h = hub.upgrade()?;
                if let Err(e) = write_occupancy(&h, bridge, &mut conn).await {
                    bridge.occupancy_dirty.store(true, Ordering::SeqCst);
                    return Some(e);
                }
                last_occupancy = Some(Instant::now());
            } else {
                occupancy_due = Some(due);
            }
        }
        let wanted: Vec<String> = std::mem::take(&mut *lock(&bridge.want_latest));
        for ch in wanted {
            if let Some((event, data, seq)) = bridge.fetch_latest(&ch).await {
                if let Some(h) = hub.upgrade() {
                    let ev = ChannelEvent {
                        channel: ch,
                        event,
                        data,
                        seq,
                        exclude: None,
                    };
                    router::latest_from_redis(&h, &ev);
                }
            }
        }
        let occupancy_wait = tokio::time::sleep_until(
            occupancy_due.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
        );
        tokio::select! {
            _ = down.changed() => return None,
            _ = occupancy_wait, if occupancy_due.is_some() => {}
            _ = bridge.occupancy_wake.notified() => {}
            _ = bridge.wake.notified() => {
                need_reconcile = true;
                if bridge.check_now.swap(false, Ordering::SeqCst) {
                    if let Err(e) = health(bridge, &mut conn).await {
                        return Some(e);
                    }
                }
            }
            _ = ping.tick() => {
                if let Err(e) = health(bridge, &mut conn).await {
                    return Some(e);
                }
                // Also catches channels whose last subscriber was evicted
                // as a slow consumer; the occupancy snapshot is refreshed.
                need_reconcile = true;
                bridge.occupancy_dirty.store(true, Ordering::SeqCst);
            }
            p = pushes.recv() => {
                let Some(p) = p else { return Some("connection closed".into()) };
                if p.kind == PushKind::Disconnection {
                    return Some("disconnected".into());
                }
                let h = hub.upgrade()?;
                on_push(&h, bridge, p);
                // Drain what else is queued without another trip through select.
                while let Ok(p) = pushes.try_recv() {
                    if p.kind == PushKind::Disconnection {
                        return Some("disconnected".into());
                    }
                    on_push(&h, bridge, p);
                }
            }
        }
    }
}

async fn health(bridge: &Bridge, conn: &mut RedisConn) -> Result<(), String> {
    let r = tokio::time::timeout(bridge.timeout, conn.query::<String>(&redis::cmd("PING"))).await;
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("PING failed: {e}")),
        Err(_) => Err(format!("no answer to PING within {:?}", bridge.timeout)),
    }
}

/// Brings the Redis subscriptions in line with the channels that have local subscribers.
async fn reconcile(
    hub: &Weak<Hub>,
    bridge: &Bridge,
    conn: &mut RedisConn,
    subscribed: &mut HashSet<String>,
    fetch_all: bool,
) -> Result<(), String> {
    let Some(h) = hub.upgrade() else {
        return Ok(());
    };
    let wanted: HashSet<String> = lock(&h.state)
        .channels
        .subscribed_channels()
        .into_iter()
        .map(|c| bridge.keys.events(&c))
        .chain(std::iter::once(bridge.keys.control()))
        .collect();
    drop(h);
    let add: Vec<String> = wanted.difference(subscribed).cloned().collect();
    let remove: Vec<String> = subscribed.difference(&wanted).cloned().collect();
    for part in add.chunks(500) {
        match tokio::time::timeout(bridge.timeout, conn.subscribe(part)).await {
            Ok(Ok(())) => subscribed.extend(part.iter().cloned()),
            Ok(Err(e)) => return Err(format!("SUBSCRIBE failed: {e}")),
            Err(_) => return Err("SUBSCRIBE timed out".into()),
        }
    }
    for part in remove.chunks(500) {
        match tokio::time::timeout(bridge.timeout, conn.unsubscribe(part)).await {
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
        let mut w = lock(&bridge.want_latest);
        for ch in &wanted {
            if let Some(c) = bridge.keys.channel_of(ch) {
                w.push(c.to_string());
            }
        }
    }
    Ok(())
}

/// After an outage: writes the latest events handled locally meanwhile back
/// to Redis (compare-and-set by seq, so nothing newer is overwritten) and
/// publishes them, so hosts whose clients missed them catch up.
async fn write_back(hub: &Weak<Hub>, bridge: &Bridge, conn: &mut RedisConn) -> Result<(), String> {
    let channels: Vec<String> = lock(&bridge.unsynced).drain().collect();
    if channels.is_empty() {
        return Ok(());
    }
    let Some(h) = hub.upgrade() else {
        return Ok(());
    };
    let mut n = 0usize;
    for ch in channels {
        let Some((event, data, seq)) = lock(&h.state).channels.latest_parts(&ch) else {
            continue;
        };
        let publisher = bridge.publisher();
        if is_upload_channel(&ch) {
            // The streams of this hub ended or went on unseen: they report
            // again if still running. A terminal event closes the aggregation.
            let finished = TerminalKind::of(&event).is_some();
            let inv = reset_invocation(&bridge.scripts.reset, &publisher, &ch, finished);
            match tokio::time::timeout(bridge.timeout, conn.invoke::<i64>(&inv)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("writing back {ch}: {e}")),
                Err(_) => return Err(format!("writing back {ch}: timed out")),
            }
        }
        let args = EventArgs {
            channel: &ch,
            event: &event,
            data: &data,
            seq,
            exclude: String::new(),
            transient: false,
        };
        let inv = args.invocation(&bridge.scripts.event, &publisher);
        match tokio::time::timeout(bridge.timeout, conn.invoke::<i64>(&inv)).await {
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

fn on_push(hub: &Hub, bridge: &Bridge, p: PushInfo) {
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
    if ch == bridge.keys.control() {
        if let Some(user_id) = parse_terminate(payload, &bridge.id) {
            router::terminate_local(hub, user_id);
        }
        return;
    }
    let Some(channel) = bridge.keys.channel_of(ch) else {
        return;
    };
    let Some(w) = parse_wire(payload) else {
        return;
    };
    if w.origin == bridge.id {
        return;
    }
    Metrics::add(&bridge.received, 1);
    let ev = ChannelEvent {
        channel: channel.to_string(),
        event: w.event.to_string(),
        data: w.data.to_string(),
        seq: w.seq,
        exclude: w.exclude,
    };
    router::from_redis(hub, &ev);
}
