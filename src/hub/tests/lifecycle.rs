//! Stopping: hand-over, stop, the watched process.

use super::*;

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
