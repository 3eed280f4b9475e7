//! Settings of the extension, read once per process from php.ini (see
//! `php/ini.rs`) and shared by the recorder, the storage and the hub.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `upload_progress.hub`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubMode {
    /// Workers spawn the hub when none runs.
    Auto,
    /// An operator runs the hub; workers only publish.
    External,
    /// Nothing is published.
    Off,
}

impl HubMode {
    pub fn parse(s: &str) -> Option<HubMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Some(HubMode::Auto),
            "external" => Some(HubMode::External),
            "off" | "0" | "none" => Some(HubMode::Off),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HubMode::Auto => "auto",
            HubMode::External => "external",
            HubMode::Off => "off",
        }
    }
}

/// Default Pusher app id and key when php.ini leaves them empty.
pub const DEFAULT_APP_ID: &str = "upload-progress";
pub const DEFAULT_APP_KEY: &str = "upload-progress";

/// Serializable so that a spawned hub receives exactly the settings of the
/// worker that spawned it (see `recorder::spawn`), not a re-parse of them.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub enabled: bool,
    pub storage_dir: PathBuf,
    pub hub: HubMode,
    pub listen: String,
    /// Resolved ingest socket name: a path, or `@name` for an abstract name.
    pub hub_socket: String,
    pub app_id: String,
    pub app_key: String,
    /// Resolved secret (generated once per storage_dir when php.ini leaves it empty).
    pub app_secret: String,
    pub allowed_origins: Vec<String>,
    pub progress_param: String,
    pub min_interval_ms: u64,
    pub chunk_size: u64,
    pub max_upload_size: u64,
    pub expire_seconds: u64,
    pub activity_timeout: u64,
    /// 0 = derived from the hub's fd limit.
    pub max_connections: u64,
    /// TCP connections whose request head / WebSocket handshake is not done
    /// yet; 0 = derived from the fd limit. The oldest is closed to make room.
    pub max_pending_handshakes: u64,
    /// TCP connections (pending and WebSocket) per client address, loopback
    /// (a proxy on the host) excepted; 0 = no limit.
    pub max_connections_per_ip: u64,
    /// Seconds a new connection has to send its request head (and body); 0 = 10.
    pub handshake_timeout: u64,
    pub redis_url: String,
    /// PHP CLI binary that runs the spawned hub; "" = found next to PHP_BINDIR.
    pub php_binary: String,
}

/// Debug output never shows the secret nor the Redis password.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("enabled", &self.enabled)
            .field("storage_dir", &self.storage_dir)
            .field("hub", &self.hub)
            .field("listen", &self.listen)
            .field("hub_socket", &self.hub_socket)
            .field("app_id", &self.app_id)
            .field("app_key", &self.app_key)
            .field(
                "app_secret",
                &if self.app_secret.is_empty() {
                    ""
                } else {
                    "********"
                },
            )
            .field("allowed_origins", &self.allowed_origins)
            .field(
                "redis_url",
                &crate::redis_url::redacted_list(&self.redis_url),
            )
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The ingest socket name when `upload_progress.hub_socket` is empty: one
    /// hub per user and listen address.
    pub fn default_hub_socket(uid: u32, listen: &str) -> String {
        format!("@upload-progress-{uid}-{:016x}", fnv1a(listen.as_bytes()))
    }

    /// A file of this hub in storage_dir (`hub-<host>-<hash>.log`, `.pid`):
    /// hosts, and hubs of several listen addresses, may share one directory.
    pub fn hub_file(&self, extension: &str) -> PathBuf {
        let mut host = [0u8; 256];
        // SAFETY: gethostname writes at most host.len() bytes.
        let rc = unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) };
        let end = host.iter().position(|b| *b == 0).unwrap_or(host.len());
        let host: String = if rc == 0 {
            String::from_utf8_lossy(&host[..end])
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        } else {
            "host".to_owned()
        };
        self.storage_dir.join(format!(
            "hub-{host}-{:08x}.{extension}",
            fnv1a(self.hub_socket.as_bytes()) as u32
        ))
    }

    /// True when `origin` (an `Origin` header value) may open a WebSocket
    /// whose request named `host` (the `Host` header).
    pub fn origin_allowed(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        origin_allowed(&self.allowed_origins, origin, host)
    }
}

pub fn parse_origins(list: &str) -> Vec<String> {
    list.split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The host name of a `host[:port]` (IPv6 in brackets kept as `[::1]`),
/// lower-cased.
fn host_name(host_port: &str) -> String {
    let hp = host_port.trim().to_ascii_lowercase();
    if hp.starts_with('[') {
        return hp
            .split_once(']')
            .map_or(hp.clone(), |(h, _)| format!("{h}]"));
    }
    hp.rsplit_once(':')
        .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        .map_or(hp.clone(), |(h, _)| h.to_string())
}

/// Entries are hosts (`example.com`, `example.com:8080`, `*.example.com`) or
/// whole origins (`https://example.com`); `*` allows all. An empty list (the
/// default) allows an Origin whose host name equals the host name of the
/// `Host` header the browser sent (ports are not compared: a page on
/// `127.0.0.1:8080` may use a hub on `127.0.0.1:6001`, and behind a proxy the
/// Host is the site's). A missing Origin (non-browser clients) is allowed:
/// the header only protects browsers.
pub fn origin_allowed(allowed: &[String], origin: Option<&str>, connected: Option<&str>) -> bool {
    if allowed.iter().any(|a| a == "*") {
        return true;
    }
    let Some(origin) = origin else { return true };
    let origin = origin.trim().to_ascii_lowercase();
    let host_port = origin.split("://").nth(1).unwrap_or(&origin);
    let host_port = host_port.split('/').next().unwrap_or(host_port);
    let host = host_name(host_port);
    if allowed.is_empty() {
        // Same host as the one the browser connected to; "null" (sandboxed
        // pages, file://) never matches.
        return match connected {
            Some(c) => !host.is_empty() && host != "null" && host == host_name(c),
            None => false,
        };
    }
    allowed.iter().any(|a| {
        if a.contains("://") {
            *a == origin
        } else if let Some(suffix) = a.strip_prefix("*.") {
            host.ends_with(&format!(".{suffix}"))
        } else {
            a == host_port || *a == host
        }
    })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let list = parse_origins("example.com, *.corp.test ,https://x.io");
        let h = Some("hub.test:6001");
        assert!(origin_allowed(&list, Some("https://example.com"), h));
        assert!(origin_allowed(&list, Some("http://example.com:8080"), h));
        assert!(origin_allowed(&list, Some("https://a.corp.test"), h));
        assert!(origin_allowed(&list, Some("https://x.io"), h));
        assert!(!origin_allowed(&list, Some("http://x.io"), h));
        assert!(!origin_allowed(&list, Some("https://evil.com"), h));
        assert!(!origin_allowed(
            &list,
            Some("https://corp.test.evil.com"),
            h
        ));
        assert!(origin_allowed(&list, None, h));
        assert!(origin_allowed(&parse_origins("*"), Some("https://any"), h));
    }

    #[test]
    fn default_origin_rule_is_same_host() {
        // Before: the default was "*" and any site could open the hub's WebSocket.
        let none = parse_origins("");
        assert!(none.is_empty());
        let page = Some("http://127.0.0.1:8080");
        // The demo: page on :8080, hub on :6001 (ports are not compared).
        assert!(origin_allowed(&none, page, Some("127.0.0.1:6001")));
        // Proxied through nginx: the Host is the site's.
        assert!(origin_allowed(
            &none,
            Some("https://app.example"),
            Some("APP.example")
        ));
        assert!(origin_allowed(
            &none,
            Some("http://[::1]:8080"),
            Some("[::1]:6001")
        ));
        assert!(!origin_allowed(
            &none,
            Some("https://evil.example"),
            Some("127.0.0.1:6001")
        ));
        assert!(!origin_allowed(
            &none,
            Some("https://127.0.0.1.evil.example"),
            Some("127.0.0.1")
        ));
        assert!(!origin_allowed(
            &none,
            Some("http://[::1]:8080"),
            Some("[::2]:6001")
        ));
        assert!(!origin_allowed(&none, Some("null"), Some("null")));
        assert!(!origin_allowed(&none, page, None));
        assert!(!origin_allowed(&none, Some(""), Some("")));
        // Non-browser clients send no Origin.
        assert!(origin_allowed(&none, None, Some("127.0.0.1:6001")));
    }

    #[test]
    fn hub_socket_name_depends_on_listen() {
        let a = Config::default_hub_socket(1000, "127.0.0.1:6001");
        let b = Config::default_hub_socket(1000, "127.0.0.1:6002");
        assert!(a.starts_with("@upload-progress-1000-"));
        assert_ne!(a, b);
    }

    #[test]
    fn settings_survive_the_trip_to_the_hub_and_debug_hides_secrets() {
        let cfg = Config {
            enabled: true,
            storage_dir: PathBuf::from("/srv/up loads;x"),
            hub: HubMode::Auto,
            listen: "127.0.0.1:6001".into(),
            hub_socket: "@upload-progress-1-x".into(),
            app_id: "off".into(),
            app_key: "k;ey".into(),
            app_secret: "se\"cr;et none".into(),
            allowed_origins: vec!["none".into()],
            progress_param: "X-Progress-ID".into(),
            min_interval_ms: 100,
            chunk_size: 1,
            max_upload_size: 0,
            expire_seconds: 1,
            activity_timeout: 30,
            max_connections: 0,
            max_pending_handshakes: 0,
            max_connections_per_ip: 0,
            handshake_timeout: 10,
            redis_url: "redis://:pw;1@r:6379".into(),
            php_binary: String::new(),
        };
        let json = serde_json::to_vec(&cfg).unwrap();
        let back: Config = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, cfg, "exactly the same settings, no INI re-parse");
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("cr;et") && !dbg.contains("pw;1"), "{dbg}");
    }

    #[test]
    fn hub_modes() {
        assert_eq!(HubMode::parse("AUTO"), Some(HubMode::Auto));
        assert_eq!(HubMode::parse("external"), Some(HubMode::External));
        assert_eq!(HubMode::parse("off"), Some(HubMode::Off));
        assert_eq!(HubMode::parse("bogus"), None);
    }
}
