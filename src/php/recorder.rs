//! The recorder's PHP side: process state, the SAPI hooks and hub spawning.
//! Everything here runs on the PHP thread; nothing starts a thread.

use crate::config::{Config, HubMode};
use crate::php::{ini, sapi};
use crate::protocol::ingest::IngestMessage;
use crate::recorder::client::{
    own_uid, ConnectError, IngestClient, QueryError, END_OF_REQUEST_WAIT,
};
use crate::recorder::spawn::{self, SpawnOutcome, SpawnSpec};
use crate::recorder::{header_env_name, query_param, stream_id, valid_progress_id, BodyTracker};
use once_cell::sync::OnceCell;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::panic::catch_unwind;
use std::time::{Duration, Instant};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

struct Process {
    client: IngestClient,
    stream_counter: u32,
    last_spawn: Option<Instant>,
    /// The foreign holder of the socket name this process already reported.
    foreign_reported: Option<u32>,
}

thread_local! {
    static PROCESS: RefCell<Option<Process>> = const { RefCell::new(None) };
    /// Body tracker of the current request (plain requests with a progress id).
    static TRACKER: RefCell<Option<BodyTracker>> = const { RefCell::new(None) };
    /// Whether this request was already checked for a progress id.
    static CHECKED: Cell<bool> = const { Cell::new(false) };
    /// Upload::writeChunk reads the body itself and reports on its own.
    static IN_CHUNK: Cell<bool> = const { Cell::new(false) };
}

static ORIGINAL_READ_POST: OnceCell<Option<sapi::ReadPostFn>> = OnceCell::new();
static ORIGINAL_RFC1867: OnceCell<Option<sapi::Rfc1867Fn>> = OnceCell::new();
static ORIGINAL_DEACTIVATE: OnceCell<Option<sapi::DeactivateFn>> = OnceCell::new();

/// Active means: enabled and publishing (hub not `off`).
pub fn active(cfg: &Config) -> bool {
    cfg.enabled && cfg.hub != HubMode::Off
}

fn with_process<R>(f: impl FnOnce(&mut Process) -> R) -> Option<R> {
    let cfg = ini::config();
    if !active(cfg) {
        return None;
    }
    PROCESS.with(|p| {
        let mut p = p.try_borrow_mut().ok()?;
        let proc_ = p.get_or_insert_with(|| Process {
            client: IngestClient::new(cfg.hub_socket.clone(), VERSION.to_owned()),
            stream_counter: 0,
            last_spawn: None,
            foreign_reported: None,
        });
        Some(f(proc_))
    })
}

/// Runs `f` with the process's ingest client and the callback that spawns a
/// hub when none listens; reports a foreign holder of the socket name found
/// on the way.
fn with_client<R>(f: impl FnOnce(&mut IngestClient, &mut dyn FnMut()) -> R) -> Option<R> {
    with_process(|p| {
        let Process {
            client, last_spawn, ..
        } = &mut *p;
        let out = f(client, &mut || maybe_spawn(last_spawn));
        if let Some(uid) = p.client.foreign_holder() {
            if p.foreign_reported != Some(uid) {
                p.foreign_reported = Some(uid);
                report_foreign(uid);
            }
        }
        out
    })
}

/// What a foreign holder of the socket name means, for logs and hub_status().
pub fn foreign_message(uid: u32) -> String {
    format!(
        "the ingest socket {} is held by a process of uid {uid}, not of this user (uid {}): \
         nothing is sent to it and no hub can start under that name; stop that process or set \
         upload_progress.hub_socket to a path in a directory only this user can write",
        ini::config().hub_socket,
        own_uid()
    )
}

/// Logs a foreign holder once per host (the spawn-state file remembers it),
/// or once per process when that file cannot be used.
fn report_foreign(uid: u32) {
    let cfg = ini::config();
    let first = spawn::with_state(&cfg.hub_file("spawn"), |s| {
        let first = s.foreign_uid != Some(uid);
        s.foreign_uid = Some(uid);
        first
    })
    .unwrap_or(true);
    if first {
        log_warning(&format!("upload_progress: {}", foreign_message(uid)));
    }
}

/// Hands a message to the hub; false when it was dropped.
pub fn send(msg: &IngestMessage) -> bool {
    with_client(|client, no_hub| client.send(msg, no_hub)).unwrap_or(false)
}

pub fn publish(channel: &str, event: &str, data: &str) -> bool {
    with_client(|client, no_hub| client.publish(channel, event, data, no_hub)).unwrap_or(false)
}

pub fn next_stream_id() -> u64 {
    with_process(|p| {
        p.stream_counter = p.stream_counter.wrapping_add(1);
        stream_id(std::process::id(), p.stream_counter)
    })
    .unwrap_or(0)
}

pub fn dropped() -> u64 {
    with_process(|p| p.client.dropped()).unwrap_or(0)
}

/// Progress events this process coalesced while the hub was not reading.
pub fn coalesced() -> u64 {
    with_process(|p| p.client.coalesced()).unwrap_or(0)
}

/// Sends what waits for room in the socket, waiting a few ms at most: terminal events of
/// this request reach the hub before the worker idles (it may not send again for long).
fn flush_pending() {
    PROCESS.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if let Some(p) = p.as_mut().filter(|p| p.client.queued() > 0) {
                p.client.flush(END_OF_REQUEST_WAIT);
            }
        }
    });
}

/// RSHUTDOWN (registered in lib.rs): the end of every request, in every SAPI.
pub extern "C" fn request_shutdown(_ty: i32, _module_number: i32) -> i32 {
    let _ = catch_unwind(flush_pending);
    0
}

/// A bounded request/response with the hub (separate connection).
pub fn query(msg: &IngestMessage, timeout: Duration) -> Result<Vec<u8>, QueryError> {
    let cfg = ini::config();
    if !cfg.enabled {
        return Err(QueryError::NoAnswer);
    }
    let client = IngestClient::new(cfg.hub_socket.clone(), VERSION.to_owned());
    let out = client.query(msg, timeout);
    if let Err(QueryError::Foreign(uid)) = out {
        let _ = with_process(|p| {
            if p.foreign_reported != Some(uid) {
                p.foreign_reported = Some(uid);
                report_foreign(uid);
            }
        });
    }
    out
}

/// This host's spawn bookkeeping (backoff, last exit reason), if any.
pub fn spawn_state() -> Option<spawn::SpawnState> {
    spawn::read_state(&ini::config().hub_file("spawn"))
}

/// Which SAPI this process runs, read once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SapiKind {
    Fpm,
    CliServer,
    Other,
}

fn sapi_kind() -> SapiKind {
    static KIND: OnceCell<SapiKind> = OnceCell::new();
    *KIND.get_or_init(|| {
        match sapi::get()
            .map(|s| s.sapi_name())
            .unwrap_or_default()
            .as_str()
        {
            "fpm-fcgi" => SapiKind::Fpm,
            "cli-server" => SapiKind::CliServer,
            _ => SapiKind::Other,
        }
    })
}

/// Only the long-lived servers spawn a hub: php-fpm workers and the built-in server.
fn may_spawn(cfg: &Config) -> bool {
    cfg.hub == HubMode::Auto && sapi_kind() != SapiKind::Other
}

fn maybe_spawn(last_spawn: &mut Option<Instant>) {
    let cfg = ini::config();
    if !may_spawn(cfg) {
        return;
    }
    let now = Instant::now();
    if last_spawn.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
        return;
    }
    *last_spawn = Some(now);
    let Some(spec) = spawn_spec(cfg) else { return };
    // Mode 0700 when missing (create_dir_all would make it 0755, then refused as unsafe).
    let _ = crate::storage::root::Root::open(&cfg.storage_dir);
    match spawn::start_hub(&spec, &cfg.hub_file("spawn"), &mut PhpLog) {
        // (This runs inside with_client: the process state is borrowed, and
        // the per-host state file keeps this to one line.)
        Ok(SpawnOutcome::Foreign(uid)) => report_foreign(uid),
        Ok(SpawnOutcome::SpawnedWithoutLog(e)) => {
            log_warning_once(&format!("upload_progress: hub log refused: {e}"));
        }
        Ok(_) => {}
        Err(e) => log_warning(&format!(
            "upload_progress: could not start the hub with {}: {e}",
            spec.program
        )),
    }
}

/// The spawner's log lines go to the PHP error log.
struct PhpLog;

impl spawn::SpawnLog for PhpLog {
    fn warn(&mut self, msg: &str) {
        log_warning(msg);
    }
    fn warn_once(&mut self, msg: &str) {
        log_warning_once(msg);
    }
    fn foreign_message(&self, uid: u32) -> String {
        foreign_message(uid)
    }
}

/// `php_log_err_with_severity` from the PHP binary, looked up at run time.
type LogErrFn = unsafe extern "C" fn(msg: *const c_char, syslog_type: c_int);

/// Writes to the PHP error log (`error_log`, else the SAPI's log: the FPM
/// log for workers): never to the page (display_errors), never through a
/// user error handler that could turn it into an exception.
fn log_warning(msg: &str) {
    static LOG: OnceCell<Option<LogErrFn>> = OnceCell::new();
    let f = LOG.get_or_init(|| {
        // SAFETY: dlsym of a PHPAPI function with the declared signature.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"php_log_err_with_severity".as_ptr()) };
        // SAFETY: a non-null symbol of that name is that function.
        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, LogErrFn>(p) })
    });
    let text = crate::redis_url::scrub(msg, &ini::config().redis_url, &ini::config().app_secret);
    match (f, std::ffi::CString::new(text.replace('\0', " "))) {
        // SAFETY: NUL-terminated message; LOG_WARNING as PHP's own warnings.
        (Some(f), Ok(c)) => unsafe { f(c.as_ptr(), libc::LOG_WARNING) },
        _ => eprintln!("{text}"),
    }
}

/// Logs `msg` the first time this process sees it.
fn log_warning_once(msg: &str) {
    thread_local! {
        static SEEN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }
    let first = SEEN.with(|s| {
        let mut s = s.borrow_mut();
        if s.iter().any(|m| m == msg) || s.len() > 16 {
            false
        } else {
            s.push(msg.to_owned());
            true
        }
    });
    if first {
        log_warning(msg);
    }
}

/// The hub's command: the PHP CLI (found from the engine's PHP_BINDIR and version) with
/// this extension, watching the FPM master (it outlives workers and keeps its pid across
/// reloads) or, elsewhere, this process.
fn spawn_spec(cfg: &Config) -> Option<SpawnSpec> {
    let consts =
        crate::php::constants::read(&["PHP_BINDIR", "PHP_MAJOR_VERSION", "PHP_MINOR_VERSION"]);
    let get = |i: usize| consts.get(i).cloned().flatten();
    let version = match (get(1), get(2)) {
        (Some(a), Some(b)) => format!("{a}.{b}"),
        _ => String::new(),
    };
    let program = spawn::find_php_binary(&cfg.php_binary, get(0).as_deref(), &version)?;
    let ext = spawn::extension_path()?;
    // SAFETY: getppid/getpid never fail.
    let watch = if sapi_kind() == SapiKind::Fpm {
        unsafe { libc::getppid() }
    } else {
        unsafe { libc::getpid() }
    };
    spawn::hub_spec(cfg, program, &ext, watch)
}

/// The progress id of the current request, from the query string or header.
fn request_progress_id(cfg: &Config, syms: &sapi::Symbols) -> Option<String> {
    let info = syms.request()?;
    let from_query = info
        .query_string
        .as_deref()
        .and_then(|q| query_param(q, &cfg.progress_param))
        .map(str::to_owned);
    let id = from_query.or_else(|| syms.getenv(&header_env_name(&cfg.progress_param)))?;
    valid_progress_id(&id).then_some(id)
}

fn start_tracking_if_requested() {
    if CHECKED.with(|c| c.replace(true)) {
        return;
    }
    let cfg = ini::config();
    if !active(cfg) {
        return;
    }
    let Some(syms) = sapi::get() else { return };
    let Some(id) = request_progress_id(cfg, syms) else {
        return;
    };
    let content_length = syms.request().map_or(0, |r| r.content_length);
    let stream = next_stream_id();
    TRACKER.with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            *t = Some(BodyTracker::new(
                id,
                stream,
                content_length,
                cfg.min_interval_ms,
            ));
        }
    });
}

fn on_body_read(n: usize) {
    if IN_CHUNK.with(Cell::get) {
        return;
    }
    start_tracking_if_requested();
    let messages = TRACKER.with(|t| {
        t.try_borrow_mut()
            .ok()
            .and_then(|mut t| t.as_mut().map(|t| t.on_read(n, Instant::now())))
    });
    for m in messages.unwrap_or_default() {
        send(&m.tagged_request());
    }
}

unsafe extern "C" fn read_post_wrapper(buffer: *mut c_char, count: usize) -> usize {
    let n = match ORIGINAL_READ_POST.get().copied().flatten() {
        // SAFETY: forwarding PHP's own arguments to the previous handler.
        Some(original) => unsafe { original(buffer, count) },
        None => 0,
    };
    let _ = catch_unwind(|| on_body_read(n));
    n
}

/// rfc1867.h: a multipart form starts being parsed / was parsed to its end.
const MULTIPART_EVENT_START: c_uint = 0;
const MULTIPART_EVENT_END: c_uint = 5;

fn on_multipart_end() {
    let messages = TRACKER.with(|t| {
        t.try_borrow_mut()
            .ok()
            .and_then(|mut t| t.as_mut().map(BodyTracker::on_parsed_end))
    });
    for m in messages.unwrap_or_default() {
        send(&m.tagged_request());
    }
}

unsafe extern "C" fn rfc1867_wrapper(
    event: c_uint,
    data: *mut c_void,
    extra: *mut *mut c_void,
) -> c_int {
    match event {
        MULTIPART_EVENT_START => {
            let _ = catch_unwind(start_tracking_if_requested);
        }
        MULTIPART_EVENT_END => {
            let _ = catch_unwind(on_multipart_end);
        }
        _ => {}
    }
    match ORIGINAL_RFC1867.get().copied().flatten() {
        // SAFETY: chaining to the callback installed before ours (e.g. session.upload_progress).
        Some(original) => unsafe { original(event, data, extra) },
        None => 0,
    }
}

/// `sapi_module.deactivate` runs after the SAPI drained the unread rest of the
/// body (through read_post), so this, not RSHUTDOWN, is where a request's
/// body ends for us.
unsafe extern "C" fn deactivate_wrapper() -> c_int {
    let _ = catch_unwind(end_of_request_body);
    match ORIGINAL_DEACTIVATE.get().copied().flatten() {
        // SAFETY: chaining to the SAPI's own deactivate.
        Some(original) => unsafe { original() },
        None => 0,
    }
}

/// Installs the hooks, each chained to what was there before (MINIT).
pub fn install_hooks() {
    let syms = sapi::init();
    if !syms.sapi_module.is_null() {
        // SAFETY: MINIT runs single-threaded before any request.
        unsafe {
            let module = &mut *syms.sapi_module;
            let _ = ORIGINAL_READ_POST.set(module.read_post);
            if module.read_post.is_some() {
                module.read_post = Some(read_post_wrapper);
                let _ = ORIGINAL_DEACTIVATE.set(module.deactivate);
                module.deactivate = Some(deactivate_wrapper);
            }
        }
    }
    if !syms.rfc1867_callback.is_null() {
        // SAFETY: as above; the variable holds a nullable function pointer.
        unsafe {
            let _ = ORIGINAL_RFC1867.set(*syms.rfc1867_callback);
            *syms.rfc1867_callback = Some(rfc1867_wrapper);
        }
    }
}

/// Restores what we replaced (MSHUTDOWN), unless someone chained after us.
pub fn uninstall_hooks() {
    let Some(syms) = sapi::get() else { return };
    // SAFETY: MSHUTDOWN is single-threaded.
    unsafe {
        if !syms.sapi_module.is_null() {
            let module = &mut *syms.sapi_module;
            if module.read_post.map(|f| f as usize) == Some(read_post_wrapper as *const () as usize)
            {
                module.read_post = ORIGINAL_READ_POST.get().copied().flatten();
            }
            if module.deactivate.map(|f| f as usize)
                == Some(deactivate_wrapper as *const () as usize)
            {
                module.deactivate = ORIGINAL_DEACTIVATE.get().copied().flatten();
            }
        }
        if !syms.rfc1867_callback.is_null()
            && (*syms.rfc1867_callback).map(|f| f as usize)
                == Some(rfc1867_wrapper as *const () as usize)
        {
            *syms.rfc1867_callback = ORIGINAL_RFC1867.get().copied().flatten();
        }
    }
}

/// RINIT: make sure a hub runs (auto mode) so browsers can connect before
/// anything is published; costs one peek on the kept connection.
pub fn request_startup() {
    // The CLI (the hub itself, scripts) never spawns: decided before the
    // configuration is built, so the hub reads its own first.
    if sapi_kind() == SapiKind::Other {
        return;
    }
    let cfg = ini::config();
    if !active(cfg) || !may_spawn(cfg) {
        return;
    }
    with_client(|client, no_hub| {
        client.check_alive();
        // What the last request left queued goes first.
        client.flush(std::time::Duration::ZERO);
        if !client.is_connected() && client.connect(false) == Err(ConnectError::NoHub) {
            no_hub();
            let _ = client.connect(true);
        }
    });
}

/// After the request: release the state of a body that was not read to its end.
fn end_of_request_body() {
    CHECKED.with(|c| c.set(false));
    IN_CHUNK.with(|c| c.set(false));
    let tracker = TRACKER.with(|t| t.try_borrow_mut().ok().and_then(|mut t| t.take()));
    if let Some(mut tracker) = tracker {
        for m in tracker.abandon() {
            send(&m.tagged_request());
        }
    }
    flush_pending();
}

/// Runs `f` while the body is read by Upload::writeChunk, so the generic body
/// tracker stays out of the way.
pub fn while_streaming_chunk<R>(f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_CHUNK.with(|c| c.set(false));
        }
    }
    IN_CHUNK.with(|c| c.set(true));
    CHECKED.with(|c| c.set(true));
    let _reset = Reset;
    f()
}

pub fn sapi_symbols() -> Option<&'static sapi::Symbols> {
    sapi::get()
}
