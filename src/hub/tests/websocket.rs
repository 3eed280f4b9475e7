//! WebSocket sessions: Pusher protocol, auth, presence, limits of one connection.

use super::*;

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
        Some(crate::hub::ws::ws_config()),
    )
    .await;
    let fake = std::sync::Arc::new(crate::hub::Hub {
        cfg: config(),
        version: String::new(),
        tunables: Tunables::default(),
        started: std::time::Instant::now(),
        listen_addr: String::new(),
        state: Default::default(),
        conns: Default::default(),
        metrics: Default::default(),
        redis: None,
        replay: std::sync::Mutex::new(crate::hub::replay::Signatures::new(1)),
        uploads_seen: Default::default(),
        limits: crate::hub::limits::Limits::new(
            crate::hub::limits::Budget::derive(64, 0, 0, 0),
            false,
        ),
        next_id: Default::default(),
        seed: 0,
        stopping: Default::default(),
        stop_tx: tokio::sync::mpsc::channel(1).0,
    });
    let conn = std::sync::Arc::new(crate::hub::conn::Conn::new(1, 1));
    let fut = crate::hub::ws::session(fake, ws, conn);
    let size = std::mem::size_of_val(&fut);
    eprintln!(
        "session future: {size} bytes (WebSocketStream {}, Sleep {})",
        std::mem::size_of::<crate::hub::ws::Ws>(),
        std::mem::size_of::<tokio::time::Sleep>()
    );
    assert!(size < 2048, "{size}");
    drop(fut);
    hub.stop().await;
}
