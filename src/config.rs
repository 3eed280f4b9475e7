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
    pub max_connections: u64,
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

    /// True when `origin` (an `Origin` header value) may open a WebSocket.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        origin_allowed(&self.allowed_origins, origin)
    }
}

pub fn parse_origins(list: &str) -> Vec<String> {
    list.split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Entries are hosts (`example.com`, `example.com:8080`, `*.example.com`) or
/// whole origins (`https://example.com`); `*` allows all. A missing Origin
/// (non-browser clients) is allowed: the header only protects browsers.
pub fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    if allowed.iter().any(|a| a == "*") {
        return true;
    }
    let Some(origin) = origin else { return true };
    let origin = origin.trim().to_ascii_lowercase();
    let host_port = origin.split("://").nth(1).unwrap_or(&origin);
    let host = host_port
        .rsplit_once(':')
        .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        .map_or(host_port, |(h, _)| h);
    allowed.iter().any(|a| {
        if a.contains("://") {
            *a == origin
        } else if let Some(suffix) = a.strip_prefix("*.") {
            host.ends_with(&format!(".{suffix}"))
        } else {
            a == host_port || a == host
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
        assert!(origin_allowed(&list, Some("https://example.com")));
        assert!(origin_allowed(&list, Some("http://example.com:8080")));
        assert!(origin_allowed(&list, Some("https://a.corp.test")));
        assert!(origin_allowed(&list, Some("https://x.io")));
        assert!(!origin_allowed(&list, Some("http://x.io")));
        assert!(!origin_allowed(&list, Some("https://evil.com")));
        assert!(!origin_allowed(&list, Some("https://corp.test.evil.com")));
        assert!(origin_allowed(&list, None));
        assert!(origin_allowed(&parse_origins("*"), Some("https://any")));
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
