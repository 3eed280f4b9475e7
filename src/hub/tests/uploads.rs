//! Upload events: aggregation of reports, tagged requests, published events on upload channels.

use super::*;

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
    let now = crate::hub::now_ms() / 1000;
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
