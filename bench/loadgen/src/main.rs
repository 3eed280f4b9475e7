//! Load client for the upload_progress benchmarks (Pusher protocol 7 over WebSocket).
//!
//! Opens N connections to `--url` (spread over source addresses 127.0.0.2, .3, …),
//! waits for `pusher:connection_established`, subscribes to `--channel` and waits for
//! `pusher_internal:subscription_succeeded`, then prints `READY <ok> <failed>` on
//! stdout. It then obeys commands on stdin:
//!
//!   COLLECT <events> <timeout_s>  wait until every connection got <events> bench events
//!                                 (or the timeout), print latency stats as JSON.
//!   ARM <index> <timeout_s>       storm mode: every connection reconnects (after a
//!                                 random delay of 0..--jitter-ms) when its connection
//!                                 drops; wait until every connection has received an
//!                                 event with I >= <index> after reconnecting; print the
//!                                 timestamps (CLOCK_MONOTONIC ns) as JSON.
//!   QUIT                          exit.
//!
//! Events carry their send time in their data as `T=<CLOCK_MONOTONIC ns>;I=<index>;…`
//! (PHP `hrtime(true)` is CLOCK_MONOTONIC on Linux); latency = receive time - T.

use futures_util::{SinkExt, StreamExt};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Clone)]
struct Opts {
    url: String,
    host: SocketAddr,
    path: String,
    n: usize,
    channel: String,
    per_source: usize,
    concurrency: usize,
    jitter_ms: u64,
}

fn parse_args() -> Opts {
    let mut url = String::new();
    let mut n = 1usize;
    let mut channel = "bench".to_string();
    let mut per_source = 2000usize;
    let mut concurrency = 256usize;
    let mut jitter_ms = 1000u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().expect("missing value");
        match a.as_str() {
            "--url" => url = v(),
            "--n" => n = v().parse().unwrap(),
            "--channel" => channel = v(),
            "--per-source" => per_source = v().parse().unwrap(),
            "--concurrency" => concurrency = v().parse().unwrap(),
            "--jitter-ms" => jitter_ms = v().parse().unwrap(),
            _ => panic!("unknown argument {a}"),
        }
    }
    let rest = url.strip_prefix("ws://").expect("--url ws://host:port/path");
    let (hp, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host: SocketAddr = hp.parse().expect("host:port with a numeric IPv4 address");
    Opts {
        url: url.clone(),
        host,
        path: if path.is_empty() { "/".into() } else { path.into() },
        n,
        channel,
        per_source,
        concurrency,
        jitter_ms,
    }
}

type Ws = WebSocketStream<TcpStream>;

fn source_addr(i: usize, per_source: usize) -> Ipv4Addr {
    let k = 2 + i / per_source; // 127.0.0.2, .3, …
    Ipv4Addr::new(127, 0, (k / 256) as u8, (k % 256) as u8)
}

struct Shared {
    o: Opts,
    deliveries: AtomicUsize,
    lat: Mutex<Vec<u64>>,
    /// storm mode
    armed: AtomicBool,
    target: AtomicU64,
    done: AtomicUsize,
    reconnect_attempts: AtomicUsize,
    reconnect_failures: AtomicUsize,
    /// per connection: (reconnected, subscribed, got target) CLOCK_MONOTONIC ns
    storm: Mutex<Vec<(u64, u64, u64)>>,
    drops: AtomicUsize,
}

async fn open(sh: &Shared, idx: usize) -> Result<Ws, String> {
    let o = &sh.o;
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(source_addr(idx, o.per_source).into(), 0))
        .map_err(|e| format!("bind: {e}"))?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), sock.connect(o.host))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20));
    let url = format!("ws://{}{}", o.host, o.path);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_tungstenite::client_async_with_config(url, tcp, Some(cfg)),
    )
    .await
    .map_err(|_| "handshake timeout".to_string())?
    .map_err(|e| format!("handshake: {e}"))?;
    // connection_established
    wait_for(&mut ws, "pusher:connection_established").await?;
    let sub = format!(
        "{{\"event\":\"pusher:subscribe\",\"data\":{{\"channel\":\"{}\"}}}}",
        o.channel
    );
    ws.send(Message::text(sub)).await.map_err(|e| e.to_string())?;
    Ok(ws)
}

async fn wait_for(ws: &mut Ws, event: &str) -> Result<(), String> {
    let needle = format!("\"event\":\"{event}\"");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .map_err(|_| format!("timeout waiting for {event}"))?;
        match m {
            Some(Ok(Message::Text(t))) => {
                if t.as_str().contains(&needle) {
                    return Ok(());
                }
                if t.as_str().contains("pusher:error") {
                    return Err(format!("pusher:error {}", t.as_str()));
                }
            }
            Some(Ok(Message::Close(c))) => return Err(format!("closed {c:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("eof".into()),
        }
    }
}

/// `T=<ns>;I=<i>` inside the text of an event.
fn parse_ti(t: &str) -> Option<(u64, u64)> {
    let p = t.find("T=")?;
    let rest = &t[p + 2..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let ts: u64 = rest[..end].parse().ok()?;
    let q = rest.find("I=")?;
    let r2 = &rest[q + 2..];
    let e2 = r2.find(|c: char| !c.is_ascii_digit()).unwrap_or(r2.len());
    let i: u64 = r2[..e2].parse().ok()?;
    Some((ts, i))
}

enum Ended {
    Dropped,
}

/// Reads one connection until it drops. Records latencies; in storm mode marks
/// subscription and receipt of the target event.
async fn read_loop(sh: &Shared, slot: usize, ws: &mut Ws, after_reconnect: bool) -> Ended {
    let mut subscribed = false;
    loop {
        let m = ws.next().await;
        let now = mono_ns();
        match m {
            Some(Ok(Message::Text(t))) => {
                let s = t.as_str();
                if s.contains("\"event\":\"pusher:ping\"") {
                    let _ = ws
                        .send(Message::text("{\"event\":\"pusher:pong\",\"data\":{}}"))
                        .await;
                    continue;
                }
                if s.contains("pusher_internal:subscription_succeeded") {
                    subscribed = true;
                    if after_reconnect {
                        let mut st = sh.storm.lock().unwrap();
                        if st[slot].1 == 0 {
                            st[slot].1 = now;
                        }
                    }
                    continue;
                }
                if s.contains("\"event\":\"pusher") {
                    continue;
                }
                if let Some((ts, i)) = parse_ti(s) {
                    if sh.armed.load(Ordering::Relaxed) {
                        if i >= sh.target.load(Ordering::Relaxed) {
                            let mut st = sh.storm.lock().unwrap();
                            if st[slot].2 == 0 && after_reconnect {
                                st[slot].2 = now;
                                drop(st);
                                sh.done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else {
                        sh.lat.lock().unwrap().push(now.saturating_sub(ts));
                        sh.deliveries.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = subscribed;
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ended::Dropped,
            Some(Ok(_)) => {}
        }
    }
}

async fn conn_task(sh: Arc<Shared>, slot: usize, ws: Ws, _ready: ()) {
    let mut ws = ws;
    let mut after_reconnect = false;
    loop {
        let Ended::Dropped = read_loop(&sh, slot, &mut ws, after_reconnect).await;
        sh.drops.fetch_add(1, Ordering::Relaxed);
        if !sh.armed.load(Ordering::Relaxed) {
            return;
        }
        // reconnect with jitter, retry until it works
        let j = if sh.o.jitter_ms > 0 { fastrand::u64(0..sh.o.jitter_ms) } else { 0 };
        tokio::time::sleep(Duration::from_millis(j)).await;
        loop {
            sh.reconnect_attempts.fetch_add(1, Ordering::Relaxed);
            match open_and_mark(&sh, slot).await {
                Ok(w) => {
                    ws = w;
                    after_reconnect = true;
                    break;
                }
                Err(_) => {
                    sh.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(0..300))).await;
                }
            }
        }
    }
}

async fn open_and_mark(sh: &Shared, slot: usize) -> Result<Ws, String> {
    // handshake done = reconnected; record when connection_established arrives
    let ws = open(sh, slot).await?;
    let now = mono_ns();
    let mut st = sh.storm.lock().unwrap();
    st[slot].0 = now;
    Ok(ws)
}

fn pct(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn main() {
    let o = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(o));
}

async fn run(o: Opts) {
    let n = o.n;
    let sh = Arc::new(Shared {
        o: o.clone(),
        deliveries: AtomicUsize::new(0),
        lat: Mutex::new(Vec::new()),
        armed: AtomicBool::new(false),
        target: AtomicU64::new(u64::MAX),
        done: AtomicUsize::new(0),
        reconnect_attempts: AtomicUsize::new(0),
        reconnect_failures: AtomicUsize::new(0),
        storm: Mutex::new(vec![(0, 0, 0); n]),
        drops: AtomicUsize::new(0),
    });
    let _ = &o.url;
    let t0 = mono_ns();
    let sem = Arc::new(Semaphore::new(o.concurrency));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_err = Arc::new(Mutex::new(None::<String>));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let sh = sh.clone();
        let sem = sem.clone();
        let ok = ok.clone();
        let failed = failed.clone();
        let first_err = first_err.clone();
        handles.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await.unwrap();
            let r = async {
                let mut ws = open(&sh, i).await?;
                wait_for(&mut ws, "pusher_internal:subscription_succeeded").await?;
                Ok::<Ws, String>(ws)
            }
            .await;
            drop(permit);
            match r {
                Ok(ws) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    Some(ws)
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_err.lock().unwrap().get_or_insert(e);
                    None
                }
            }
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for (i, h) in handles.into_iter().enumerate() {
        if let Some(ws) = h.await.unwrap() {
            conns.push((i, ws));
        }
    }
    let connect_ms = (mono_ns() - t0) as f64 / 1e6;
    let n_ok = conns.len();
    for (i, ws) in conns {
        tokio::spawn(conn_task(sh.clone(), i, ws, ()));
    }
    println!(
        "READY {} {} {:.1} {}",
        n_ok,
        failed.load(Ordering::Relaxed),
        connect_ms,
        first_err.lock().unwrap().clone().unwrap_or_default().replace(' ', "_")
    );

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.first().copied() {
            Some("COLLECT") => {
                let events: usize = w[1].parse().unwrap();
                let timeout: f64 = w[2].parse().unwrap();
                let want = events * n_ok;
                let deadline = mono_ns() + (timeout * 1e9) as u64;
                while sh.deliveries.load(Ordering::Relaxed) < want && mono_ns() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let mut v = std::mem::take(&mut *sh.lat.lock().unwrap());
                sh.deliveries.store(0, Ordering::Relaxed);
                v.sort_unstable();
                println!(
                    "{{\"connections\":{},\"expected\":{},\"deliveries\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"min_us\":{:.1},\"drops\":{}}}",
                    n_ok,
                    want,
                    v.len(),
                    pct(&v, 0.5) as f64 / 1e3,
                    pct(&v, 0.99) as f64 / 1e3,
                    v.last().copied().unwrap_or(0) as f64 / 1e3,
                    v.first().copied().unwrap_or(0) as f64 / 1e3,
                    sh.drops.load(Ordering::Relaxed)
                );
            }
            Some("ARM") => {
                let idx: u64 = w[1].parse().unwrap();
                sh.target.store(idx, Ordering::Relaxed);
                sh.armed.store(true, Ordering::Relaxed);
                println!("ARMED");
            }
            Some("WAIT") => {
                let timeout: f64 = w[1].parse().unwrap();
                let deadline = mono_ns() + (timeout * 1e9) as u64;
                while sh.done.load(Ordering::Relaxed) < n_ok && mono_ns() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let st = sh.storm.lock().unwrap().clone();
                let mut rec: Vec<u64> = st.iter().map(|x| x.0).filter(|&x| x > 0).collect();
                let mut sub: Vec<u64> = st.iter().map(|x| x.1).filter(|&x| x > 0).collect();
                let mut got: Vec<u64> = st.iter().map(|x| x.2).filter(|&x| x > 0).collect();
                rec.sort_unstable();
                sub.sort_unstable();
                got.sort_unstable();
                println!(
                    "{{\"connections\":{},\"reconnected\":{},\"resubscribed\":{},\"got_latest\":{},\"reconnected_p50_ns\":{},\"reconnected_max_ns\":{},\"subscribed_p50_ns\":{},\"subscribed_max_ns\":{},\"got_p50_ns\":{},\"got_p99_ns\":{},\"got_max_ns\":{},\"attempts\":{},\"failures\":{},\"drops\":{}}}",
                    n_ok,
                    rec.len(),
                    sub.len(),
                    got.len(),
                    pct(&rec, 0.5),
                    rec.last().copied().unwrap_or(0),
                    pct(&sub, 0.5),
                    sub.last().copied().unwrap_or(0),
                    pct(&got, 0.5),
                    pct(&got, 0.99),
                    got.last().copied().unwrap_or(0),
                    sh.reconnect_attempts.load(Ordering::Relaxed),
                    sh.reconnect_failures.load(Ordering::Relaxed),
                    sh.drops.load(Ordering::Relaxed)
                );
            }
            Some("QUIT") | None => break,
            _ => {}
        }
    }
    std::process::exit(0);
}
