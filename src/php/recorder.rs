//! The recorder's PHP side: process state, the SAPI hooks and hub spawning.
//! Everything here runs on the PHP thread; nothing starts a thread.

use crate::config::{Config, HubMode};
use crate::php::{ini, sapi};
use crate::protocol::ingest::IngestMessage;
use crate::recorder::client::IngestClient;
use crate::recorder::spawn::{self, SpawnSpec, ENV_WATCH_PID};
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
        });
        Some(f(proc_))
    })
}

/// Runs `f` with the process's ingest client and the callback that spawns a
/// hub when none listens.
fn with_client<R>(f: impl FnOnce(&mut IngestClient, &mut dyn FnMut()) -> R) -> Option<R> {
    with_process(|p| {
        let Process {
            client, last_spawn, ..
        } = p;
        f(client, &mut || maybe_spawn(last_spawn))
    })
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

/// A bounded request/response with the hub (separate connection).
pub fn query(msg: &IngestMessage, timeout: Duration) -> Option<Vec<u8>> {
    let cfg = ini::config();
    if !cfg.enabled {
        return None;
    }
    let client = IngestClient::new(cfg.hub_socket.clone(), VERSION.to_owned());
    client.query(msg, timeout)
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
    let _ = std::fs::create_dir_all(&cfg.storage_dir);
    if let Err(e) = spawn::spawn(&spec) {
        log_warning(&format!(
            "upload_progress: could not start the hub with {}: {e}",
            spec.program
        ));
    }
}

fn log_warning(msg: &str) {
    eprintln!("{msg}");
}

/// Absolute path of this extension's shared object (dladdr on our own code).
pub fn extension_path() -> Option<String> {
    // SAFETY: dladdr on the address of a function of this library.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(extension_path as *const c_void, &mut info) == 0 || info.dli_fname.is_null()
        {
            return None;
        }
        let path = std::ffi::CStr::from_ptr(info.dli_fname)
            .to_string_lossy()
            .into_owned();
        std::fs::canonicalize(&path)
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
            .or(Some(path))
    }
}

/// The PHP CLI binary for the hub: php.ini's `upload_progress.php_binary`,
/// else `php<major>.<minor>` or `php` in PHP_BINDIR, else common places.
fn php_binary(cfg: &Config) -> Option<String> {
    if !cfg.php_binary.is_empty() {
        return Some(cfg.php_binary.clone());
    }
    let consts =
        crate::php::constants::read(&["PHP_BINDIR", "PHP_MAJOR_VERSION", "PHP_MINOR_VERSION"]);
    let bindir = consts
        .first()
        .cloned()
        .flatten()
        .unwrap_or_else(|| "/usr/bin".into());
    let ver = match (
        consts.get(1).cloned().flatten(),
        consts.get(2).cloned().flatten(),
    ) {
        (Some(a), Some(b)) => format!("{a}.{b}"),
        _ => String::new(),
    };
    let candidates = [
        format!("{bindir}/php{ver}"),
        format!("{bindir}/php"),
        format!("/usr/bin/php{ver}"),
        "/usr/local/bin/php".into(),
        "/usr/bin/php".into(),
    ];
    candidates
        .into_iter()
        .find(|c| std::fs::metadata(c).is_ok_and(|m| m.is_file()))
}

fn spawn_spec(cfg: &Config) -> Option<SpawnSpec> {
    let program = php_binary(cfg)?;
    let ext = extension_path()?;
    let mut args = vec!["-n".to_owned(), "-d".into(), format!("extension={ext}")];
    let mut configured_secret = String::new();
    for (name, value) in ini::current_values() {
        let value = match name.as_str() {
            // Passed in the environment, never on a command line `ps` shows.
            "upload_progress.app_secret" => {
                configured_secret = value.trim().to_owned();
                continue;
            }
            "upload_progress.storage_dir" => cfg.storage_dir.to_string_lossy().into_owned(),
            "upload_progress.hub_socket" => cfg.hub_socket.clone(),
            _ => value,
        };
        args.push("-d".into());
        args.push(format!("{name}={value}"));
    }
    args.push("-r".into());
    args.push("UploadProgress\\Hub::run();".into());
    // The FPM master outlives workers and keeps its pid across reloads.
    // SAFETY: getppid/getpid never fail.
    let watch = if sapi_kind() == SapiKind::Fpm {
        unsafe { libc::getppid() }
    } else {
        unsafe { libc::getpid() }
    };
    let mut env = vec![
        (
            "PATH".to_owned(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        (ENV_WATCH_PID.to_owned(), watch.to_string()),
    ];
    if !configured_secret.is_empty() {
        env.push(("UPLOAD_PROGRESS_APP_SECRET".into(), configured_secret));
    }
    Some(SpawnSpec {
        program,
        args,
        env,
        log_path: cfg.hub_file("log").to_string_lossy().into_owned(),
        socket_name: cfg.hub_socket.clone(),
    })
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
    let cfg = ini::config();
    if !active(cfg) || !may_spawn(cfg) {
        return;
    }
    with_client(|client, no_hub| {
        client.check_alive();
        if !client.is_connected()
            && client.connect(false) == Err(crate::recorder::client::ConnectError::NoHub)
        {
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
