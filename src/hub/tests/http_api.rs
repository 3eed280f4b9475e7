//! The HTTP API: events, replay refusal, channel queries, health and metrics.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_api() {
    let hub = start().await;
    let (mut ws, sid) = hub.ws().await;
    subscribe(&mut ws, &sid, "api-ch").await;
    let now = crate::hub::now_ms() / 1000;
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
    let now = crate::hub::now_ms() / 1000;
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

/// The Pusher channel queries and terminate_connections on one hub; a GET
/// query may be repeated with the same signature (idempotent), a POST not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_queries_and_terminate_connections() {
    let hub = start().await;
    let (mut a, sid_a) = hub.ws().await;
    let (mut b, sid_b) = hub.ws().await;
    let (mut c, sid_c) = hub.ws().await;
    join_presence(&mut a, &sid_a, "presence-room", "u1").await;
    join_presence(&mut b, &sid_b, "presence-room", "u2").await;
    assert_eq!(recv(&mut a).await["event"], "pusher_internal:member_added");
    subscribe(&mut c, &sid_c, "news").await;
    let now = crate::hub::now_ms() / 1000;
    let base = format!("/apps/{APP}");
    let get = |path: String, extra: Vec<(&'static str, &'static str)>| {
        let req = signed_query("GET", &path, &extra, now);
        let hub = &hub;
        async move {
            let (status, body) = hub.http(req).await;
            (status, serde_json::from_str::<Value>(&body).unwrap())
        }
    };
    let (s, v) = get(format!("{base}/channels"), vec![]).await;
    assert_eq!(
        (s, v),
        (200, json!({"channels": {"presence-room": {}, "news": {}}}))
    );
    let (s, v) = get(
        format!("{base}/channels"),
        vec![("filter_by_prefix", "presence-"), ("info", "user_count")],
    )
    .await;
    assert_eq!(
        (s, v),
        (
            200,
            json!({"channels": {"presence-room": {"user_count": 2}}})
        )
    );
    // The same signed query again: answered (replay refusal is for POST only).
    let (s, _) = get(
        format!("{base}/channels"),
        vec![("filter_by_prefix", "presence-"), ("info", "user_count")],
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = get(format!("{base}/channels"), vec![("info", "user_count")]).await;
    assert_eq!(s, 400);
    let (s, v) = get(
        format!("{base}/channels/presence-room"),
        vec![("info", "subscription_count,user_count")],
    )
    .await;
    assert_eq!(
        (s, v),
        (
            200,
            json!({"occupied": true, "subscription_count": 2, "user_count": 2})
        )
    );
    let (s, v) = get(format!("{base}/channels/nobody-here"), vec![]).await;
    assert_eq!((s, v), (200, json!({"occupied": false})));
    let (s, _) = get(
        format!("{base}/channels/news"),
        vec![("info", "user_count")],
    )
    .await;
    assert_eq!(s, 400);
    let (s, v) = get(format!("{base}/channels/presence-room/users"), vec![]).await;
    assert_eq!(
        (s, v),
        (200, json!({"users": [{"id": "u1"}, {"id": "u2"}]}))
    );
    let (s, _) = get(format!("{base}/channels/news/users"), vec![]).await;
    assert_eq!(s, 400);
    // terminate_connections: u1's connection is closed, u2 sees u1 leave.
    let path = format!("{base}/users/u1/terminate_connections");
    let (s, body) = hub.http(signed("POST", &path, "{}", now, SECRET)).await;
    assert_eq!((s, body.as_str()), (200, "{}"));
    assert_eq!(close_code(&mut a).await, Some(4009));
    let m = recv(&mut b).await;
    assert_eq!(m["event"], "pusher_internal:member_removed");
    assert_eq!(data_of(&m)["user_id"], "u1");
    let (s, _) = hub.http(signed("POST", &path, "{}", now, SECRET)).await;
    assert_eq!(s, 401, "a POST signature is accepted once");
    let (s, _) = hub.http(signed_query("DELETE", &path, &[], now)).await;
    assert_eq!(s, 405);
    assert_alive(&mut b).await;
    hub.stop().await;
}
