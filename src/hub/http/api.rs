//! The signed HTTP API under `/apps/{app_id}/` (Pusher's HTTP API): request
//! signing, replay refusal, and the events endpoints. The channel queries are
//! in `queries.rs`.

use md5::{Digest, Md5};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::{error_body, queries, Request};
use crate::hub::event::{ChannelEvent, Event, SocketId};
use crate::hub::replay::Seen;
use crate::hub::router::route;
use crate::hub::uploads::refuse_published;
use crate::hub::{lock, now_ms, Hub, Metrics};
use crate::protocol::pusher;

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

/// What a request under `/apps/{app_id}/` asks for.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    Events,
    BatchEvents,
    Channels,
    Channel(String),
    ChannelUsers(String),
    TerminateConnections(String),
}

impl Endpoint {
    /// The endpoint of `tail` (the path after the app id) and its method.
    fn parse(tail: &str) -> Option<(Endpoint, &'static str)> {
        let parts: Vec<&str> = tail.split('/').collect();
        let name = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .ok()
                .map(|n| n.into_owned())
                .filter(|n| !n.is_empty())
        };
        Some(match parts.as_slice() {
            ["events"] => (Endpoint::Events, "POST"),
            ["batch_events"] => (Endpoint::BatchEvents, "POST"),
            ["channels"] => (Endpoint::Channels, "GET"),
            ["channels", c] => (Endpoint::Channel(name(c)?), "GET"),
            ["channels", c, "users"] => (Endpoint::ChannelUsers(name(c)?), "GET"),
            ["users", u, "terminate_connections"] => {
                (Endpoint::TerminateConnections(name(u)?), "POST")
            }
            _ => return None,
        })
    }
}

/// Answers a request under `/apps/`: status and JSON body.
pub(super) async fn api(
    hub: &Hub,
    s: &mut TcpStream,
    req: &Request,
    deadline: tokio::time::Instant,
) -> (u16, String) {
    let rest = req.path.strip_prefix("/apps/").unwrap_or("");
    let (app_id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let Some((endpoint, method)) = Endpoint::parse(tail) else {
        return (404, error_body("not found"));
    };
    if app_id != hub.cfg.app_id {
        return (404, error_body(&format!("unknown app id {app_id:?}")));
    }
    if req.method != method {
        return (405, error_body(&format!("only {method} is supported here")));
    }
    let body = match read_body(s, req, deadline).await {
        Ok(bridge) => bridge,
        Err(e) => return e,
    };
    let now_s = (now_ms() / 1000) as i64;
    let (signature, ts) =
        match check_signature(hub, &req.method, &req.path, &req.query, &body, now_s) {
            Ok(v) => v,
            Err(m) => return (401, error_body(&m)),
        };
    // A POST changes something: accepted once. The queries (GET) are
    // idempotent, and an SDK signs two identical queries within the same
    // second alike: their signatures are not remembered.
    if method == "POST" {
        if let Err(e) = first_use(hub, &signature, ts, now_s).await {
            return e;
        }
    }
    match endpoint {
        Endpoint::Events => events(hub, &body, false),
        Endpoint::BatchEvents => events(hub, &body, true),
        Endpoint::Channels => queries::channels(hub, &req.query).await,
        Endpoint::Channel(c) => queries::channel(hub, &c, &req.query).await,
        Endpoint::ChannelUsers(c) => queries::users(hub, &c).await,
        Endpoint::TerminateConnections(u) => queries::terminate(hub, &u).await,
    }
}

/// The body, read up to its Content-Length (by the head's deadline).
async fn read_body(
    s: &mut TcpStream,
    req: &Request,
    deadline: tokio::time::Instant,
) -> Result<Vec<u8>, (u16, String)> {
    if req.chunked {
        return Err((411, error_body("a Content-Length is required")));
    }
    let len = req.content_length.unwrap_or(0);
    if len > MAX_BODY {
        return Err((
            413,
            error_body(&format!("body of {len} bytes: at most {MAX_BODY}")),
        ));
    }
    let mut body = req.rest.clone();
    body.truncate(len);
    if body.len() < len {
        let have = body.len();
        body.resize(len, 0);
        match tokio::time::timeout_at(deadline, s.read_exact(&mut body[have..])).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err((400, error_body("body shorter than its Content-Length"))),
            Err(_) => return Err((408, error_body("body not received in time"))),
        }
    }
    Ok(body)
}

/// Refuses a signature seen before: it is remembered until its timestamp
/// leaves the accepted window (shared through Redis when it is there).
async fn first_use(hub: &Hub, signature: &str, ts: i64, now_s: i64) -> Result<(), (u16, String)> {
    let expires = ts + MAX_SKEW_S;
    match lock(&hub.replay).check(signature, expires, now_s) {
        Seen::New => {}
        Seen::Replay => return Err((401, error_body(REPLAYED))),
        Seen::Full => {
            return Err((
                429,
                error_body("too many signed requests within the last 10 minutes: retry later"),
            ))
        }
    }
    if let Some(bridge) = &hub.redis {
        if bridge
            .first_seen_signature(signature, (expires - now_s + 1).max(1) as u64)
            .await
            == Some(false)
        {
            return Err((401, error_body(REPLAYED)));
        }
    }
    Ok(())
}

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

/// `POST events` and `POST batch_events`.
fn events(hub: &Hub, body: &[u8], batch: bool) -> (u16, String) {
    let events: Vec<ApiEvent> = if batch {
        match serde_json::from_slice::<ApiBatch>(body) {
            Ok(bridge) => bridge.batch,
            Err(e) => return (400, error_body(&format!("invalid JSON body: {e}"))),
        }
    } else {
        match serde_json::from_slice::<ApiEvent>(body) {
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
                    Metrics::add(&hub.metrics.published_refused, 1);
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
        let answer = crate::protocol::api::BatchAnswer {
            batch: checked.iter().map(|_| Default::default()).collect(),
        };
        (200, serde_json::to_string(&answer).unwrap_or_default())
    } else {
        (200, "{}".to_string())
    }
}
