//! The hub's TCP port: the HTTP request head is read by hand (httparse), then
//! routed to the WebSocket upgrade (`/app/{key}`), the Pusher events API
//! (`POST /apps/{id}/events`, `/batch_events`), `/health` or `/metrics`.
//! Plain HTTP responses are `Connection: close`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

mod api;
mod prometheus;
mod queries;

pub(crate) use api::{MAX_EVENT_DATA, MAX_SIGNATURES};

use super::limits::{Admit, Slot};
use super::{ws, Hub, Metrics};

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Refusals arrive at flood speed: one log line per 10 s.
static REFUSED_LOG: super::RateLog = super::RateLog::new();

pub(crate) async fn accept_loop(hub: Arc<Hub>, listener: TcpListener, down: watch::Receiver<bool>) {
    super::accept::accept_loop("accept", listener, down, |(s, addr)| {
        admit(hub.clone(), s, addr)
    })
    .await;
}

/// Gives a new TCP connection its place in the descriptor budget, or closes it.
async fn admit(hub: Arc<Hub>, s: TcpStream, addr: std::net::SocketAddr) {
    let mut tries = 0;
    let slot = loop {
        match hub.limits.admit(addr.ip()) {
            Admit::Ok(slot) => break Some(slot),
            Admit::Refuse(why) => {
                REFUSED_LOG.log(format_args!("connection from {} refused: {why}", addr.ip()));
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
            tokio::spawn(handle(hub, s, slot));
        }
        None => {
            Metrics::add(&hub.metrics.tcp_refused, 1);
            drop(s);
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

pub(super) fn error_body(message: &str) -> String {
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
    let deadline = tokio::time::Instant::now() + hub.tunables.handshake_timeout;
    let head = tokio::select! {
        r = tokio::time::timeout_at(deadline, read_head(&mut s)) => r,
        _ = slot.evicted() => {
            // Closed to make room for a newer connection.
            Metrics::add(&hub.metrics.pending_evicted, 1);
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
                "connections": Metrics::get(&hub.metrics.connections),
                "tcp_connections": tcp,
                "pending_handshakes": pending,
                "uptime_s": hub.uptime_s(),
            })
            .to_string();
            respond_json(&mut s, 200, &body).await;
        }
        ("GET", "/metrics") => {
            let body = prometheus::metrics_text(&hub);
            respond(
                &mut s,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                "",
                &body,
            )
            .await;
        }
        (_, path) if path.starts_with("/apps/") => {
            // Pending (evictable) until its body is in and answered. Boxed:
            // the API's state (Redis queries) is no part of every connection's
            // handshake task.
            let (status, body) = tokio::select! {
                r = Box::pin(api::api(&hub, &mut s, &req, deadline)) => r,
                _ = slot.evicted() => {
                    Metrics::add(&hub.metrics.pending_evicted, 1);
                    return;
                }
            };
            respond_json(&mut s, status, &body).await;
        }
        _ => respond_json(&mut s, 404, &error_body("not found")).await,
    }
}

/// The first value of `name` in a query string (form-urlencoded).
pub(super) fn query_param(query: &str, name: &str) -> Option<String> {
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
