//! Descriptor budget: idle floods and per-address caps.

use super::*;

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
