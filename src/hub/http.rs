//! The hub's TCP port: the HTTP request head is read by hand (httparse), then
//! routed to the WebSocket upgrade (`/app/{key}`), the Pusher events API
//! (`POST /apps/{id}/events`, `/batch_events`), `/health` or `/metrics`.
//! Plain HTTP responses are `Connection: close`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::event::{ChannelEvent, Event, SocketId};
use super::limits::{Admit, Slot};
use super::replay::Seen;
use super::router::route;
use super::uploads::refuse_published;
use super::{lock, ws, Hub, Metrics};
use crate::protocol::pusher;

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Largest request body of the events API (a batch of 10 events of 10 KiB).
const MAX_BODY: usize = 128 * 1024;
/// Largest `data` of one event.
pub(crate) const MAX_EVENT_DATA: usize = 10 * 1024;
/// Most channels one event may go to, and most events in one batch.
const MAX_EVENT_CHANNELS: usize = 100;
const MAX_BATCH: usize = 10;
/// Accepted clock skew of `auth_timestamp`.
const MAX_SKEW_S: i64 = 600;
/// Signatures of the events API remembered at most (within the skew window).
pub(crate) const MAX_SIGNATURES: usize = 200_000;
const REPLAYED: &str =
    "replayed request: this signature was already accepted (sign every request anew)";

/// Refusals arrive at flood speed: one log line per 10 s.
static REFUSED_LOG: super::RateLog = super::RateLog::new();

pub(crate) async fn accept_loop(
    hub: Arc<Hub>,
    listener: TcpListener,
    mut down: watch::Receiver<bool>,
) {
    let mut last_log: Option<Instant> = None;
    loop {
        let r = tokio::select! {
            _ = down.changed() => return,
            r = listener.accept() => r,
        };
        match r {
            Ok((s, addr)) => {
                let mut tries = 0;
                let slot = loop {
                    match hub.limits.admit(addr.ip()) {
                        Admit::Ok(slot) => break Some(slot),
                        Admit::Refuse(why) => {
                            REFUSED_LOG
                                .log(format_args!("connection from {} refused: {why}", addr.ip()));
                            break None;
                        }
                        Admit::Wait if tries < 5 => {
                            // An old pending connection was told to close.
                            tries += 1;
                            hub.limits.wait_freed(Duration::from_millis(20)).await;
                        }
                        Admit::Wait => {
                            REFUSED_LOG.log(format_args!(
                                "connection from {} refused: no descriptor freed in time",
                                addr.ip()
                            ));
                            break None;
                        }
                    }
                };
                match slot {
                    Some(slot) => {
                        let _ = s.set_nodelay(true);
                        tokio::spawn(handle(hub.clone(), s, slot));
                    }
                    None => {
                        Metrics::add(&hub.m.tcp_refused, 1);
                        drop(s);
                    }
                }
            }
            Err(e) => {
                let pause = super::accept_failed("accept", &e, &mut last_log);
                tokio::select! {
                    _ = down.changed() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// The parts of a request head the hub uses.
#[derive(Debug, Default)]
pub(crate) struct Request {
    method: String,
    path: String,
    query: String,
    upgrade_ws: bool,
    ws_key: Option<String>,
    ws_version: Option<String>,
    origin: Option<String>,
    host: Option<String>,
    content_length: Option<usize>,
    chunked: bool,
    /// Bytes read past the head (start of the body or of the first frames).
    rest: Vec<u8>,
}

enum HeadError {
    Closed,
    TooLarge,
    Bad(String),
}

fn parse_head(buf: &[u8]) -> Result<Option<Request>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed request: {e}")),
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut r = Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        rest: buf[n..].to_vec(),
        ..Request::default()
    };
    for h in req.headers.iter() {
        let v = String::from_utf8_lossy(h.value).trim().to_string();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            r.upgrade_ws = v.to_ascii_lowercase().contains("websocket");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            r.ws_key = Some(v);
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            r.ws_version = Some(v);
        } else if name.eq_ignore_ascii_case("origin") {
            r.origin = Some(v);
        } else if name.eq_ignore_ascii_case("host") {
            r.host = Some(v);
        } else if name.eq_ignore_ascii_case("content-length") {
            r.content_length = Some(
                v.parse()
                    .map_err(|_| format!("invalid Content-Length {v:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            r.chunked = v.to_ascii_lowercase().contains("chunked");
        }
    }
    Ok(Some(r))
}

async fn read_head(s: &mut TcpStream) -> Result<Request, HeadError> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let len = buf.len();
        buf.resize((len + 2048).min(MAX_HEAD), 0);
        let n = match s.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(n) => n,
        };
        buf.truncate(len + n);
        match parse_head(&buf) {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(e) => return Err(HeadError::Bad(e)),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

fn error_body(message: &str) -> String {
    serde_json::to_string(&crate::protocol::frames::HttpError { error: message })
        .unwrap_or_default()
}

/// Writes a complete `Connection: close` response, then lets the peer read it.
async fn respond(s: &mut TcpStream, status: u16, ctype: &str, extra: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{extra}\r\n{body}",
        reason(status),
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        s.write_all(msg.as_bytes()).await?;
        s.shutdown().await
    })
    .await;
    // Drain what the client still sends (an unread body would turn our close
    // into a reset that can destroy the response), briefly and boundedly.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut sink = [0u8; 1024];
        let mut total = 0usize;
        while total < 1 << 20 {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

async fn respond_json(s: &mut TcpStream, status: u16, body: &str) {
    respond(s, status, "application/json", "", body).await;
}

async fn handle(hub: Arc<Hub>, mut s: TcpStream, slot: Slot) {
    let deadline = tokio::time::Instant::now() + hub.tun.handshake_timeout;
    let head = tokio::select! {
        r = tokio::time::timeout_at(deadline, read_head(&mut s)) => r,
        _ = slot.evicted() => {
            // Closed to make room for a newer connection.
            Metrics::add(&hub.m.pending_evicted, 1);
            return;
        }
    };
    let req = match head {
        Err(_) => {
            respond_json(
                &mut s,
                408,
                &error_body("request head not received in time"),
            )
            .await;
            return;
        }
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::TooLarge)) => {
            let msg = format!("request head larger than {MAX_HEAD} bytes");
            respond_json(&mut s, 431, &error_body(&msg)).await;
            return;
        }
        Ok(Err(HeadError::Bad(m))) => {
            respond_json(&mut s, 400, &error_body(&m)).await;
            return;
        }
        Ok(Ok(r)) => r,
    };
    if let Some(key) = req.path.strip_prefix("/app/") {
        let key = key.trim_end_matches('/').to_string();
        slot.established();
        websocket(hub, s, req, key, slot).await;
        return;
    }
    if !req.path.starts_with("/apps/") {
        slot.established();
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET" | "HEAD", "/health") => {
            let (tcp, pending) = hub.limits.counts();
            let body = serde_json::json!({
                "status": "ok",
                "version": hub.version,
                "connections": Metrics::get(&hub.m.connections),
                "tcp_connections": tcp,
                "pending_handshakes": pending,
                "uptime_s": hub.uptime_s(),
            })
            .to_string();
            respond_json(&mut s, 200, &body).await;
        }
        ("GET", "/metrics") => {
            let body = metrics_text(&hub);
            respond(
                &mut s,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                "",
                &body,
            )
            .await;
        }
        (method, path) if path.starts_with("/apps/") => {
            let (status, body) = if method == "POST" {
                // Pending (evictable) until its body is in.
                tokio::select! {
                    r = events_api(&hub, &mut s, &req, deadline) => r,
                    _ = slot.evicted() => {
                        Metrics::add(&hub.m.pending_evicted, 1);
                        return;
                    }
                }
            } else {
                (405, error_body("only POST is supported on /apps/"))
            };
            respond_json(&mut s, status, &body).await;
        }
        _ => respond_json(&mut s, 404, &error_body("not found")).await,
    }
}

/// The first value of `name` in a query string (form-urlencoded).
fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn websocket(hub: Arc<Hub>, mut s: TcpStream, req: Request, key: String, slot: Slot) {
    if req.method != "GET" || !req.upgrade_ws || req.ws_key.is_none() {
        respond(
            &mut s,
            426,
            "application/json",
            "Upgrade: websocket\r\n",
            &error_body("WebSocket upgrade expected"),
        )
        .await;
        return;
    }
    if req.ws_version.as_deref() != Some("13") {
        respond(
            &mut s,
            426,
            "application/json",
            "Sec-WebSocket-Version: 13\r\n",
            &error_body("only WebSocket version 13 is supported"),
        )
        .await;
        return;
    }
    if !hub
        .cfg
        .origin_allowed(req.origin.as_deref(), req.host.as_deref())
    {
        let msg = format!(
            "origin {:?} is not allowed",
            req.origin.as_deref().unwrap_or("")
        );
        respond_json(&mut s, 403, &error_body(&msg)).await;
        return;
    }
    let accept = derive_accept_key(req.ws_key.as_deref().unwrap_or("").as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    match tokio::time::timeout(Duration::from_secs(5), s.write_all(head.as_bytes())).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let cfg = Some(ws::ws_config());
    let protocol = query_param(&req.query, "protocol").map(|p| p.parse::<u32>().unwrap_or(0));
    let Request { rest, .. } = req;
    let stream = if rest.is_empty() {
        WebSocketStream::from_raw_socket(s, Role::Server, cfg).await
    } else {
        WebSocketStream::from_partially_read(s, rest, Role::Server, cfg).await
    };
    // The slot (the descriptor's place in the budget) lives as long as the socket.
    if key != hub.cfg.app_key {
        let msg = format!("App key {key:?} does not exist on this hub");
        tokio::spawn(async move {
            ws::reject(stream, 4001, msg).await;
            drop(slot)
        });
        return;
    }
    if let Some(p) = protocol {
        if !(5..=7).contains(&p) {
            let msg = format!("Unsupported protocol version {p}: 7 is expected");
            tokio::spawn(async move {
                ws::reject(stream, 4007, msg).await;
                drop(slot)
            });
            return;
        }
    }
    match ws::register(&hub) {
        Some(conn) => {
            tokio::spawn(async move {
                ws::session(hub, stream, conn).await;
                drop(slot)
            });
        }
        None => {
            tokio::spawn(async move {
                ws::reject(
                    stream,
                    4100,
                    "Over capacity: too many connections".to_string(),
                )
                .await;
                drop(slot)
            });
        }
    }
}

// ------------------------------------------------------------------ events API

/// Checks Pusher request signing; Ok is the signature and its timestamp, Err
/// the 401 message.
pub(crate) fn check_signature(
    hub: &Hub,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    now_s: i64,
) -> Result<(String, i64), String> {
    let mut params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.to_ascii_lowercase(), v.into_owned()))
        .collect();
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let Some(signature) = get("auth_signature") else {
        return Err("missing auth_signature".into());
    };
    if get("auth_key").as_deref() != Some(hub.cfg.app_key.as_str()) {
        return Err("unknown or missing auth_key".into());
    }
    if get("auth_version").as_deref() != Some("1.0") {
        return Err("auth_version must be 1.0".into());
    }
    let ts: i64 = get("auth_timestamp")
        .and_then(|t| t.parse().ok())
        .ok_or("missing or invalid auth_timestamp")?;
    if (now_s - ts).abs() > MAX_SKEW_S {
        return Err(format!(
            "timestamp expired: auth_timestamp {ts} is more than {MAX_SKEW_S} s from the server time {now_s}"
        ));
    }
    if !body.is_empty() || get("body_md5").is_some() {
        let md5 = hex::encode(Md5::digest(body));
        if get("body_md5").as_deref() != Some(md5.as_str()) {
            return Err("body_md5 does not match the body".into());
        }
    }
    params.retain(|(k, _)| k != "auth_signature");
    params.sort();
    let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let to_sign = format!("{method}\n{path}\n{}", q.join("&"));
    if pusher::verify(&hub.cfg.app_secret, &to_sign, &signature) {
        Ok((signature, ts))
    } else {
        Err(format!(
            "invalid signature: expected the HMAC-SHA256 hex of {to_sign:?} keyed by the app secret"
        ))
    }
}

#[derive(serde::Deserialize)]
struct ApiEvent {
    name: Option<String>,
    data: Option<serde_json::Value>,
    channels: Option<Vec<String>>,
    channel: Option<String>,
    socket_id: Option<String>,
}

#[derive(serde::Deserialize)]
struct ApiBatch {
    batch: Vec<ApiEvent>,
}

struct Checked {
    name: String,
    channels: Vec<String>,
    data: String,
    exclude: Option<SocketId>,
}

fn check_event(e: ApiEvent) -> Result<Checked, (u16, String)> {
    let name = e.name.ok_or((400, "missing event name".to_string()))?;
    pusher::validate_event(&name).map_err(|m| (400, m))?;
    let mut channels = e.channels.unwrap_or_default();
    if let Some(c) = e.channel {
        channels.push(c);
    }
    if channels.is_empty() {
        return Err((400, "missing channels".into()));
    }
    if channels.len() > MAX_EVENT_CHANNELS {
        return Err((
            400,
            format!(
                "{} channels: at most {MAX_EVENT_CHANNELS} per event",
                channels.len()
            ),
        ));
    }
    for c in &channels {
        pusher::validate_channel(c).map_err(|m| (400, m))?;
    }
    let data = match e.data {
        Some(serde_json::Value::String(s)) => s,
        Some(v) => v.to_string(),
        None => String::new(),
    };
    for c in &channels {
        if let Some(m) = refuse_published(c, &name, &data) {
            return Err((403, m));
        }
    }
    if data.len() > MAX_EVENT_DATA {
        return Err((
            413,
            format!(
                "event data of {} bytes: at most {MAX_EVENT_DATA}",
                data.len()
            ),
        ));
    }
    let exclude = match e.socket_id {
        Some(sid) => {
            pusher::validate_socket_id(&sid).map_err(|m| (400, m))?;
            SocketId::parse(&sid)
        }
        None => None,
    };
    Ok(Checked {
        name,
        channels,
        data,
        exclude,
    })
}

async fn events_api(
    hub: &Hub,
    s: &mut TcpStream,
    req: &Request,
    deadline: tokio::time::Instant,
) -> (u16, String) {
    let rest = req.path.strip_prefix("/apps/").unwrap_or("");
    let (app_id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let batch = match tail {
        "events" => false,
        "batch_events" => true,
        _ => return (404, error_body("not found")),
    };
    if app_id != hub.cfg.app_id {
        return (404, error_body(&format!("unknown app id {app_id:?}")));
    }
    if req.chunked {
        return (411, error_body("a Content-Length is required"));
    }
    let len = req.content_length.unwrap_or(0);
    if len > MAX_BODY {
        return (
            413,
            error_body(&format!("body of {len} bytes: at most {MAX_BODY}")),
        );
    }
    let mut body = req.rest.clone();
    body.truncate(len);
    if body.len() < len {
        let have = body.len();
        body.resize(len, 0);
        match tokio::time::timeout_at(deadline, s.read_exact(&mut body[have..])).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return (400, error_body("body shorter than its Content-Length")),
            Err(_) => return (408, error_body("body not received in time")),
        }
    }
    let now_s = (super::now_ms() / 1000) as i64;
    let (signature, ts) =
        match check_signature(hub, &req.method, &req.path, &req.query, &body, now_s) {
            Ok(v) => v,
            Err(m) => return (401, error_body(&m)),
        };
    // Accepted once: the signature is remembered until its timestamp leaves
    // the accepted window (shared through Redis when it is there).
    let expires = ts + MAX_SKEW_S;
    match lock(&hub.replay).check(&signature, expires, now_s) {
        Seen::New => {}
        Seen::Replay => return (401, error_body(REPLAYED)),
        Seen::Full => {
            return (
                429,
                error_body("too many signed requests within the last 10 minutes: retry later"),
            )
        }
    }
    if let Some(b) = &hub.redis {
        if b.first_seen_signature(&signature, (expires - now_s + 1).max(1) as u64)
            .await
            == Some(false)
        {
            return (401, error_body(REPLAYED));
        }
    }
    let events: Vec<ApiEvent> = if batch {
        match serde_json::from_slice::<ApiBatch>(&body) {
            Ok(b) => b.batch,
            Err(e) => return (400, error_body(&format!("invalid JSON body: {e}"))),
        }
    } else {
        match serde_json::from_slice::<ApiEvent>(&body) {
            Ok(e) => vec![e],
            Err(e) => return (400, error_body(&format!("invalid JSON body: {e}"))),
        }
    };
    if events.len() > MAX_BATCH {
        return (
            400,
            error_body(&format!(
                "{} events: at most {MAX_BATCH} per batch",
                events.len()
            )),
        );
    }
    let mut checked = Vec::with_capacity(events.len());
    for e in events {
        match check_event(e) {
            Ok(c) => checked.push(c),
            Err((status, m)) => {
                if status == 403 {
                    Metrics::add(&hub.m.published_refused, 1);
                }
                return (status, error_body(&m));
            }
        }
    }
    for c in checked.iter() {
        // A seq in the data orders nothing (it would let a caller silence a
        // channel); only the hub's upload events carry one.
        let seq = None;
        for ch in &c.channels {
            route(
                hub,
                Event::Channel(ChannelEvent {
                    channel: ch.clone(),
                    event: c.name.clone(),
                    data: c.data.clone(),
                    seq,
                    exclude: c.exclude,
                }),
            );
        }
    }
    if batch {
        let items: Vec<serde_json::Value> = checked.iter().map(|_| serde_json::json!({})).collect();
        (200, serde_json::json!({ "batch": items }).to_string())
    } else {
        (200, "{}".to_string())
    }
}

// ------------------------------------------------------------------ metrics

pub(crate) fn metrics_text(hub: &Hub) -> String {
    let (channels, subscriptions, retained) = {
        let st = lock(&hub.state);
        let c = &st.channels;
        (c.channel_count(), c.subscriptions, c.retained_count())
    };
    let m = &hub.m;
    let redis = hub.redis.as_ref();
    let rget = |f: fn(&super::redis::Bridge) -> u64| redis.map_or(0, |b| f(b));
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
            rget(|b| u64::from(b.connected.load(std::sync::atomic::Ordering::Relaxed))),
        ),
        (
            "redis_errors_total",
            "counter",
            "Redis failures: connects, lost connections, failed or timed out commands.",
            rget(|b| Metrics::get(&b.errors)),
        ),
        (
            "redis_published_total",
            "counter",
            "Events this hub published through Redis.",
            rget(|b| Metrics::get(&b.published)),
        ),
        (
            "redis_received_total",
            "counter",
            "Events of other hubs received from Redis.",
            rget(|b| Metrics::get(&b.received)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed() {
        let r = parse_head(b"GET /app/k?protocol=7&client=js HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nSec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\nOrigin: http://a\r\n\r\nXY")
            .unwrap()
            .unwrap();
        assert_eq!(r.path, "/app/k");
        assert_eq!(query_param(&r.query, "protocol").as_deref(), Some("7"));
        assert!(r.upgrade_ws);
        assert_eq!(r.ws_key.as_deref(), Some("abc"));
        assert_eq!(r.origin.as_deref(), Some("http://a"));
        assert_eq!(r.rest, b"XY");
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none());
        assert!(parse_head(b"\x00\x01garbage\r\n\r\n").is_err());
        assert!(parse_head(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
    }

    #[test]
    fn query_strings_are_form_urlencoded() {
        let q = "a=%2C%zz%4&b=x+y&c";
        assert_eq!(query_param(q, "a").as_deref(), Some(",%zz%4"));
        assert_eq!(query_param(q, "b").as_deref(), Some("x y"));
        assert_eq!(query_param(q, "c").as_deref(), Some(""));
    }
}
