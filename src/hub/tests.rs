//! End-to-end tests: a real hub on a free port, real WebSocket clients, a real
//! ingest socket.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{serve, HubOptions, Tunables};
use crate::config::{Config, HubMode};
use crate::protocol::ingest::{self, IngestMessage, ProgressReport, StreamOutcome};
use crate::protocol::pusher;

const KEY: &str = "test-key";
const SECRET: &str = "test-secret";
const APP: &str = "test-app";
const T: Duration = Duration::from_secs(5);

type Client = WebSocketStream<TcpStream>;

fn config() -> Config {
    Config {
        enabled: true,
        storage_dir: std::env::temp_dir(),
        hub: HubMode::External,
        listen: "127.0.0.1:0".into(),
        hub_socket: String::new(),
        app_id: APP.into(),
        app_key: KEY.into(),
        app_secret: SECRET.into(),
        allowed_origins: vec!["*".into()],
        progress_param: "X-Progress-ID".into(),
        min_interval_ms: 100,
        chunk_size: 8 << 20,
        max_upload_size: 0,
        expire_seconds: 86400,
        activity_timeout: 30,
        max_connections: 0,
        max_pending_handshakes: 0,
        max_connections_per_ip: 0,
        handshake_timeout: 0,
        redis_url: String::new(),
        php_binary: String::new(),
    }
}

struct TestHub {
    port: u16,
    sock: std::path::PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
    _dir: tempfile::TempDir,
}

async fn start_with(cfg: Config, tun: Tunables) -> TestHub {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ingest.sock");
    let ingest = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let (tx, rx) = oneshot::channel::<()>();
    let opts = HubOptions {
        config: cfg,
        version: "1.0.0".into(),
        ingest,
        watch_pid: None,
    };
    let task = tokio::spawn(serve(opts, Some(tcp), tun, async move {
        let _ = rx.await;
        "test stop".to_string()
    }));
    TestHub {
        port,
        sock,
        stop: Some(tx),
        task,
        _dir: dir,
    }
}

async fn start() -> TestHub {
    start_with(config(), Tunables::default()).await
}

impl TestHub {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let r = tokio::time::timeout(T, self.task).await.unwrap().unwrap();
        assert!(r.is_ok());
    }

    async fn raw_ws(&self, path: &str) -> Client {
        let s = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let url = format!("ws://127.0.0.1:{}{path}", self.port);
        let (ws, _) = tokio_tungstenite::client_async(url, s).await.unwrap();
        ws
    }

    /// A connected client and its socket id.
    async fn ws(&self) -> (Client, String) {
        let mut ws = self
            .raw_ws(&format!("/app/{KEY}?protocol=7&client=js"))
            .await;
        let m = recv(&mut ws).await;
        assert_eq!(m["event"], "pusher:connection_established");
        let d: Value = serde_json::from_str(m["data"].as_str().unwrap()).unwrap();
        let sid = d["socket_id"].as_str().unwrap().to_string();
        (ws, sid)
    }

    async fn ingest(&self) -> UnixStream {
        let mut s = UnixStream::connect(&self.sock).await.unwrap();
        send_ingest(
            &mut s,
            &IngestMessage::Hello {
                version: "1.0.0".into(),
                dropped: 0,
            },
        )
        .await;
        s
    }

    async fn http(&self, req: String) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        self.http(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
            .await
    }

    /// A metric read from another loopback address (not counted with 127.0.0.1).
    async fn metric_from_other(&self, name: &str) -> u64 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock
            .connect(format!("127.0.0.1:{}", self.port).parse().unwrap())
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("upload_progress_{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    }

    async fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("upload_progress_{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    }
}

async fn send_ingest(s: &mut UnixStream, msg: &IngestMessage) {
    let mut buf = Vec::new();
    ingest::encode(msg, &mut buf);
    s.write_all(&buf).await.unwrap();
}

async fn query(s: &mut UnixStream, msg: &IngestMessage) -> String {
    send_ingest(s, msg).await;
    let mut len = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    String::from_utf8(body).unwrap()
}

fn publish(channel: &str, event: &str, data: &str) -> IngestMessage {
    IngestMessage::Publish {
        channel: channel.into(),
        event: event.into(),
        data: data.into(),
    }
}

/// Next text message as JSON (control frames are skipped).
async fn recv(ws: &mut Client) -> Value {
    loop {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .expect("timed out waiting for a message")
            .expect("connection ended")
            .expect("websocket error");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// Reads until the connection closes; returns the close code.
async fn close_code(ws: &mut Client) -> Option<u16> {
    loop {
        match tokio::time::timeout(T, ws.next()).await.expect("no close") {
            Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
            Some(Ok(_)) => {}
            _ => return None,
        }
    }
}

async fn send_json(ws: &mut Client, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

async fn subscribe(ws: &mut Client, sid: &str, channel: &str) -> Value {
    let mut data = json!({ "channel": channel });
    if channel.starts_with("private-") {
        let body = pusher::channel_auth(KEY, SECRET, sid, channel, None).unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        data["auth"] = v["auth"].clone();
    }
    send_json(ws, json!({"event": "pusher:subscribe", "data": data})).await;
    recv(ws).await
}

async fn assert_alive(ws: &mut Client) {
    send_json(ws, json!({"event": "pusher:ping", "data": {}})).await;
    let m = recv(ws).await;
    assert_eq!(m["event"], "pusher:pong");
}

fn data_of(m: &Value) -> Value {
    serde_json::from_str(m["data"].as_str().expect("data is a string")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_established_and_ping() {
    let hub = start().await;
    let mut ws = hub.raw_ws(&format!("/app/{KEY}?protocol=7")).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "pusher:connection_established");
    let d = data_of(&m);
    pusher::validate_socket_id(d["socket_id"].as_str().unwrap()).unwrap();
    assert_eq!(d["activity_timeout"], 30);
    assert_alive(&mut ws).await;
    // WebSocket ping frames are answered.
    ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(T, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"hi".to_vec().into()));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_publish_and_replay() {
    let hub = start().await;
    let (mut a, sid) = hub.ws().await;
    let m = subscribe(&mut a, &sid, "news").await;
    assert_eq!(m["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(m["channel"], "news");
    assert_eq!(m["data"], "{}");
    let mut ing = hub.ingest().await;
    send_ingest(&mut ing, &publish("news", "headline", r#"{"n":1}"#)).await;
    let m = recv(&mut a).await;
    assert_eq!(m["event"], "headline");
    assert_eq!(m["channel"], "news");
    assert_eq!(m["data"], r#"{"n":1}"#);
    // A late subscriber gets the latest event right after subscription_succeeded.
    let (mut b, sid_b) = hub.ws().await;
    let m = subscribe(&mut b, &sid_b, "news").await;
    assert_eq!(m["event"], "pusher_internal:subscription_succeeded");
    let m = recv(&mut b).await;
    assert_eq!(m["event"], "headline");
    assert_eq!(m["data"], r#"{"n":1}"#);
    // Unsubscribed clients get nothing more.
    send_json(
        &mut b,
        json!({"event":"pusher:unsubscribe","data":{"channel":"news"}}),
    )
    .await;
    assert_alive(&mut b).await;
    send_ingest(&mut ing, &publish("news", "headline", r#"{"n":2}"#)).await;
    assert_eq!(recv(&mut a).await["data"], r#"{"n":2}"#);
    assert_alive(&mut b).await;
    assert!(hub.metric("events_out_total").await >= 3);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_auth() {
    let hub = start().await;
    let (mut ws, sid) = hub.ws().await;
    let m = subscribe(&mut ws, &sid, "private-room").await;
    assert_eq!(m["event"], "pusher_internal:subscription_succeeded");
    // Wrong signature: subscription_error on that channel, connection stays.
    let auth = format!(
        "{KEY}:{}",
        pusher::sign("wrong", &format!("{sid}:private-other"))
    );
    send_json(
        &mut ws,
        json!({"event":"pusher:subscribe","data":{"channel":"private-other","auth":auth}}),
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "pusher:subscription_error");
    assert_eq!(m["channel"], "private-other");
    assert_eq!(m["data"]["type"], "AuthError");
    assert_eq!(m["data"]["status"], 401);
    // Missing auth, and a signature made for another socket id.
    send_json(
        &mut ws,
        json!({"event":"pusher:subscribe","data":{"channel":"private-x"}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["event"], "pusher:subscription_error");
    let other = pusher::channel_auth(KEY, SECRET, "1.1", "private-y", None).unwrap();
    let other: Value = serde_json::from_str(&other).unwrap();
    send_json(
        &mut ws,
        json!({"event":"pusher:subscribe","data":{"channel":"private-y","auth":other["auth"]}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["event"], "pusher:subscription_error");
    assert_alive(&mut ws).await;
    // Still subscribed to the first channel.
    let mut ing = hub.ingest().await;
    send_ingest(&mut ing, &publish("private-room", "msg", "hello")).await;
    assert_eq!(recv(&mut ws).await["data"], "hello");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_members() {
    let hub = start().await;
    let (mut a, sid_a) = hub.ws().await;
    let cd = r#"{"user_id":"u1","user_info":{"name":"Ann"}}"#;
    let auth = pusher::channel_auth(KEY, SECRET, &sid_a, "presence-lobby", Some(cd)).unwrap();
    let auth: Value = serde_json::from_str(&auth).unwrap();
    send_json(
        &mut a,
        json!({"event":"pusher:subscribe","data":{"channel":"presence-lobby","auth":auth["auth"],"channel_data":cd}}),
    )
    .await;
    let m = recv(&mut a).await;
    assert_eq!(m["event"], "pusher_internal:subscription_succeeded");
    let d = data_of(&m);
    assert_eq!(d["presence"]["count"], 1);
    assert_eq!(d["presence"]["hash"]["u1"]["name"], "Ann");
    let (mut b, sid_b) = hub.ws().await;
    let cd2 = r#"{"user_id":2}"#;
    let auth = pusher::channel_auth(KEY, SECRET, &sid_b, "presence-lobby", Some(cd2)).unwrap();
    let auth: Value = serde_json::from_str(&auth).unwrap();
    send_json(
        &mut b,
        json!({"event":"pusher:subscribe","data":{"channel":"presence-lobby","auth":auth["auth"],"channel_data":cd2}}),
    )
    .await;
    assert_eq!(data_of(&recv(&mut b).await)["presence"]["count"], 2);
    let m = recv(&mut a).await;
    assert_eq!(m["event"], "pusher_internal:member_added");
    assert_eq!(data_of(&m)["user_id"], "2");
    drop(b);
    let m = recv(&mut a).await;
    assert_eq!(m["event"], "pusher_internal:member_removed");
    hub.stop().await;
}

/// Attacker: app code (or a caller of the events API) publishes data with
/// `"seq": 1e300`. Before: the hub took it as the channel's seq and dropped
/// every later event there as stale (a silenced channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_seq_orders_nothing() {
    let hub = start().await;
    let (mut ws, sid) = hub.ws().await;
    subscribe(&mut ws, &sid, "private-s").await;
    let mut ing = hub.ingest().await;
    for seq in ["1e300", "10", "5", "10"] {
        let d = format!(r#"{{"seq":{seq}}}"#);
        send_ingest(&mut ing, &publish("private-s", "e", &d)).await;
    }
    for want in ["1e300", "10", "5", "10"] {
        let got = recv(&mut ws).await;
        assert_eq!(got["data"], format!(r#"{{"seq":{want}}}"#));
    }
    assert_eq!(hub.metric("events_dropped_total").await, 0);
    hub.stop().await;
}

fn progress_of(id: &str, stream: u64, inflight: u64) -> IngestMessage {
    IngestMessage::Progress(ProgressReport {
        upload_id: id.into(),
        stream,
        bytes_total: 1000,
        chunk_count: 2,
        stored_bytes: 0,
        chunks_done: 0,
        inflight,
    })
}

fn terminal_of(id: &str, event: &str) -> IngestMessage {
    IngestMessage::Terminal {
        upload_id: id.into(),
        event: event.into(),
        fields: r#"{"bytes_total":1}"#.into(),
    }
}

/// Attacker: knows an Upload's id and sends a 1-byte POST to any PHP script
/// with `?X-Progress-ID=<id>`. Before: the request's reports (progress,
/// `complete`) went to `private-upload.<id>`, the channel ended, and the hub
/// dropped the real chunk events after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_requests_never_speak_on_an_upload_channel() {
    let storage = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.storage_dir = storage.path().to_path_buf();
    let hub = start_with(cfg, Tunables::default()).await;
    let (mut ws, sid) = hub.ws().await;
    let mut ing = hub.ingest().await;

    // 1. An Upload the hub knows from its reports.
    subscribe(&mut ws, &sid, "private-upload.up9").await;
    send_ingest(&mut ing, &progress_of("up9", 1, 100)).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "progress");
    let first = data_of(&m)["seq"].as_u64().unwrap();
    let forged_progress = progress_of("up9", 77, 1000).tagged_request();
    send_ingest(&mut ing, &forged_progress).await;
    send_ingest(&mut ing, &terminal_of("up9", "complete").tagged_request()).await;
    send_ingest(&mut ing, &progress_of("up9", 1, 300)).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "progress", "{m}");
    let d = data_of(&m);
    assert_eq!(
        (d["bytes_done"].as_u64(), d["state"].as_str()),
        (Some(300), Some("uploading"))
    );
    assert!(d["seq"].as_u64().unwrap() > first);

    // 2. An Upload known only by its directory in storage_dir (no report yet).
    std::fs::create_dir(storage.path().join("up8")).unwrap();
    subscribe(&mut ws, &sid, "private-upload.up8").await;
    send_ingest(&mut ing, &terminal_of("up8", "complete").tagged_request()).await;

    // 3. A plain tagged request for an id that is no Upload still reports.
    subscribe(&mut ws, &sid, "private-upload.plain1").await;
    send_ingest(&mut ing, &progress_of("plain1", 5, 10).tagged_request()).await;
    send_ingest(
        &mut ing,
        &terminal_of("plain1", "complete").tagged_request(),
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["event"].as_str(), m["channel"].as_str()),
        (Some("progress"), Some("private-upload.plain1"))
    );
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["event"].as_str(), m["channel"].as_str()),
        (Some("complete"), Some("private-upload.plain1"))
    );
    // Nothing reached up8, and up9's latest is still the real progress.
    assert_eq!(hub.metric("tagged_refused_total").await, 3);
    let p = query(
        &mut ing,
        &IngestMessage::QueryProgress {
            upload_id: "up9".into(),
        },
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&p).unwrap()["bytes_done"],
        300
    );
    let p = query(
        &mut ing,
        &IngestMessage::QueryProgress {
            upload_id: "up8".into(),
        },
    )
    .await;
    assert_eq!(p, "");
    hub.stop().await;
}

/// Attacker: `publish()` (or the events API) on `private-upload.<id>` with
/// `complete`, or with a huge `seq`. Before: the published event became the
/// channel's latest, replayed to new subscribers and returned by progress(),
/// and its seq silenced the real events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_never_end_or_advance_an_upload_channel() {
    let hub = start().await;
    let (mut ws, sid) = hub.ws().await;
    let mut ing = hub.ingest().await;
    let ch = "private-upload.up7";
    subscribe(&mut ws, &sid, ch).await;
    send_ingest(&mut ing, &progress_of("up7", 1, 100)).await;
    assert_eq!(recv(&mut ws).await["event"], "progress");
    send_ingest(
        &mut ing,
        &publish(ch, "complete", r#"{"state":"complete"}"#),
    )
    .await;
    send_ingest(&mut ing, &publish(ch, "progress", r#"{"bytes_done":999}"#)).await;
    send_ingest(&mut ing, &publish(ch, "note", r#"{"seq":1e300}"#)).await;
    // Another event name without a seq is delivered, but kept nowhere.
    send_ingest(&mut ing, &publish(ch, "note", r#"{"text":"scanning"}"#)).await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["event"].as_str(), m["data"].as_str()),
        (Some("note"), Some(r#"{"text":"scanning"}"#))
    );
    assert_eq!(hub.metric("published_refused_total").await, 3);
    // The events API answers 403 for the same.
    let now = super::now_ms() / 1000;
    let path = format!("/apps/{APP}/events");
    let body = format!(r#"{{"name":"aborted","channel":"{ch}","data":"{{}}"}}"#);
    let (status, resp) = hub.http(signed("POST", &path, &body, now, SECRET)).await;
    assert_eq!(status, 403, "{resp}");
    assert!(resp.contains("reserved"), "{resp}");
    // The upload goes on; a new subscriber gets the real latest event.
    send_ingest(&mut ing, &progress_of("up7", 1, 200)).await;
    let m = recv(&mut ws).await;
    assert_eq!(data_of(&m)["bytes_done"], 200);
    let (mut ws2, sid2) = hub.ws().await;
    let sub = subscribe(&mut ws2, &sid2, ch).await;
    assert_eq!(sub["event"], "pusher_internal:subscription_succeeded");
    let m = recv(&mut ws2).await;
    assert_eq!(
        (m["event"].as_str(), data_of(&m)["bytes_done"].as_u64()),
        (Some("progress"), Some(200))
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_aggregation() {
    let hub = start().await;
    let (mut ws, sid) = hub.ws().await;
    subscribe(&mut ws, &sid, "private-upload.up1").await;
    let mut ing = hub.ingest().await;
    let rep = |stream, inflight, stored, done| {
        IngestMessage::Progress(ProgressReport {
            upload_id: "up1".into(),
            stream,
            bytes_total: 4000,
            chunk_count: 4,
            stored_bytes: stored,
            chunks_done: done,
            inflight,
        })
    };
    let end = |stream, outcome| IngestMessage::StreamEnd {
        upload_id: "up1".into(),
        stream,
        outcome,
        stored_bytes: 1000,
        chunks_done: 1,
    };
    send_ingest(&mut ing, &rep(1, 600, 0, 0)).await;
    send_ingest(&mut ing, &rep(2, 400, 0, 0)).await;
    send_ingest(&mut ing, &end(1, StreamOutcome::Stored)).await;
    send_ingest(&mut ing, &rep(2, 900, 1000, 1)).await;
    send_ingest(&mut ing, &end(2, StreamOutcome::Failed)).await;
    let mut last_seq = 0;
    let mut seen = vec![];
    for _ in 0..5 {
        let m = recv(&mut ws).await;
        assert_eq!(m["event"], "progress");
        assert_eq!(m["channel"], "private-upload.up1");
        let d = data_of(&m);
        assert_eq!(d["upload_id"], "up1");
        assert_eq!(d["state"], "uploading");
        assert_eq!(d["bytes_total"], 4000);
        assert_eq!(d["chunk_count"], 4);
        assert!(d["rate_bps"].is_u64());
        assert!(d["eta_s"].is_u64() || d["eta_s"].is_null());
        assert!(d["ts_ms"].as_u64().unwrap() > 1_700_000_000_000);
        let seq = d["seq"].as_u64().unwrap();
        assert!(seq > last_seq && seq > 1_700_000_000_000_000);
        last_seq = seq;
        seen.push((
            d["bytes_done"].as_u64().unwrap(),
            d["chunks_done"].as_u64().unwrap(),
        ));
    }
    // Two parallel streams add up; the failed stream lowers bytes_done.
    assert_eq!(seen, [(600, 0), (1000, 0), (1400, 1), (1900, 1), (1000, 1)]);
    let p = query(
        &mut ing,
        &IngestMessage::QueryProgress {
            upload_id: "up1".into(),
        },
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&p).unwrap()["bytes_done"],
        1000
    );
    send_ingest(
        &mut ing,
        &IngestMessage::Terminal {
            upload_id: "up1".into(),
            event: "complete".into(),
            fields: r#"{"sha256":"abc","path":"/tmp/x"}"#.into(),
        },
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "complete");
    let d = data_of(&m);
    assert_eq!(d["state"], "complete");
    assert_eq!(d["sha256"], "abc");
    assert_eq!(d["bytes_total"], 4000);
    assert!(d["seq"].as_u64().unwrap() > last_seq);
    // A late report after completion is not delivered; progress() sees "complete".
    send_ingest(&mut ing, &rep(3, 10, 1000, 1)).await;
    let p = query(
        &mut ing,
        &IngestMessage::QueryProgress {
            upload_id: "up1".into(),
        },
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&p).unwrap()["state"],
        "complete"
    );
    let p = query(
        &mut ing,
        &IngestMessage::QueryProgress {
            upload_id: "nope".into(),
        },
    )
    .await;
    assert_eq!(p, "");
    // A reconnecting client is in sync at once.
    let (mut b, sid_b) = hub.ws().await;
    subscribe(&mut b, &sid_b, "private-upload.up1").await;
    assert_eq!(recv(&mut b).await["event"], "complete");
    let st = query(&mut ing, &IngestMessage::QueryStatus).await;
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["running"], true);
    assert_eq!(st["version"], "1.0.0");
    assert_eq!(st["connections"], 2);
    assert_eq!(st["pid"], std::process::id());
    assert!(st["listen"]
        .as_str()
        .unwrap()
        .ends_with(&hub.port.to_string()));
    hub.stop().await;
}

fn signed(method: &str, path: &str, body: &str, ts: u64, secret: &str) -> String {
    use md5::Digest;
    let md5 = hex::encode(md5::Md5::digest(body.as_bytes()));
    let q = format!("auth_key={KEY}&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}");
    let sig = pusher::sign(secret, &format!("{method}\n{path}\n{q}"));
    format!(
        "{method} {path}?{q}&auth_signature={sig} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_api() {
    let hub = start().await;
    let (mut ws, sid) = hub.ws().await;
    subscribe(&mut ws, &sid, "api-ch").await;
    let now = super::now_ms() / 1000;
    let path = format!("/apps/{APP}/events");
    let body = r#"{"name":"ev","channels":["api-ch"],"data":"{\"x\":1}"}"#;
    let (status, resp) = hub.http(signed("POST", &path, body, now, SECRET)).await;
    assert_eq!((status, resp.as_str()), (200, "{}"));
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["event"].as_str(), m["data"].as_str()),
        (Some("ev"), Some(r#"{"x":1}"#))
    );
    // The sender's own socket is excluded.
    let body2 = format!(r#"{{"name":"ev","channel":"api-ch","data":"mine","socket_id":"{sid}"}}"#);
    assert_eq!(
        hub.http(signed("POST", &path, &body2, now, SECRET)).await.0,
        200
    );
    // Bad signature, stale timestamp.
    assert_eq!(
        hub.http(signed("POST", &path, body, now, "bad")).await.0,
        401
    );
    let (status, resp) = hub
        .http(signed("POST", &path, body, now - 3600, SECRET))
        .await;
    assert_eq!(status, 401);
    assert!(resp.contains("timestamp"), "{resp}");
    // Tampered body: body_md5 no longer matches.
    let mut req = signed("POST", &path, body, now, SECRET);
    req = req.replace("\"x\\\":1", "\"x\\\":2");
    assert_eq!(hub.http(req).await.0, 401);
    // Unknown app, bad JSON, bad names, data too large.
    let other = "/apps/other/events";
    assert_eq!(
        hub.http(signed("POST", other, body, now, SECRET)).await.0,
        404
    );
    assert_eq!(
        hub.http(signed("POST", &path, "{nope", now, SECRET))
            .await
            .0,
        400
    );
    let bad = r#"{"name":"ev","channels":["bad channel"],"data":"x"}"#;
    let (status, resp) = hub.http(signed("POST", &path, bad, now, SECRET)).await;
    assert_eq!(status, 400);
    assert!(resp.contains("bad channel"), "{resp}");
    let bad = r#"{"name":"pusher:x","channels":["a"],"data":"x"}"#;
    assert_eq!(
        hub.http(signed("POST", &path, bad, now, SECRET)).await.0,
        400
    );
    let big = format!(
        r#"{{"name":"ev","channels":["a"],"data":"{}"}}"#,
        "x".repeat(11 * 1024)
    );
    assert_eq!(
        hub.http(signed("POST", &path, &big, now, SECRET)).await.0,
        413
    );
    // Batch.
    let bpath = format!("/apps/{APP}/batch_events");
    let batch = r#"{"batch":[{"name":"b1","channel":"api-ch","data":"1"},{"name":"b2","channel":"api-ch","data":"2"}]}"#;
    assert_eq!(
        hub.http(signed("POST", &bpath, batch, now, SECRET)).await.0,
        200
    );
    assert_eq!(recv(&mut ws).await["event"], "b1");
    assert_eq!(recv(&mut ws).await["event"], "b2");
    hub.stop().await;
}

/// Attacker: captures one signed events API request (proxy log, shared host)
/// and sends it again, byte for byte, within the 600 s window. Before: every
/// copy was accepted and delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_api_refuses_replayed_requests() {
    let hub = start().await;
    let (mut ws, sid) = hub.ws().await;
    subscribe(&mut ws, &sid, "api-ch").await;
    let now = super::now_ms() / 1000;
    let path = format!("/apps/{APP}/events");
    let body = r#"{"name":"ev","channels":["api-ch"],"data":"once"}"#;
    let req = signed("POST", &path, body, now, SECRET);
    assert_eq!(hub.http(req.clone()).await.0, 200);
    assert_eq!(recv(&mut ws).await["data"], "once");
    for _ in 0..3 {
        let (status, resp) = hub.http(req.clone()).await;
        assert_eq!(status, 401, "{resp}");
        let v: Value = serde_json::from_str(&resp).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("replayed request"),
            "{resp}"
        );
    }
    // A new signature (another timestamp) is a new request.
    assert_eq!(
        hub.http(signed("POST", &path, body, now - 1, SECRET))
            .await
            .0,
        200
    );
    assert_eq!(recv(&mut ws).await["data"], "once");
    // Nothing else was delivered: the next message is the marker.
    let marker = r#"{"name":"ev","channels":["api-ch"],"data":"marker"}"#;
    assert_eq!(
        hub.http(signed("POST", &path, marker, now, SECRET)).await.0,
        200
    );
    assert_eq!(recv(&mut ws).await["data"], "marker");
    hub.stop().await;
}

/// Attacker: 70 idle TCP connections (no request head) against a hub whose
/// descriptor limit is 64. Before: accept() failed with EMFILE, /health timed
/// out and PHP could not reach the hub. Now the oldest pending connections are
/// closed to make room and descriptors stay in reserve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_flood_leaves_health_ingest_and_websockets_working() {
    let tun = Tunables {
        fd_limit: Some(64),
        ..Tunables::default()
    };
    let hub = start_with(config(), tun).await;
    let mut idle = Vec::new();
    for _ in 0..70 {
        idle.push(TcpStream::connect(("127.0.0.1", hub.port)).await.unwrap());
    }
    let (status, body) = tokio::time::timeout(Duration::from_secs(3), hub.get("/health"))
        .await
        .expect("/health answers during the flood");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["tcp_connections"].as_u64().unwrap() <= 40, "{v}");
    assert!(v["pending_handshakes"].as_u64().unwrap() <= 10, "{v}");
    assert!(hub.metric("pending_evicted_total").await >= 60);
    let mut ing = hub.ingest().await;
    let st: Value =
        serde_json::from_str(&query(&mut ing, &IngestMessage::QueryStatus).await).unwrap();
    assert_eq!(st["running"], true);
    let (mut ws, _) = hub.ws().await;
    assert_alive(&mut ws).await;
    // The first idle connections were closed by the hub.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(T, idle[0].read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    hub.stop().await;
}

/// Attacker: one address opens more connections than
/// `max_connections_per_ip`. Its own oldest pending connection makes room;
/// once all of its connections are WebSockets, new ones are refused at
/// accept, while another address is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_capped() {
    let mut cfg = config();
    cfg.max_connections_per_ip = 3;
    let tun = Tunables {
        count_loopback_per_ip: true,
        ..Tunables::default()
    };
    let hub = start_with(cfg, tun).await;
    let mut wss = Vec::new();
    for _ in 0..3 {
        wss.push(hub.ws().await.0);
    }
    let mut s = TcpStream::connect(("127.0.0.1", hub.port)).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert!(hub.metric_from_other("tcp_refused_total").await >= 1);
    for ws in &mut wss {
        assert_alive(ws).await;
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_not_found() {
    let hub = start().await;
    let (status, body) = hub.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );
    let (status, body) = hub.get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "connections",
        "subscriptions",
        "channels",
        "events_in_total",
        "events_out_total",
        "events_dropped_total",
        "slow_consumer_evictions_total",
        "ingest_connections",
        "uptime_seconds",
    ] {
        assert!(
            body.contains(&format!("\nupload_progress_{name} ")),
            "{name} in {body}"
        );
    }
    let (status, body) = hub.get("/nope").await;
    assert_eq!(status, 404);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    let (status, _) = hub.http("garbage\r\n\r\n".into()).await;
    assert_eq!(status, 400);
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(hub.http(huge).await.0, 431);
    // A plain GET on the WebSocket path is refused.
    assert_eq!(hub.get(&format!("/app/{KEY}")).await.0, 426);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_messages() {
    let hub = start().await;
    let (mut ws, _) = hub.ws().await;
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["event"].as_str(), m["data"]["code"].as_u64()),
        (Some("pusher:error"), Some(4000))
    );
    send_json(&mut ws, json!({"event":"pusher:whatever","data":{}})).await;
    assert_eq!(recv(&mut ws).await["data"]["code"], 4000);
    send_json(&mut ws, json!({"no":"event"})).await;
    assert_eq!(recv(&mut ws).await["data"]["code"], 4000);
    send_json(
        &mut ws,
        json!({"event":"client-typing","channel":"private-a","data":{}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["data"]["code"], 4301);
    send_json(
        &mut ws,
        json!({"event":"pusher:subscribe","data":{"channel":"bad name"}}),
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "pusher:subscription_error");
    assert_eq!(m["data"]["status"], 400);
    assert_alive(&mut ws).await;
    // Oversized: error 4300, then close 1009.
    let big = json!({"event":"pusher:ping","data":"x".repeat(11 * 1024)}).to_string();
    ws.send(Message::Text(big.into())).await.unwrap();
    let m = recv(&mut ws).await;
    assert_eq!(m["data"]["code"], 4300);
    assert_eq!(close_code(&mut ws).await, Some(1009));
    // The hub keeps serving.
    let (mut ws2, _) = hub.ws().await;
    assert_alive(&mut ws2).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_origin_and_capacity() {
    let mut cfg = config();
    cfg.max_connections = 1;
    cfg.allowed_origins = vec!["example.com".into()];
    let hub = start_with(cfg, Tunables::default()).await;
    let mut ws = hub.raw_ws("/app/wrong?protocol=7").await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["event"].as_str(), m["data"]["code"].as_u64()),
        (Some("pusher:error"), Some(4001))
    );
    assert_eq!(close_code(&mut ws).await, Some(4001));
    let mut ws = hub.raw_ws(&format!("/app/{KEY}?protocol=4")).await;
    assert_eq!(recv(&mut ws).await["data"]["code"], 4007);
    let req = format!(
        "GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://evil.com\r\n\r\n"
    );
    assert_eq!(hub.http(req).await.0, 403);
    let (mut first, _) = hub.ws().await;
    let mut second = hub.raw_ws(&format!("/app/{KEY}?protocol=7")).await;
    assert_eq!(recv(&mut second).await["data"]["code"], 4100);
    assert_eq!(close_code(&mut second).await, Some(4100));
    assert_alive(&mut first).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ping_and_pong_timeout() {
    let mut cfg = config();
    cfg.activity_timeout = 1;
    let tun = Tunables {
        pong_timeout: Duration::from_millis(500),
        ..Tunables::default()
    };
    let hub = start_with(cfg, tun).await;
    let (mut ws, _) = hub.ws().await;
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "pusher:ping");
    send_json(&mut ws, json!({"event":"pusher:pong","data":{}})).await;
    // Answered: the next ping comes after another second of silence.
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "pusher:ping");
    // Not answered: pusher:error 4201 and close 4201.
    let m = recv(&mut ws).await;
    assert_eq!(m["data"]["code"], 4201);
    assert_eq!(close_code(&mut ws).await, Some(4201));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_evicted() {
    let tun = Tunables {
        queue_cap: 8,
        write_timeout: Duration::from_secs(1),
        ..Tunables::default()
    };
    let hub = start_with(config(), tun).await;
    let (mut slow, sid) = hub.ws().await;
    subscribe(&mut slow, &sid, "firehose").await;
    let mut ing = hub.ingest().await;
    let data = "x".repeat(8000);
    for _ in 0..4000 {
        send_ingest(&mut ing, &publish("firehose", "e", &data)).await;
        if hub.metric("slow_consumer_evictions_total").await > 0 {
            break;
        }
    }
    assert_eq!(hub.metric("slow_consumer_evictions_total").await, 1);
    assert_eq!(hub.metric("subscriptions").await, 0);
    // The slow client's connection goes away; others are served.
    let mut gone = false;
    for _ in 0..50 {
        if hub.metric("connections").await == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone);
    drop(slow);
    let (mut ok, _) = hub.ws().await;
    assert_alive(&mut ok).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_ingest_frame_closes_that_connection_only() {
    let hub = start().await;
    let mut bad = hub.ingest().await;
    bad.write_all(&[3, 0, 0, 0, 99, 1, 2]).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(T, bad.read(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
    let mut huge = hub.ingest().await;
    huge.write_all(&[0xff, 0xff, 0xff, 0x7f]).await.unwrap();
    let n = tokio::time::timeout(T, huge.read(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(hub.metric("ingest_errors_total").await, 2);
    let mut good = hub.ingest().await;
    let st = query(&mut good, &IngestMessage::QueryStatus).await;
    assert!(st.contains("\"running\":true"));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_over_closes_with_4200() {
    let hub = start().await;
    let (mut ws, _) = hub.ws().await;
    let mut ing = UnixStream::connect(&hub.sock).await.unwrap();
    send_ingest(
        &mut ing,
        &IngestMessage::Hello {
            version: "2.0.0".into(),
            dropped: 3,
        },
    )
    .await;
    assert_eq!(close_code(&mut ws).await, Some(4200));
    let r = tokio::time::timeout(T, hub.task).await.unwrap().unwrap();
    assert!(r.is_ok());
    // The listeners are closed: the port and the socket are free for the next hub.
    assert!(TcpStream::connect(("127.0.0.1", hub.port)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_with_4200_quickly() {
    let hub = start().await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(hub.ws().await.0);
    }
    let t0 = std::time::Instant::now();
    hub.stop().await;
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    for mut c in clients {
        assert_eq!(close_code(&mut c).await, Some(4200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_pid_exit_stops_the_hub() {
    let mut child = std::process::Command::new("sleep")
        .arg("0.3")
        .spawn()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ingest = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let opts = HubOptions {
        config: config(),
        version: "1".into(),
        ingest,
        watch_pid: Some(child.id() as i32),
    };
    let task = tokio::spawn(serve(
        opts,
        Some(tcp),
        Tunables::default(),
        std::future::pending(),
    ));
    let _ = child.wait();
    let r = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert!(r.is_ok());
}

/// Size of the state one idle connection keeps in its task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_future_is_small() {
    let hub = start().await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let _c = TcpStream::connect(addr).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    let ws = WebSocketStream::from_raw_socket(
        s,
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        Some(super::ws::ws_config()),
    )
    .await;
    let fake = std::sync::Arc::new(super::Hub {
        cfg: config(),
        version: String::new(),
        tun: Tunables::default(),
        started: std::time::Instant::now(),
        listen_addr: String::new(),
        state: Default::default(),
        conns: Default::default(),
        m: Default::default(),
        redis: None,
        replay: std::sync::Mutex::new(super::replay::Signatures::new(1)),
        uploads_seen: Default::default(),
        limits: super::limits::Limits::new(super::limits::Budget::derive(64, 0, 0, 0), false),
        next_id: Default::default(),
        seed: 0,
        stopping: Default::default(),
        stop_tx: tokio::sync::mpsc::channel(1).0,
    });
    let conn = std::sync::Arc::new(super::conn::Conn::new(1, 1));
    let fut = super::ws::session(fake, ws, conn);
    let size = std::mem::size_of_val(&fut);
    eprintln!(
        "session future: {size} bytes (WebSocketStream {}, Sleep {})",
        std::mem::size_of::<super::ws::Ws>(),
        std::mem::size_of::<tokio::time::Sleep>()
    );
    assert!(size < 2048, "{size}");
    drop(fut);
    hub.stop().await;
}

/// Two hubs sharing a real redis-server (skipped when none is installed).
mod redis_bridge;
