//! php.ini directives of the contract and the process-wide `Config` read from them.

use crate::config::{parse_origins, Config, HubMode, DEFAULT_APP_ID, DEFAULT_APP_KEY};
use crate::secret;
use ext_php_rs::ffi::{php_output_write, zend_ini_entry};
use ext_php_rs::flags::IniEntryPermission;
use ext_php_rs::zend::{ExecutorGlobals, IniEntryDef, IniEntryDefs};
use once_cell::sync::OnceCell;
use std::ffi::c_int;
use std::path::PathBuf;

/// A string literal as a `&'static CStr` (checked at compile time).
macro_rules! cstr {
    ($s:expr) => {
        match std::ffi::CStr::from_bytes_with_nul(concat!($s, "\0").as_bytes()) {
            Ok(c) => c,
            Err(_) => panic!("NUL byte in a directive"),
        }
    };
}

/// One list gives both the names and defaults (`DIRECTIVES`, in the order `php --ri`
/// shows them) and the engine's entries (`INI_ENTRIES`, all PHP_INI_SYSTEM); `masked`
/// ones show `********` or a scrubbed URL in phpinfo().
macro_rules! directives {
    ($( $name:literal = $default:literal $($masked:ident)? ;)*) => {
        const COUNT: usize = [$($name),*].len();

        /// Name and default of every directive, in the order `php --ri` shows them.
        pub const DIRECTIVES: [(&str, &str); COUNT] = [$(($name, $default)),*];

        static INI_ENTRIES: IniEntryDefs<{ COUNT + 1 }> = IniEntryDefs::new([
            $( entry(cstr!($name), cstr!($default), directives!(@masked $($masked)?)), )*
            IniEntryDef::end(),
        ]);
    };
    (@masked masked) => { true };
    (@masked) => { false };
}

const fn entry(
    name: &'static std::ffi::CStr,
    default: &'static std::ffi::CStr,
    masked: bool,
) -> IniEntryDef {
    let mut e = IniEntryDef::new(name, default, IniEntryPermission::System);
    if masked {
        e.displayer = Some(display_masked);
    }
    e
}

directives! {
    "upload_progress.enabled" = "1";
    "upload_progress.storage_dir" = "";
    "upload_progress.hub" = "auto";
    "upload_progress.listen" = "127.0.0.1:6001";
    "upload_progress.hub_socket" = "";
    "upload_progress.app_id" = "";
    "upload_progress.app_key" = "";
    "upload_progress.app_secret" = "" masked;
    "upload_progress.allowed_origins" = "";
    "upload_progress.progress_param" = "X-Progress-ID";
    "upload_progress.min_interval_ms" = "100";
    "upload_progress.chunk_size" = "8388608";
    "upload_progress.max_upload_size" = "0";
    "upload_progress.expire_seconds" = "86400";
    "upload_progress.activity_timeout" = "30";
    "upload_progress.max_connections" = "0";
    "upload_progress.max_pending_handshakes" = "0";
    "upload_progress.max_connections_per_ip" = "256";
    "upload_progress.handshake_timeout" = "10";
    "upload_progress.redis_url" = "" masked;
    "upload_progress.php_binary" = "";
}

/// What phpinfo() and `php --ri` show for a secret directive: `********` for
/// a set app_secret, the Redis URL(s) with their passwords replaced.
pub fn masked_value(name: &str, value: &str) -> String {
    if value.is_empty() {
        return String::new();
    }
    if name.ends_with(".app_secret") {
        "********".to_owned()
    } else {
        crate::redis_url::redacted_list(value)
    }
}

/// zend_ini_entry displayer (ZEND_INI_DISPLAY_ORIG = 1, ACTIVE = 2).
unsafe extern "C" fn display_masked(entry: *mut zend_ini_entry, kind: c_int) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: PHP passes one of its live ini entries.
        let Some(entry) = (unsafe { entry.as_ref() }) else {
            return;
        };
        let value = if kind == 1 && entry.modified != 0 {
            entry.orig_value
        } else {
            entry.value
        };
        let string = |z: *mut ext_php_rs::ffi::zend_string| -> String {
            // SAFETY: ini names and values are live zend_strings or null.
            unsafe { z.as_ref() }.map_or_else(String::new, |z| {
                String::from_utf8_lossy(z.as_bytes()).into_owned()
            })
        };
        let shown = masked_value(&string(entry.name), &string(value));
        let as_text = crate::php::sapi::get()
            .filter(|s| !s.sapi_module.is_null())
            // SAFETY: sapi_module is PHP's live global.
            .is_none_or(|s| unsafe { (*s.sapi_module).phpinfo_as_text != 0 });
        let out = match (shown.is_empty(), as_text) {
            (true, true) => "no value".to_owned(),
            (true, false) => "<i>no value</i>".to_owned(),
            (false, true) => shown,
            (false, false) => html_escape(&shown),
        };
        // SAFETY: writes our bytes to PHP's output layer.
        unsafe { php_output_write(out.as_ptr().cast(), out.len()) };
    });
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#039;"),
            _ => out.push(c),
        }
    }
    out
}

pub fn register(module_number: i32) {
    IniEntryDef::register(INI_ENTRIES.as_slice(), module_number);
}

/// Current values of our directives (name, value) as PHP sees them.
pub fn current_values() -> Vec<(String, String)> {
    let all = ExecutorGlobals::get().ini_values();
    DIRECTIVES
        .iter()
        .map(|(name, default)| {
            let value = all
                .get(*name)
                .cloned()
                .flatten()
                .unwrap_or_else(|| (*default).to_owned());
            ((*name).to_owned(), value)
        })
        .collect()
}

static CONFIG: OnceCell<Config> = OnceCell::new();

/// The spawned hub's settings, received from its spawner: from then on
/// `config()` returns exactly these (first caller wins).
pub fn set_config(cfg: Config) {
    let _ = CONFIG.set(cfg);
}

/// The process's configuration, read on first use: in FPM that is the first
/// request, after the pool's php_admin_value entries were applied.
pub fn config() -> &'static Config {
    CONFIG.get_or_init(|| build_config(&current_values()))
}

fn bool_value(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "on" | "yes" | "true"
    )
}

fn u64_value(v: &str, default: u64) -> u64 {
    let v = v.trim();
    let (digits, mult) = match v.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&v[..v.len() - 1], 1024),
        Some('m') => (&v[..v.len() - 1], 1024 * 1024),
        Some('g') => (&v[..v.len() - 1], 1024 * 1024 * 1024),
        _ => (v, 1),
    };
    digits
        .trim()
        .parse::<u64>()
        .map(|n| n.saturating_mul(mult))
        .unwrap_or(default)
}

fn or_default(v: &str, default: &str) -> String {
    if v.trim().is_empty() {
        default.to_owned()
    } else {
        v.trim().to_owned()
    }
}

pub fn build_config(values: &[(String, String)]) -> Config {
    let get = |name: &str| {
        values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let storage_dir = match get("upload_progress.storage_dir").trim() {
        "" => {
            let tmp = crate::php::sapi::get().map_or_else(|| "/tmp".to_owned(), |s| s.temp_dir());
            // Per user: the shared tmp dir must not hold one root that any user could
            // create first (see storage::root).
            // SAFETY: geteuid never fails.
            PathBuf::from(tmp).join(format!("upload-progress-{}", unsafe { libc::geteuid() }))
        }
        dir => PathBuf::from(dir),
    };
    let listen = or_default(get("upload_progress.listen"), "127.0.0.1:6001");
    let hub_socket = match get("upload_progress.hub_socket").trim() {
        // SAFETY: getuid never fails.
        "" => Config::default_hub_socket(unsafe { libc::getuid() }, &listen),
        s => s.to_owned(),
    };
    let configured_secret = get("upload_progress.app_secret").trim().to_owned();
    let app_secret = if configured_secret.is_empty() {
        secret::load_or_create(&storage_dir).unwrap_or_default()
    } else {
        configured_secret
    };
    Config {
        enabled: bool_value(get("upload_progress.enabled")),
        storage_dir,
        hub: HubMode::parse(get("upload_progress.hub")).unwrap_or(HubMode::Auto),
        listen,
        hub_socket,
        app_id: or_default(get("upload_progress.app_id"), DEFAULT_APP_ID),
        app_key: or_default(get("upload_progress.app_key"), DEFAULT_APP_KEY),
        app_secret,
        allowed_origins: parse_origins(get("upload_progress.allowed_origins")),
        progress_param: or_default(get("upload_progress.progress_param"), "X-Progress-ID"),
        min_interval_ms: u64_value(get("upload_progress.min_interval_ms"), 100),
        chunk_size: u64_value(get("upload_progress.chunk_size"), 8 * 1024 * 1024),
        max_upload_size: u64_value(get("upload_progress.max_upload_size"), 0),
        expire_seconds: u64_value(get("upload_progress.expire_seconds"), 86400),
        activity_timeout: u64_value(get("upload_progress.activity_timeout"), 30),
        max_connections: u64_value(get("upload_progress.max_connections"), 0),
        max_pending_handshakes: u64_value(get("upload_progress.max_pending_handshakes"), 0),
        max_connections_per_ip: u64_value(get("upload_progress.max_connections_per_ip"), 256),
        handshake_timeout: u64_value(get("upload_progress.handshake_timeout"), 10),
        redis_url: get("upload_progress.redis_url").trim().to_owned(),
        php_binary: get("upload_progress.php_binary").trim().to_owned(),
    }
}
