//! One task per WebSocket connection, speaking Pusher protocol 7.
//!
//! The task owns the socket; other tasks reach it only through its `Conn`
//! (a bounded queue of serialized frames and a close request). Its state is
//! kept small: tungstenite with a 512-byte read buffer and no write buffering,
//! the list of its channels, and one timer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::conn::{Conn, Pop};
pub(crate) use super::frames::error_frame;
use super::frames::{frame, subscription_error};
use super::{lock, router, Hub};
use crate::protocol::frames::ConnectionEstablished;
use crate::protocol::pusher;

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// tungstenite zero-fills its read buffer up to this size on every read:
/// Pusher client messages are small, so a small buffer keeps idle connections cheap.
pub(crate) const READ_BUFFER: usize = 512;
/// Largest message a client may send (Pusher's limit is 10 KB).
pub(crate) const MAX_CLIENT_MESSAGE: usize = 10 * 1024;
/// Channels one connection may subscribe to.
const MAX_SUBSCRIPTIONS: usize = 100;

pub(crate) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
}

/// Registers a new connection; None when `max_connections` is reached.
pub(crate) fn register(hub: &Hub) -> Option<Arc<Conn>> {
    let max = hub.limits.budget.websockets;
    let n = hub
        .metrics
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        + 1;
    if max > 0 && n > max {
        hub.metrics
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        return None;
    }
    let (id, rand) = hub.new_conn_ids();
    let conn = Arc::new(Conn::new(id, rand));
    lock(&hub.conns).insert(id, conn.clone());
    if hub.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        conn.close(4200, "Hub restarting, reconnect now");
    }
    Some(conn)
}

fn unregister(hub: &Hub, conn: &Conn) {
    if lock(&hub.conns).remove(&conn.id).is_some() {
        hub.metrics
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn send(hub: &Hub, ws: &mut Ws, text: Utf8Bytes) -> Result<(), ()> {
    match tokio::time::timeout(hub.tunables.write_timeout, ws.send(Message::Text(text))).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Sends a close frame and waits briefly for the peer's reply.
async fn close(ws: &mut Ws, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
}

async fn await_peer_close(ws: &mut Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Accepts the upgrade but refuses the connection: `pusher:error` then close.
pub(crate) async fn reject(mut ws: Ws, code: u16, message: String) {
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        ws.send(Message::Text(error_frame(code, &message))),
    )
    .await;
    close(&mut ws, code, &message).await;
    await_peer_close(&mut ws).await;
}

enum End {
    /// The peer went away (or a write failed): nothing more to send.
    Gone,
    /// The peer sent a close frame: tungstenite answers it on flush.
    PeerClosed,
    /// Close frame only (hub restart 4200, slow consumer 4100).
    Close(u16, &'static str),
    /// `pusher:error` then close with `close`.
    Error {
        code: u16,
        message: String,
        close: u16,
    },
}

pub(crate) async fn session(hub: Arc<Hub>, mut ws: Ws, conn: Arc<Conn>) {
    let mut subs: Vec<Box<str>> = Vec::new();
    let end = serve_conn(&hub, &mut ws, &conn, &mut subs).await;
    // Unsubscribe first, so that fan-out stops reaching this connection at once.
    {
        let ctx = hub.ctx();
        let mut state = lock(&hub.state);
        let mut emptied = false;
        for ch in &subs {
            emptied |= state.channels.unsubscribe(&ctx, &conn, ch);
        }
        drop(state);
        router::unsubscribed(&hub, emptied);
    }
    drop(subs);
    // Boxed: the closing steps are rare, so their state is not part of every
    // idle connection's task.
    Box::pin(finish(&hub, &mut ws, &conn, end)).await;
}

async fn finish(hub: &Hub, ws: &mut Ws, conn: &Conn, end: End) {
    match end {
        End::Gone => unregister(hub, conn),
        End::PeerClosed => {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.flush()).await;
            unregister(hub, conn);
        }
        End::Close(code, reason) => {
            close(ws, code, reason).await;
            unregister(hub, conn);
            await_peer_close(ws).await;
        }
        End::Error {
            code,
            message,
            close: close_code,
        } => {
            let _ = send(hub, ws, error_frame(code, &message)).await;
            close(ws, close_code, &message).await;
            unregister(hub, conn);
            await_peer_close(ws).await;
        }
    }
}

async fn serve_conn(hub: &Hub, ws: &mut Ws, conn: &Arc<Conn>, subs: &mut Vec<Box<str>>) -> End {
    // In a block: nothing of it stays in the (per-connection) future.
    let text = {
        let socket_id = conn.socket_id().to_string();
        let established = ConnectionEstablished {
            socket_id: &socket_id,
            activity_timeout: hub.cfg.activity_timeout,
        };
        let data = serde_json::to_string(&established).unwrap_or_default();
        frame("pusher:connection_established", None, &data)
    };
    if send(hub, ws, text).await.is_err() {
        return End::Gone;
    }
    let activity = Duration::from_secs(hub.cfg.activity_timeout.clamp(1, 86_400));
    let pong_timeout = hub.tunables.pong_timeout;
    let mut last_rx = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let sleep = tokio::time::sleep(activity);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            biased;
            _ = conn.notify.notified() => loop {
                match conn.pop() {
                    Pop::Empty => break,
                    Pop::Close(code, reason) => return End::Close(code, reason),
                    Pop::Msg(m) => {
                        if send(hub, ws, m).await.is_err() {
                            return End::Gone;
                        }
                    }
                }
            },
            msg = ws.next() => {
                let msg = match msg {
                    None => return End::Gone,
                    Some(Ok(m)) => m,
                    Some(Err(WsError::Capacity(_))) => {
                        return End::Error {
                            // 4009 means "unauthorized" in Pusher's protocol; 43xx is "other".
                            code: 4300,
                            message: format!("Message too large: at most {MAX_CLIENT_MESSAGE} bytes"),
                            close: 1009,
                        }
                    }
                    Some(Err(WsError::Utf8(_))) => {
                        return End::Error { code: 4000, message: "Invalid UTF-8 in a text message".into(), close: 1007 }
                    }
                    Some(Err(WsError::Protocol(e))) => {
                        return End::Error { code: 4000, message: format!("WebSocket protocol error: {e}"), close: 1002 }
                    }
                    Some(Err(_)) => return End::Gone,
                };
                last_rx = Instant::now();
                ping_sent = None;
                let replies = match msg {
                    Message::Text(t) => handle_text(hub, conn, subs, t.as_str()),
                    Message::Binary(_) => vec![error_frame(4000, "Binary messages are not supported")],
                    Message::Ping(_) => {
                        // tungstenite queued the pong: write it now.
                        if tokio::time::timeout(hub.tunables.write_timeout, ws.flush()).await.is_err() {
                            return End::Gone;
                        }
                        Vec::new()
                    }
                    Message::Close(_) => return End::PeerClosed,
                    Message::Pong(_) | Message::Frame(_) => Vec::new(),
                };
                for r in replies {
                    if send(hub, ws, r).await.is_err() {
                        return End::Gone;
                    }
                }
            }
            _ = &mut sleep => {
                let now = Instant::now();
                if let Some(sent) = ping_sent {
                    if now >= sent + pong_timeout {
                        return End::Error { code: 4201, message: "Pong reply not received".into(), close: 4201 };
                    }
                    sleep.as_mut().reset((sent + pong_timeout).into());
                } else if now >= last_rx + activity {
                    let ping = Utf8Bytes::from_static("{\"event\":\"pusher:ping\",\"data\":\"{}\"}");
                    if send(hub, ws, ping).await.is_err() {
                        return End::Gone;
                    }
                    ping_sent = Some(now);
                    sleep.as_mut().reset((now + pong_timeout).into());
                } else {
                    sleep.as_mut().reset((last_rx + activity).into());
                }
            }
        }
    }
}

/// Handles one client message; returns the frames to send back.
fn handle_text(
    hub: &Hub,
    conn: &Arc<Conn>,
    subs: &mut Vec<Box<str>>,
    text: &str,
) -> Vec<Utf8Bytes> {
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return vec![error_frame(4000, &format!("Invalid JSON: {e}"))],
    };
    let Some(event) = v.get("event").and_then(|e| e.as_str()) else {
        return vec![error_frame(
            4000,
            "Invalid message: a JSON object with an \"event\" string is expected",
        )];
    };
    // pusher-js sends objects; some clients send the data as a JSON string.
    let data = match v.get("data") {
        Some(serde_json::Value::String(s)) => {
            serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.clone()))
        }
        Some(d) => d.clone(),
        None => serde_json::Value::Null,
    };
    match event {
        "pusher:ping" => vec![Utf8Bytes::from_static(
            "{\"event\":\"pusher:pong\",\"data\":\"{}\"}",
        )],
        "pusher:pong" => Vec::new(),
        "pusher:subscribe" => subscribe(hub, conn, subs, &data),
        "pusher:unsubscribe" => {
            if let Some(ch) = data.get("channel").and_then(|c| c.as_str()) {
                if let Some(i) = subs.iter().position(|s| &**s == ch) {
                    subs.swap_remove(i);
                    let emptied = lock(&hub.state).channels.unsubscribe(&hub.ctx(), conn, ch);
                    router::unsubscribed(hub, emptied);
                }
            }
            Vec::new()
        }
        e if e.starts_with("client-") => vec![error_frame(
            4301,
            "Client events are not enabled on this hub",
        )],
        other => {
            let name = pusher::truncate(other, 64);
            vec![error_frame(4000, &format!("Unsupported event {name:?}"))]
        }
    }
}

fn subscribe(
    hub: &Hub,
    conn: &Arc<Conn>,
    subs: &mut Vec<Box<str>>,
    data: &serde_json::Value,
) -> Vec<Utf8Bytes> {
    let Some(channel) = data.get("channel").and_then(|c| c.as_str()) else {
        return vec![error_frame(
            4000,
            "pusher:subscribe needs data {\"channel\": \"...\"}",
        )];
    };
    if let Err(e) = pusher::validate_channel(channel) {
        if channel.len() > 200 {
            return vec![error_frame(4000, &e)];
        }
        return vec![subscription_error(channel, "InvalidChannel", &e, 400)];
    }
    let already = subs.iter().any(|s| &**s == channel);
    if !already && subs.len() >= MAX_SUBSCRIPTIONS {
        return vec![subscription_error(
            channel,
            "LimitReached",
            &format!("at most {MAX_SUBSCRIPTIONS} channels per connection"),
            429,
        )];
    }
    let mut member = None;
    if channel.starts_with("private-") || channel.starts_with("presence-") {
        let auth = data.get("auth").and_then(|a| a.as_str()).unwrap_or("");
        let channel_data = data.get("channel_data").and_then(|d| d.as_str());
        if let Err(e) = pusher::verify_channel_auth(
            &hub.cfg.app_key,
            &hub.cfg.app_secret,
            &conn.socket_id().to_string(),
            channel,
            channel_data,
            auth,
        ) {
            return vec![subscription_error(channel, "AuthError", &e, 401)];
        }
        if channel.starts_with("presence-") {
            if let Some(cd) = channel_data {
                let user_id = match pusher::presence_user_id(cd) {
                    Ok(u) => u,
                    Err(e) => return vec![subscription_error(channel, "AuthError", &e, 401)],
                };
                let info = serde_json::from_str::<serde_json::Value>(cd)
                    .ok()
                    .and_then(|mut v| v.get_mut("user_info").map(serde_json::Value::take))
                    .unwrap_or(serde_json::Value::Null);
                member = Some((user_id, info));
            }
        }
    }
    let sub = lock(&hub.state)
        .channels
        .subscribe(&hub.ctx(), conn, channel, member);
    if !already {
        subs.push(channel.into());
    }
    router::subscribed(hub, channel, &sub);
    let mut out = Vec::with_capacity(2);
    out.push(frame(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        &sub.data,
    ));
    if let Some(latest) = sub.replay {
        out.push(latest);
    }
    out
}
