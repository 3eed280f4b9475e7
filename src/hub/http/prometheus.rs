//! `/metrics` in the Prometheus text format.

use crate::hub::{lock, Hub, Metrics};

pub(crate) fn metrics_text(hub: &Hub) -> String {
    let (channels, subscriptions, retained) = {
        let state = lock(&hub.state);
        let c = &state.channels;
        (c.channel_count(), c.subscriptions, c.retained_count())
    };
    let m = &hub.metrics;
    let redis = hub.redis.as_ref();
    let rget = |f: fn(&crate::hub::redis::Bridge) -> u64| redis.map_or(0, |bridge| f(bridge));
    let rows: [(&str, &str, &str, u64); 19] = [
        (
            "connections",
            "gauge",
            "Open WebSocket connections.",
            Metrics::get(&m.connections),
        ),
        (
            "subscriptions",
            "gauge",
            "Channel subscriptions of all connections.",
            subscriptions as u64,
        ),
        (
            "channels",
            "gauge",
            "Channels with at least one subscriber.",
            channels as u64,
        ),
        (
            "retained_channels",
            "gauge",
            "Channels known to the hub, including those that only keep a latest event.",
            retained as u64,
        ),
        (
            "events_in_total",
            "counter",
            "Events received for delivery (ingest, HTTP API, upload reports).",
            Metrics::get(&m.events_in),
        ),
        (
            "events_out_total",
            "counter",
            "Event messages queued to WebSocket connections.",
            Metrics::get(&m.events_out),
        ),
        (
            "events_dropped_total",
            "counter",
            "Events dropped: stale seq, invalid, slow consumers, dropped by PHP processes.",
            Metrics::get(&m.events_dropped),
        ),
        (
            "slow_consumer_evictions_total",
            "counter",
            "Connections closed because their send queue was full.",
            Metrics::get(&m.evictions),
        ),
        (
            "ingest_connections",
            "gauge",
            "Open connections on the ingest socket.",
            Metrics::get(&m.ingest_connections),
        ),
        (
            "ingest_errors_total",
            "counter",
            "Ingest connections closed for a malformed frame or a foreign uid.",
            Metrics::get(&m.ingest_errors),
        ),
        (
            "tcp_refused_total",
            "counter",
            "TCP connections closed at accept: no descriptor to spare or too many from one address.",
            Metrics::get(&m.tcp_refused),
        ),
        (
            "pending_evicted_total",
            "counter",
            "Connections without a finished handshake closed to make room for newer ones.",
            Metrics::get(&m.pending_evicted),
        ),
        (
            "tagged_refused_total",
            "counter",
            "Reports of plain requests tagged with the id of an Upload, dropped.",
            Metrics::get(&m.tagged_refused),
        ),
        (
            "published_refused_total",
            "counter",
            "Published events refused on upload channels (upload event name or a seq).",
            Metrics::get(&m.published_refused),
        ),
        (
            "redis_connected",
            "gauge",
            "1 when the Redis bridge is connected (0 when down or not configured).",
            rget(|bridge| u64::from(bridge.connected.load(std::sync::atomic::Ordering::Relaxed))),
        ),
        (
            "redis_errors_total",
            "counter",
            "Redis failures: connects, lost connections, failed or timed out commands.",
            rget(|bridge| Metrics::get(&bridge.errors)),
        ),
        (
            "redis_published_total",
            "counter",
            "Events this hub published through Redis.",
            rget(|bridge| Metrics::get(&bridge.published)),
        ),
        (
            "redis_received_total",
            "counter",
            "Events of other hubs received from Redis.",
            rget(|bridge| Metrics::get(&bridge.received)),
        ),
        (
            "uptime_seconds",
            "gauge",
            "Seconds since the hub started.",
            hub.uptime_s(),
        ),
    ];
    let mut out = String::with_capacity(2048);
    for (name, kind, help, v) in rows {
        out.push_str(&format!(
            "# HELP upload_progress_{name} {help}\n# TYPE upload_progress_{name} {kind}\nupload_progress_{name} {v}\n"
        ));
    }
    out
}
