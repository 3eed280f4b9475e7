//! The hub: one long-lived process per host that speaks Pusher protocol 7 to
//! browsers, accepts the Pusher HTTP events API, reads events from PHP
//! processes on the ingest socket and keeps the latest event of each channel.
//!
//! This module is wiring only (`run`, `serve`, shutdown); docs/architecture.md
//! lists the modules and follows one event through them: `ingest.rs` and
//! `http/` make typed events (`event.rs`), `router.rs` routes them to this
//! host (`state.rs`: `channels.rs`, `uploads.rs`) or through Redis (`redis/`),
//! `ws.rs` writes the frames to the clients.
//!
//! Error codes sent to WebSocket clients (`pusher:error` data `{"code","message"}`):
//! 4000 malformed message / unsupported event (connection kept), 4001 unknown app
//! key (closed), 4007 unsupported protocol version (closed), 4300 message too
//! large (closed with 1009), 4100 over capacity or slow consumer (closed),
//! 4200 hub restart, reconnect now (close frame only), 4201 pong timeout
//! (closed), 4301 client events are refused (connection kept).

mod accept;
mod channels;
mod conn;
mod event;
mod frames;
mod http;
mod ingest;
mod lifecycle;
mod limits;
mod log;
mod metrics;
mod redis;
mod replay;
mod router;
mod shared;
mod state;
mod tunables;
mod uploads;
mod ws;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use conn::Conn;
pub(crate) use log::{log, now_ms, now_us, RateLog};
pub(crate) use metrics::Metrics;
pub(crate) use shared::{lock, Hub};
use state::State;
pub(crate) use tunables::Tunables;

/// What `run` needs; the lead binds the ingest socket (binding it is the lock).
pub struct HubOptions {
    /// `listen`, `app_id`, `app_key`, `app_secret`, `allowed_origins`,
    /// `activity_timeout` and `max_connections` are used.
    pub config: Config,
    /// Extension version; a Hello frame with another version makes this hub hand over.
    pub version: String,
    /// Already bound and listening (may be abstract).
    pub ingest: std::os::unix::net::UnixListener,
    /// Exit when this process exits.
    pub watch_pid: Option<i32>,
}

/// Runs the hub in this thread until SIGTERM/SIGINT, the watched process
/// exits, or a hub of another version takes over; then closes every
/// WebSocket with 4200 (clients reconnect at once) and returns Ok.
pub fn run(opts: HubOptions) -> Result<(), String> {
    // Writing to a socket the peer closed must be an error, never a fatal SIGPIPE
    // (the host process is the PHP CLI, which keeps the default disposition).
    // SAFETY: setting a signal disposition to SIG_IGN is async-signal-safe and
    // affects only this process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("upload-progress-hub")
        .build()
        .map_err(|e| format!("cannot start the hub runtime: {e}"))?;
    // A hub under FPM inherits its soft limit (1024 under systemd, 64 seen in
    // the wild); every WebSocket costs a descriptor.
    let fds = limits::raise_fd_limit();
    log(format_args!("descriptor limit {fds}"));
    let res = rt.block_on(async {
        let stop = lifecycle::signals();
        serve(opts, None, Tunables::default(), stop).await
    });
    rt.shutdown_timeout(Duration::from_millis(300));
    res
}

/// Serves until `stop` resolves, the watched pid exits or a hand-over is
/// requested. `listener`: an already bound TCP listener (tests), else
/// `config.listen` is bound here.
pub(crate) async fn serve(
    opts: HubOptions,
    listener: Option<std::net::TcpListener>,
    tun: Tunables,
    stop: impl Future<Output = String> + Send,
) -> Result<(), String> {
    let HubOptions {
        config,
        version,
        ingest,
        watch_pid,
    } = opts;
    let mut tun = tun;
    if config.handshake_timeout > 0 {
        tun.handshake_timeout = Duration::from_secs(config.handshake_timeout.min(3600));
    }
    let budget = limits::Budget::derive(
        tun.fd_limit.unwrap_or_else(limits::fd_limit),
        config.max_connections,
        config.max_pending_handshakes,
        config.max_connections_per_ip,
    );
    let tcp = match listener {
        Some(l) => {
            l.set_nonblocking(true)
                .map_err(|e| format!("cannot use the listen socket: {e}"))?;
            tokio::net::TcpListener::from_std(l)
                .map_err(|e| format!("cannot use the listen socket: {e}"))?
        }
        None => tokio::net::TcpListener::bind(config.listen.as_str())
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?,
    };
    let listen_addr = tcp
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.listen.clone());
    ingest
        .set_nonblocking(true)
        .map_err(|e| format!("cannot use the ingest socket: {e}"))?;
    let ingest = tokio::net::UnixListener::from_std(ingest)
        .map_err(|e| format!("cannot use the ingest socket: {e}"))?;

    let (stop_tx, mut stop_rx) = mpsc::channel::<String>(4);
    let seed = shared::random_seed();
    let bridge = if config.redis_url.trim().is_empty() {
        None
    } else {
        match redis::parse_redis_url(&config.redis_url) {
            Ok(settings) => Some(Arc::new(redis::Bridge::new(
                settings,
                &config.app_id,
                config.expire_seconds,
                format!("{:016x}", shared::splitmix64(seed ^ 0x5eed)),
                tun.redis_ping_every,
                tun.redis_timeout,
            ))),
            Err(e) => {
                log(format_args!("{e}: running as a single host"));
                None
            }
        }
    };
    let count_loopback = tun.count_loopback_per_ip;
    let hub = Arc::new(Hub {
        cfg: config,
        version,
        tunables: tun,
        started: Instant::now(),
        listen_addr,
        state: Mutex::new(State::default()),
        conns: Mutex::new(HashMap::new()),
        metrics: Metrics::default(),
        redis: bridge,
        replay: Mutex::new(replay::Signatures::new(http::MAX_SIGNATURES)),
        uploads_seen: Mutex::new(std::collections::HashSet::new()),
        limits: limits::Limits::new(budget, count_loopback),
        next_id: AtomicU64::new(1),
        seed,
        stopping: AtomicBool::new(false),
        stop_tx,
    });
    let b = hub.limits.budget;
    log(format_args!(
        "version {} started, listening on {} (app id {:?}, activity_timeout {} s; {} descriptors: {} kept in reserve, {} TCP clients, max_connections {}, max_pending_handshakes {}, max_connections_per_ip {})",
        hub.version,
        hub.listen_addr,
        hub.cfg.app_id,
        hub.cfg.activity_timeout,
        b.fd_limit,
        b.reserve,
        b.tcp,
        b.websockets,
        b.pending,
        b.per_ip
    ));

    let (down_tx, down_rx) = watch::channel(false);
    let tcp_task = tokio::spawn(http::accept_loop(hub.clone(), tcp, down_rx.clone()));
    let ingest_task = tokio::spawn(ingest::accept_loop(hub.clone(), ingest, down_rx.clone()));
    let redis_tasks = redis::start(&hub, down_rx.clone());
    let sweeper = tokio::spawn(sweep_loop(hub.clone(), down_rx));

    let reason = tokio::select! {
        r = stop => r,
        r = stop_rx.recv() => r.unwrap_or_else(|| "stop requested".to_string()),
        r = lifecycle::watch(watch_pid) => r,
    };
    log(format_args!("shutting down: {reason}"));
    let mut tasks = vec![tcp_task, ingest_task, sweeper];
    tasks.extend(redis_tasks);
    shutdown(&hub, down_tx, tasks).await;
    log(format_args!("stopped"));
    Ok(())
}

async fn shutdown(
    hub: &Arc<Hub>,
    down_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    hub.stopping.store(true, Ordering::SeqCst);
    let _ = down_tx.send(true);
    // The listeners close first, so that a new hub can bind at once.
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_millis(500), t).await;
    }
    let conns: Vec<Arc<Conn>> = lock(&hub.conns).values().cloned().collect();
    let n = conns.len();
    if n > 0 {
        log(format_args!("closing {n} connections with 4200"));
        // Spread the reconnects: Pusher clients reconnect at once on 4200.
        let steps = 20usize;
        let per_step = n.div_ceil(steps);
        let pause = hub.tunables.close_spread / steps as u32;
        for (i, batch) in conns.chunks(per_step.max(1)).enumerate() {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            for c in batch {
                c.close(4200, "Hub restarting, reconnect now");
            }
        }
    }
    let deadline = Instant::now() + Duration::from_millis(800);
    while Metrics::get(&hub.metrics.connections) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn sweep_loop(hub: Arc<Hub>, mut down: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(hub.tunables.sweep_every) => {}
            _ = down.changed() => return,
        }
        let mut state = lock(&hub.state);
        state.sweep(hub.tunables.retention);
    }
}
