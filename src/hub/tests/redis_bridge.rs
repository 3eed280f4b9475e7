//! Two hubs bridged by a real redis-server started on a free port (the tests
//! are skipped, with a message, when `redis-server` is not installed).

use super::*;

struct RedisServer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn redis_binary() -> Option<&'static str> {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

impl RedisServer {
    async fn start(port: u16) -> Option<RedisServer> {
        let bin = redis_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut child = child;
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(RedisServer {
                    child,
                    port,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn bridged(url: &str) -> TestHub {
    let mut cfg = config();
    cfg.redis_url = url.into();
    let tun = Tunables {
        redis_ping_every: Duration::from_millis(200),
        redis_timeout: Duration::from_millis(500),
        ..Tunables::default()
    };
    let hub = start_with(cfg, tun).await;
    hub.wait_redis(1).await;
    hub
}

impl TestHub {
    async fn wait_redis(&self, want: u64) {
        for _ in 0..200 {
            if self.metric("redis_connected").await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis_connected never became {want}");
    }
}

/// Publishes through `hub` until `ws` receives the event (the Redis
/// subscription of the other hub is set up asynchronously).
async fn until_bridged(ing: &mut UnixStream, ws: &mut Client, channel: &str) {
    for i in 0..100 {
        send_ingest(ing, &publish(channel, "probe", &format!("{{\"i\":{i}}}"))).await;
        let got = tokio::time::timeout(Duration::from_millis(100), ws.next()).await;
        if let Ok(Some(Ok(Message::Text(t)))) = got {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["event"] == "probe" {
                // Drain the other probes in flight.
                while let Ok(Some(Ok(_))) =
                    tokio::time::timeout(Duration::from_millis(100), ws.next()).await
                {
                }
                return;
            }
        }
    }
    panic!("events never crossed the bridge");
}

fn report(id: &str, stream: u64, inflight: u64, stored: u64, done: u32) -> IngestMessage {
    IngestMessage::Progress(ProgressReport {
        upload_id: id.into(),
        stream,
        bytes_total: 4000,
        chunk_count: 4,
        stored_bytes: stored,
        chunks_done: done,
        inflight,
    })
}

fn end(id: &str, stream: u64, stored: u64, done: u32) -> IngestMessage {
    IngestMessage::StreamEnd {
        upload_id: id.into(),
        stream,
        outcome: StreamOutcome::Stored,
        stored_bytes: stored,
        chunks_done: done,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_uploads_cross_hosts() {
    let Some(redis) = RedisServer::start(free_port()).await else {
        eprintln!("redis-server not installed: skipped");
        return;
    };
    let a = bridged(&redis.url()).await;
    let b = bridged(&redis.url()).await;
    let mut ing_a = a.ingest().await;
    let mut ing_b = b.ingest().await;

    // A client on B; events published on A reach it.
    let (mut ws, sid) = b.ws().await;
    assert_eq!(
        subscribe(&mut ws, &sid, "news").await["event"],
        "pusher_internal:subscription_succeeded"
    );
    until_bridged(&mut ing_a, &mut ws, "news").await;
    send_ingest(&mut ing_a, &publish("news", "hello", "{\"x\":1}")).await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["event"].as_str(), m["channel"].as_str()),
        (Some("hello"), Some("news"))
    );

    // An upload whose chunks land on both hosts: B's client sees the sum.
    let ch = "private-upload.u1";
    subscribe(&mut ws, &sid, ch).await;
    until_bridged(&mut ing_a, &mut ws, ch).await;
    send_ingest(&mut ing_a, &report("u1", 1, 600, 0, 0)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_ingest(&mut ing_b, &report("u1", 1, 400, 0, 0)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_ingest(&mut ing_a, &end("u1", 1, 1000, 1)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_ingest(&mut ing_b, &report("u1", 1, 900, 1000, 1)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_ingest(&mut ing_b, &end("u1", 1, 2000, 2)).await;
    let mut seen = vec![];
    let mut last = 0;
    for _ in 0..5 {
        let m = recv(&mut ws).await;
        assert_eq!(m["event"], "progress", "{m}");
        let d = data_of(&m);
        let seq = d["seq"].as_u64().unwrap();
        assert!(seq > last);
        last = seq;
        seen.push(d["bytes_done"].as_u64().unwrap());
    }
    assert_eq!(seen, [600, 1000, 1400, 1900, 2000]);
    // progress() on A (no subscriber there) answers the same state.
    let p = query(
        &mut ing_a,
        &IngestMessage::QueryProgress {
            upload_id: "u1".into(),
        },
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&p).unwrap()["bytes_done"],
        2000
    );

    send_ingest(
        &mut ing_a,
        &IngestMessage::Terminal {
            upload_id: "u1".into(),
            event: "complete".into(),
            fields: r#"{"path":"/x"}"#.into(),
        },
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "complete");
    let d = data_of(&m);
    assert_eq!(d["state"], "complete");
    assert_eq!(d["bytes_total"], 4000);
    assert_eq!(d["path"], "/x");
    assert!(d["seq"].as_u64().unwrap() > last);
    // Late reports after the end are dropped everywhere.
    send_ingest(&mut ing_b, &report("u1", 7, 5, 0, 0)).await;

    // A new client on A (which never had a subscriber) replays the latest
    // event kept in Redis.
    let (mut wa, sid_a) = a.ws().await;
    subscribe(&mut wa, &sid_a, ch).await;
    let m = recv(&mut wa).await;
    assert_eq!(m["event"], "complete");
    assert_eq!(data_of(&m)["seq"], d["seq"]);
    drop(wa);

    // Redis restarts: events stay local meanwhile, then cross hosts again.
    let port = redis.port;
    let mut redis = redis;
    redis.kill();
    a.wait_redis(0).await;
    b.wait_redis(0).await;
    assert!(a.metric("redis_errors_total").await >= 1);
    send_ingest(&mut ing_b, &publish("news", "local", "{}")).await;
    assert_eq!(recv(&mut ws).await["event"], "local");
    let redis2 = RedisServer::start(port).await.unwrap();
    a.wait_redis(1).await;
    b.wait_redis(1).await;
    until_bridged(&mut ing_a, &mut ws, "news").await;
    send_ingest(&mut ing_a, &publish("news", "again", "{}")).await;
    assert_eq!(recv(&mut ws).await["event"], "again");

    // Unsubscribing the last local client unsubscribes in Redis.
    ws.close(None).await.unwrap();
    drop(ws);
    let mut numsub = 1;
    for _ in 0..100 {
        let client = ::redis::Client::open(redis2.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let v: Vec<(String, u64)> = ::redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("up:test-app:ev:{news}")
            .query_async(&mut c)
            .await
            .unwrap();
        numsub = v[0].1;
        if numsub == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(numsub, 0);
    a.stop().await;
    b.stop().await;
}

/// `rediss://`: a TLS-only redis-server with a CA made by openssl (skipped
/// when openssl is missing or redis-server was built without TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_bridge() {
    let (Some(bin), true) = (
        redis_binary(),
        std::path::Path::new("/usr/bin/openssl").exists(),
    ) else {
        eprintln!("redis-server or openssl not installed: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ssl = |args: &[&str]| {
        let ok = std::process::Command::new("/usr/bin/openssl")
            .args(args)
            .current_dir(d)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl {args:?}");
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    ]);
    ssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    ssl(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let port = free_port();
    let mut child = std::process::Command::new(bin)
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--tls-cert-file", "srv.crt", "--tls-key-file", "srv.key"])
        .args([
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--save",
            "",
        ])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..60 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !up {
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("redis-server without TLS support: skipped");
        return;
    }
    // rustls-native-certs reads the trusted roots from SSL_CERT_FILE.
    std::env::set_var("SSL_CERT_FILE", d.join("ca.crt"));
    let url = format!("rediss://localhost:{port}");
    let a = bridged(&url).await;
    let b = bridged(&url).await;
    let mut ing_a = a.ingest().await;
    let (mut ws, sid) = b.ws().await;
    subscribe(&mut ws, &sid, "news").await;
    until_bridged(&mut ing_a, &mut ws, "news").await;
    a.stop().await;
    b.stop().await;
    // The upload state of PHP workers over the same URL (the blocking client).
    let state = tokio::task::spawn_blocking(move || {
        use crate::storage::{RedisStateOptions, Store, StoreOptions};
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(StoreOptions {
            root: root.path().join("store"), // created 0700 (a TempDir is 0755)
            default_chunk_size: 2,
            max_upload_size: 0,
            expire_seconds: 60,
        })
        .unwrap()
        .with_redis_state(RedisStateOptions {
            settings: crate::redis_url::parse_redis_url(&url).unwrap(),
            key_prefix: "up:tls:".into(),
            timeout: Duration::from_secs(2),
        });
        let id = store.create(4, None, Default::default(), None).unwrap().id;
        for (i, part) in [&b"ab"[..], &b"cd"[..]].into_iter().enumerate() {
            let mut src = part;
            store
                .write_chunk(&id, i as u64, &mut src, None, &mut |_| {})
                .unwrap();
        }
        let path = store.complete(&id).unwrap().path.unwrap();
        std::fs::read(path).unwrap()
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(state.unwrap(), b"abcd");
}

/// Attacker: a plain request tagged with an Upload's id lands on host B
/// while the Upload's chunks go to host A (or the Upload exists only in the
/// Redis state). Before: B's report went through the Redis script like any
/// other and ended the Upload's channel on every host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_requests_are_refused_for_uploads_of_any_host() {
    let Some(redis) = RedisServer::start(free_port()).await else {
        eprintln!("redis-server not installed: skipped");
        return;
    };
    let a = bridged(&redis.url()).await;
    let b = bridged(&redis.url()).await;
    let mut ing_a = a.ingest().await;
    let mut ing_b = b.ingest().await;
    let (mut ws, sid) = b.ws().await;
    let ch = "private-upload.r1";
    subscribe(&mut ws, &sid, ch).await;
    until_bridged(&mut ing_a, &mut ws, ch).await;

    send_ingest(&mut ing_a, &report("r1", 1, 100, 0, 0)).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "progress");
    let first = data_of(&m)["seq"].as_u64().unwrap();
    let forged = IngestMessage::Terminal {
        upload_id: "r1".into(),
        event: "complete".into(),
        fields: "{}".into(),
    };
    send_ingest(&mut ing_b, &forged.tagged_request()).await;
    send_ingest(&mut ing_b, &report("r1", 9, 4000, 0, 0).tagged_request()).await;
    // Published on the upload channel: delivered, never kept in Redis.
    send_ingest(&mut ing_a, &publish(ch, "note", r#"{"text":"hi"}"#)).await;
    assert_eq!(recv(&mut ws).await["event"], "note");
    send_ingest(&mut ing_a, &report("r1", 1, 200, 0, 0)).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["event"], "progress", "{m}");
    let d = data_of(&m);
    assert_eq!(d["bytes_done"], 200);
    assert!(d["seq"].as_u64().unwrap() > first);
    // B's reports run in B's own queue: not ordered with A's events.
    for _ in 0..100 {
        if b.metric("tagged_refused_total").await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.metric("tagged_refused_total").await, 2);
    // A new subscriber on A replays the real latest event from Redis.
    let (mut wa, sid_a) = a.ws().await;
    subscribe(&mut wa, &sid_a, ch).await;
    let m = recv(&mut wa).await;
    assert_eq!(
        (m["event"].as_str(), data_of(&m)["bytes_done"].as_u64()),
        (Some("progress"), Some(200))
    );

    // An Upload that exists only in the Redis state (created on another
    // host, no chunk yet).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let key = format!(
        "{}upload:{{private-upload.r2}}",
        crate::redis_url::key_prefix(APP)
    );
    redis::cmd("HSET")
        .arg(&key)
        .arg("state")
        .arg("uploading")
        .query::<i64>(&mut c)
        .unwrap();
    let forged = IngestMessage::Terminal {
        upload_id: "r2".into(),
        event: "complete".into(),
        fields: "{}".into(),
    };
    send_ingest(&mut ing_b, &forged.tagged_request()).await;
    for _ in 0..100 {
        if b.metric("tagged_refused_total").await == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.metric("tagged_refused_total").await, 3);
    let p = query(
        &mut ing_a,
        &IngestMessage::QueryProgress {
            upload_id: "r2".into(),
        },
    )
    .await;
    assert_eq!(p, "");
    a.stop().await;
    b.stop().await;
}

/// The channel queries of either hub count the subscribers and presence
/// members of both; terminate_connections asked of one closes the user's
/// connections on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_queries_and_terminate_cover_every_host() {
    let Some(redis) = RedisServer::start(free_port()).await else {
        eprintln!("redis-server not installed: skipped");
        return;
    };
    let a = bridged(&redis.url()).await;
    let b = bridged(&redis.url()).await;
    let (mut wa, sid_a) = a.ws().await;
    let (mut wb, sid_b) = b.ws().await;
    join_presence(&mut wa, &sid_a, "presence-x", "u1").await;
    join_presence(&mut wb, &sid_b, "presence-x", "u2").await;
    let path = format!("/apps/{APP}/channels/presence-x");
    let mut last = Value::Null;
    for _ in 0..100 {
        let now = crate::hub::now_ms() / 1000;
        let req = signed_query(
            "GET",
            &path,
            &[("info", "subscription_count,user_count")],
            now,
        );
        let (s, body) = a.http(req).await;
        assert_eq!(s, 200, "{body}");
        last = serde_json::from_str(&body).unwrap();
        if last["user_count"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        last,
        json!({"occupied": true, "subscription_count": 2, "user_count": 2})
    );
    // Each hub writes its snapshot at most every 50 ms: B may see A's a moment later.
    let users = json!({"users": [{"id": "u1"}, {"id": "u2"}]});
    for _ in 0..100 {
        let now = crate::hub::now_ms() / 1000;
        let (s, body) = b
            .http(signed_query("GET", &format!("{path}/users"), &[], now))
            .await;
        assert_eq!(s, 200);
        last = serde_json::from_str(&body).unwrap();
        if last == users {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last, users);
    let now = crate::hub::now_ms() / 1000;
    let term = format!("/apps/{APP}/users/u2/terminate_connections");
    let (s, _) = a.http(signed("POST", &term, "{}", now, SECRET)).await;
    assert_eq!(s, 200);
    assert_eq!(close_code(&mut wb).await, Some(4009));
    assert_alive(&mut wa).await;
    a.stop().await;
    b.stop().await;
}
