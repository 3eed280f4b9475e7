//! The hub: one long-lived process per host that speaks Pusher protocol 7 to
//! browsers, accepts the Pusher HTTP events API, reads events from PHP
//! processes on the ingest socket and keeps the latest event of each channel.
//!
//! Layout:
//! - `mod.rs`: options, `run`, the serve loop, shutdown and the watched pid;
//! - `state.rs`: channels, subscribers, fan-out, latest events, upload aggregation;
//! - `http.rs`: the HTTP request head, routing, events API, `/health`, `/metrics`;
//! - `ws.rs`: one task per WebSocket connection (Pusher protocol);
//! - `ingest.rs`: the Unix socket PHP processes write to;
//! - `redis.rs`: the bridge between the hubs of several hosts (`redis_url`).
//!
//! Error codes sent to WebSocket clients (`pusher:error` data `{"code","message"}`):
//! 4000 malformed message / unsupported event (connection kept), 4001 unknown app
//! key (closed), 4007 unsupported protocol version (closed), 4300 message too
//! large (closed with 1009), 4100 over capacity or slow consumer (closed),
//! 4200 hub restart, reconnect now (close frame only), 4201 pong timeout
//! (closed), 4301 client events are refused (connection kept).

mod http;
mod ingest;
mod limits;
mod redis;
mod replay;
mod state;
mod ws;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use state::{Conn, State};

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
        let stop = signals();
        serve(opts, None, Tunables::default(), stop).await
    });
    rt.shutdown_timeout(Duration::from_millis(300));
    res
}

/// Resolves with the name of the first SIGTERM or SIGINT received.
fn signals() -> impl Future<Output = String> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => tokio::select! {
                _ = t.recv() => "SIGTERM".to_string(),
                _ = i.recv() => "SIGINT".to_string(),
            },
            (Ok(mut t), Err(e)) | (Err(e), Ok(mut t)) => {
                log(format_args!("cannot install a signal handler: {e}"));
                t.recv().await;
                "signal".to_string()
            }
            (Err(e), Err(_)) => {
                log(format_args!("cannot install signal handlers: {e}"));
                std::future::pending().await
            }
        }
    }
}

/// Upload ids remembered by `Hub::note_upload`.
const MAX_UPLOADS_SEEN: usize = 100_000;

/// Knobs that tests turn down; production uses `Tunables::default()`.
#[derive(Debug, Clone)]
pub(crate) struct Tunables {
    /// Messages queued per connection before it counts as a slow consumer.
    pub queue_cap: usize,
    /// How long a `pusher:ping` may stay unanswered.
    pub pong_timeout: Duration,
    /// How long one write to a client may block.
    pub write_timeout: Duration,
    /// Deadline for the HTTP request head (and body) of a new connection.
    pub handshake_timeout: Duration,
    /// How long the latest event of a channel without subscribers is kept.
    pub retention: Duration,
    /// Period of the sweeper.
    pub sweep_every: Duration,
    /// Closing all connections at shutdown is spread over this long.
    pub close_spread: Duration,
    /// Period of the PING that detects a dead Redis connection.
    pub redis_ping_every: Duration,
    /// Deadline of one Redis command (and of a connect, twice this).
    pub redis_timeout: Duration,
    /// The descriptor limit to plan with (None: the process's soft limit).
    pub fd_limit: Option<u64>,
    /// Count loopback clients per address too (tests; in production loopback
    /// is a proxy on the host).
    pub count_loopback_per_ip: bool,
}

impl Default for Tunables {
    fn default() -> Self {
        Tunables {
            queue_cap: 128,
            pong_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            retention: Duration::from_secs(3600),
            sweep_every: Duration::from_secs(30),
            close_spread: Duration::from_millis(1000),
            redis_ping_every: Duration::from_secs(1),
            redis_timeout: Duration::from_secs(2),
            fd_limit: None,
            count_loopback_per_ip: false,
        }
    }
}

/// Counters behind `/metrics` and `QueryStatus`.
#[derive(Default)]
pub(crate) struct Metrics {
    pub connections: AtomicU64,
    pub events_in: AtomicU64,
    pub events_out: AtomicU64,
    pub events_dropped: AtomicU64,
    pub evictions: AtomicU64,
    pub ingest_connections: AtomicU64,
    pub ingest_errors: AtomicU64,
    /// Body reports of plain tagged requests for an id that is an Upload.
    pub tagged_refused: AtomicU64,
    /// TCP connections closed at accept (no descriptor to spare, per-address cap).
    pub tcp_refused: AtomicU64,
    /// Pending connections closed to make room for newer ones.
    pub pending_evicted: AtomicU64,
    /// Published events refused on upload channels (reserved name or a seq).
    pub published_refused: AtomicU64,
}

impl Metrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Everything the tasks of one hub share.
pub(crate) struct Hub {
    pub cfg: Config,
    pub version: String,
    pub tun: Tunables,
    pub started: Instant,
    /// The address actually bound (the port is known even when `listen` says 0).
    pub listen_addr: String,
    pub state: Mutex<State>,
    pub conns: Mutex<HashMap<u64, Arc<Conn>>>,
    pub m: Metrics,
    /// The Redis bridge, when `redis_url` is set (and valid).
    pub redis: Option<Arc<redis::Bridge>>,
    /// Events API signatures already accepted.
    pub replay: Mutex<replay::Signatures>,
    /// Ids this hub saw Upload reports for (bounded; the storage directory
    /// and the Redis state are the durable answer).
    pub uploads_seen: Mutex<std::collections::HashSet<Box<str>>>,
    /// The descriptor budget of TCP clients.
    pub limits: Arc<limits::Limits>,
    next_id: AtomicU64,
    seed: u64,
    pub stopping: AtomicBool,
    stop_tx: mpsc::Sender<String>,
}

/// Locks a mutex, ignoring poisoning (no code panics while holding one, and a
/// hub that keeps serving is better than one that dies).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// Asks the serve loop to stop (hand-over).
    pub fn request_stop(&self, reason: String) {
        let _ = self.stop_tx.try_send(reason);
    }

    /// A fresh connection id and the random half of its socket id.
    pub fn new_conn_ids(&self) -> (u64, u32) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let r = splitmix64(self.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        (id, (r % 1_000_000_000) as u32)
    }

    /// Remembers that `id` is an Upload (its reports come from `Upload`).
    pub fn note_upload(&self, id: &str) {
        let mut seen = lock(&self.uploads_seen);
        if seen.contains(id) {
            return;
        }
        if seen.len() >= MAX_UPLOADS_SEEN {
            // Forgetting is safe: the storage directory still answers.
            seen.clear();
        }
        seen.insert(id.into());
    }

    /// True when `id` is an Upload: its reports came here, its directory is in
    /// storage_dir (the Redis script checks the Redis state).
    pub fn is_upload(&self, id: &str) -> bool {
        if lock(&self.uploads_seen).contains(id) {
            return true;
        }
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return false;
        }
        std::fs::symlink_metadata(self.cfg.storage_dir.join(id)).is_ok_and(|m| m.is_dir())
    }

    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// `QueryStatus` answer.
    pub fn status_json(&self) -> String {
        let (channels, subscriptions) = {
            let st = lock(&self.state);
            (st.channel_count(), st.subscriptions)
        };
        serde_json::json!({
            "running": true,
            "pid": std::process::id(),
            "listen": self.listen_addr,
            "connections": Metrics::get(&self.m.connections),
            "channels": channels,
            "subscriptions": subscriptions,
            "uptime_s": self.uptime_s(),
            "version": self.version,
            "events_in": Metrics::get(&self.m.events_in),
            "events_out": Metrics::get(&self.m.events_out),
            "events_dropped": Metrics::get(&self.m.events_dropped),
            "slow_consumer_evictions": Metrics::get(&self.m.evictions),
            "redis": self.redis.as_ref().map(|b| serde_json::json!({
                "connected": b.connected.load(Ordering::Relaxed),
                "hub_id": b.id,
                "errors": Metrics::get(&b.errors),
            })),
        })
        .to_string()
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_ok() {
        u64::from_le_bytes(b)
    } else {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        splitmix64(t ^ u64::from(std::process::id()))
    }
}

/// After a failed accept(): logs at most every 10 s and says how long to
/// pause. EMFILE/ENFILE/ENOBUFS/ENOMEM leave the connection in the backlog,
/// so retrying at once would spin.
pub(crate) fn accept_failed(
    what: &str,
    e: &std::io::Error,
    last_log: &mut Option<std::time::Instant>,
) -> std::time::Duration {
    if last_log.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(10)) {
        log(format_args!("{what} failed: {e}"));
        *last_log = Some(std::time::Instant::now());
    }
    let resource = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    std::time::Duration::from_millis(if resource { 100 } else { 5 })
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix time in microseconds.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Size of the hub log (a regular file on fd 2) above which it is rotated once:
/// renamed to `<name>.1` (replacing the previous one) and reopened.
const LOG_CAP: u64 = 8 << 20;

/// One log line on stderr: `2026-11-21T05:22:03.123Z upload_progress hub[pid]: message`.
pub(crate) fn log(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    // stderr is a log file on the storage disk: a full disk must not panic
    // whatever task is logging (eprintln! would).
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "{} upload_progress hub[{}]: {}",
        timestamp(now_ms()),
        std::process::id(),
        args
    );
    // Under the stderr lock: no other line is written while fd 2 is swapped.
    let _ = rotate_log(2, &[1], LOG_CAP);
    drop(err);
}

/// When `fd` is a regular file larger than `cap`: renames it to `<path>.1`,
/// opens a new file at its path (0600, never through a link) and dup2s it onto
/// `fd` and onto those of `also` that share the old file. True when rotated.
pub(crate) fn rotate_log(
    fd: std::os::fd::RawFd,
    also: &[std::os::fd::RawFd],
    cap: u64,
) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let stat = |fd| {
        // SAFETY: fstat writes into the zeroed struct it is given.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st)
    };
    let Some(st) = stat(fd) else {
        return Ok(false);
    };
    if (st.st_mode & libc::S_IFMT) != libc::S_IFREG || (st.st_size as u64) < cap {
        return Ok(false);
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{fd}"))?;
    if path.as_os_str().as_bytes().ends_with(b" (deleted)") || !path.is_absolute() {
        return Ok(false);
    }
    let mut old = path.clone().into_os_string();
    old.push(".1");
    std::fs::rename(&path, &old)?;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid C string; the new descriptor is owned below.
    let nfd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_WRONLY
                | libc::O_CREAT
                | libc::O_EXCL
                | libc::O_APPEND
                | libc::O_NOFOLLOW
                | libc::O_CLOEXEC,
            0o600,
        )
    };
    if nfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    for &other in also {
        if stat(other).is_some_and(|o| o.st_dev == st.st_dev && o.st_ino == st.st_ino) {
            // SAFETY: both descriptors are open; dup2 replaces `other` atomically.
            unsafe { libc::dup2(nfd, other) };
        }
    }
    // SAFETY: as above; then the temporary descriptor is closed.
    unsafe {
        libc::dup2(nfd, fd);
        libc::close(nfd);
    }
    Ok(true)
}

/// A log line that may repeat at network speed (refused connections,
/// malformed frames): written at most once per 10 s, with the number of
/// occurrences since the previous line.
pub(crate) struct RateLog(Mutex<(Option<Instant>, u64)>);

impl RateLog {
    pub const EVERY: Duration = Duration::from_secs(10);

    pub const fn new() -> RateLog {
        RateLog(Mutex::new((None, 0)))
    }

    /// Logs `args` unless a line was logged less than 10 s ago; true when written.
    pub fn log(&self, args: std::fmt::Arguments<'_>) -> bool {
        let mut g = lock(&self.0);
        let now = Instant::now();
        if g.0
            .is_some_and(|t| now.saturating_duration_since(t) < Self::EVERY)
        {
            g.1 += 1;
            return false;
        }
        let more = std::mem::take(&mut g.1);
        g.0 = Some(now);
        drop(g);
        if more > 0 {
            log(format_args!(
                "{args} (and {more} more like it since the previous such line)"
            ));
        } else {
            log(args);
        }
        true
    }
}

fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        ms % 1000
    )
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
    let seed = random_seed();
    let bridge = if config.redis_url.trim().is_empty() {
        None
    } else {
        match redis::parse_redis_url(&config.redis_url) {
            Ok(settings) => Some(Arc::new(redis::Bridge::new(
                settings,
                &config.app_id,
                config.expire_seconds,
                format!("{:016x}", splitmix64(seed ^ 0x5eed)),
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
        tun,
        started: Instant::now(),
        listen_addr,
        state: Mutex::new(State::default()),
        conns: Mutex::new(HashMap::new()),
        m: Metrics::default(),
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
        r = watch(watch_pid) => r,
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
        let pause = hub.tun.close_spread / steps as u32;
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
    while Metrics::get(&hub.m.connections) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn sweep_loop(hub: Arc<Hub>, mut down: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(hub.tun.sweep_every) => {}
            _ = down.changed() => return,
        }
        let mut st = lock(&hub.state);
        st.sweep(hub.tun.retention);
    }
}

/// Resolves when `pid` exits; never when there is none to watch.
async fn watch(pid: Option<i32>) -> String {
    let Some(pid) = pid.filter(|p| *p > 0) else {
        return std::future::pending().await;
    };
    let gone = format!("watched process {pid} exited");
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: the fd was just returned by pidfd_open and is owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // `register_with_interest` only exists in recent tokio versions; the fd is
        // owned and stays open as long as the AsyncFd, which is what it asks for.
        #[allow(deprecated)]
        let afd = tokio::io::unix::AsyncFd::with_interest(owned, tokio::io::Interest::READABLE);
        if let Ok(afd) = afd {
            // A pidfd becomes readable when the process exits.
            let _ = afd.readable().await;
            return gone;
        }
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return gone;
    }
    loop {
        // SAFETY: kill with signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        if r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return gone;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn rate_log_counts_instead_of_writing() {
        let r = RateLog::new();
        assert!(r.log(format_args!("first")));
        for _ in 0..1000 {
            assert!(!r.log(format_args!("again")));
        }
        assert_eq!(lock(&r.0).1, 1000);
        // After 10 s the next line carries the count.
        lock(&r.0).0 = Some(Instant::now() - RateLog::EVERY);
        assert!(r.log(format_args!("later")));
        assert_eq!(lock(&r.0).1, 0);
    }

    /// Before: the log grew without bound (15 MB in 2 s under a flood).
    #[test]
    fn log_is_rotated_once_past_its_cap() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.log");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let other = f.try_clone().unwrap();
        f.write_all(&[b'a'; 1000]).unwrap();
        assert!(!rotate_log(f.as_raw_fd(), &[other.as_raw_fd()], 4096).unwrap());
        f.write_all(&[b'b'; 4000]).unwrap();
        assert!(rotate_log(f.as_raw_fd(), &[other.as_raw_fd()], 4096).unwrap());
        let rotated = dir.path().join("hub.log.1");
        assert_eq!(std::fs::metadata(&rotated).unwrap().len(), 5000);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // Both descriptors now write to the new file.
        f.write_all(b"new\n").unwrap();
        (&other).write_all(b"too\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\ntoo\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second rotation replaces the previous .1: at most two files.
        f.write_all(&[b'c'; 5000]).unwrap();
        assert!(rotate_log(f.as_raw_fd(), &[], 4096).unwrap());
        assert_eq!(std::fs::metadata(&rotated).unwrap().len(), 5008);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
