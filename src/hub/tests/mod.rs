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
        let s = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let text = exchange(s, req.as_bytes()).await;
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
        let s = sock
            .connect(format!("127.0.0.1:{}", self.port).parse().unwrap())
            .await
            .unwrap();
        let text = exchange(s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
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

/// A signed events API request (Pusher request signing).
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

/// A signed API request with extra query parameters (sorted into the signed
/// string, as the SDKs do) and an empty body.
fn signed_query(method: &str, path: &str, extra: &[(&str, &str)], ts: u64) -> String {
    let mut params: Vec<(String, String)> = vec![
        ("auth_key".into(), KEY.into()),
        ("auth_timestamp".into(), ts.to_string()),
        ("auth_version".into(), "1.0".into()),
    ];
    params.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    params.sort();
    let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let q = q.join("&");
    let sig = pusher::sign(SECRET, &format!("{method}\n{path}\n{q}"));
    format!(
        "{method} {path}?{q}&auth_signature={sig} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Subscribes `ws` to presence channel `channel` as `user_id`; returns the
/// subscription_succeeded data.
async fn join_presence(ws: &mut Client, sid: &str, channel: &str, user_id: &str) -> Value {
    let cd = json!({ "user_id": user_id, "user_info": { "name": user_id } }).to_string();
    let auth = pusher::channel_auth(KEY, SECRET, sid, channel, Some(&cd)).unwrap();
    let auth: Value = serde_json::from_str(&auth).unwrap();
    send_json(
        ws,
        json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth["auth"],"channel_data":cd}}),
    )
    .await;
    let m = recv(ws).await;
    assert_eq!(m["event"], "pusher_internal:subscription_succeeded", "{m}");
    data_of(&m)
}

mod http_api;
mod lifecycle;
mod limits;
mod redis_bridge;
mod uploads;
mod websocket;

/// Sends one raw HTTP request and reads the whole answer (the hub closes after it).
async fn exchange(mut s: TcpStream, req: &[u8]) -> String {
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).to_string()
}
