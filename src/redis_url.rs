//! `upload_progress.redis_url` and the key prefix, shared by the hub's Redis
//! bridge and the upload state kept in Redis by PHP workers.

use redis::IntoConnectionInfo;

/// `upload_progress.redis_url`: `redis://[user:pass@]host:port[/db][?cluster=1]`
/// (or `rediss://` for TLS). With `cluster=1` (also `true`, `yes`) the URL is
/// a seed node of a Redis Cluster; several seeds may be given separated by
/// commas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub urls: Vec<String>,
    pub cluster: bool,
}

impl RedisSettings {
    /// The URLs with passwords hidden, for logs and error messages.
    pub fn describe(&self) -> String {
        let urls: Vec<String> = self.urls.iter().map(|u| redacted(u)).collect();
        let mut s = urls.join(",");
        if self.cluster {
            s.push_str(" (cluster)");
        }
        s
    }
}

pub fn parse_redis_url(s: &str) -> Result<RedisSettings, String> {
    let mut urls = Vec::new();
    let mut cluster = false;
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (base, query) = part.split_once('?').unwrap_or((part, ""));
        let mut kept = Vec::new();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "1"));
            if k.eq_ignore_ascii_case("cluster") {
                cluster |= matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on");
            } else {
                kept.push(kv);
            }
        }
        if !(base.starts_with("redis://") || base.starts_with("rediss://")) {
            return Err(format!(
                "{:?} is not a redis:// or rediss:// URL (upload_progress.redis_url)",
                redacted(part)
            ));
        }
        let url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        url.as_str()
            .into_connection_info()
            .map_err(|e| format!("invalid redis URL {:?}: {e}", redacted(part)))?;
        urls.push(url);
    }
    if urls.is_empty() {
        return Err("upload_progress.redis_url is empty".into());
    }
    Ok(RedisSettings { urls, cluster })
}

/// The URL with its password hidden, for logs.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        // Not a URL at all, yet something that looks like credentials.
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// A whole `upload_progress.redis_url` value (several comma-separated seed
/// URLs) with every password hidden, for phpinfo, `hub_status()` and logs.
/// A part that does not parse keeps only what precedes its credentials.
pub fn redacted_list(value: &str) -> String {
    value
        .split(',')
        .map(|part| redacted(part.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `text` with the credentials of `redis_url` and the app secret replaced,
/// for any line that leaves the process (logs, hub_status, phpinfo).
pub fn scrub(text: &str, redis_url: &str, app_secret: &str) -> String {
    let mut out = text.to_owned();
    for part in redis_url
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        out = out.replace(part, &redacted(part));
        // The credentials alone, wherever they were quoted.
        let after = part.find("://").map_or(0, |i| i + 3);
        if let Some(at) = part.rfind('@').filter(|at| *at >= after) {
            let userinfo = &part[after..at];
            if !userinfo.is_empty() {
                out = out.replace(userinfo, "***");
            }
            let password = userinfo.split_once(':').map_or("", |(_, p)| p);
            // Too short a password would mask unrelated text; it cannot
            // appear alone in the hub's own messages anyway.
            if password.len() >= 3 {
                out = out.replace(password, "***");
            }
        }
    }
    if !app_secret.is_empty() {
        out = out.replace(app_secret, "********");
    }
    out
}

/// `up:<app>:`, the prefix of every key and pub/sub channel of one app.
/// Braces would start a hash tag of their own, so they are replaced.
pub fn key_prefix(app_id: &str) -> String {
    let app: String = app_id
        .chars()
        .map(|c| if c == '{' || c == '}' { '_' } else { c })
        .collect();
    format!("up:{app}:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let s = parse_redis_url("redis://127.0.0.1:6379").unwrap();
        assert_eq!(s.urls, vec!["redis://127.0.0.1:6379"]);
        assert!(!s.cluster);
        let s = parse_redis_url("redis://a:1/?cluster=1&protocol=resp3, redis://b:2?cluster=yes")
            .unwrap();
        assert!(s.cluster);
        assert_eq!(s.urls, vec!["redis://a:1/?protocol=resp3", "redis://b:2"]);
        assert_eq!(
            s.describe(),
            "redis://a:1/?protocol=resp3,redis://b:2 (cluster)"
        );
        assert!(parse_redis_url("http://x").is_err());
        assert!(parse_redis_url("").is_err());
        let e = parse_redis_url("http://u:secret@x").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(redacted("redis://u:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
        assert_eq!(
            redacted_list("redis://:p1@a:1, redis://u:p@2@b:2?cluster=1,redis://c:3"),
            "redis://***@a:1,redis://***@b:2?cluster=1,redis://c:3"
        );
    }

    #[test]
    fn scrubbing() {
        let url = "redis://:hunter2@r1:6379,redis://u:pw@r2:1";
        let msg = format!("cannot connect to {url}: pw hunter2");
        let s = scrub(&msg, url, "topsecret");
        assert!(!s.contains("hunter2") && !s.contains(":pw@"), "{s}");
        assert_eq!(scrub("k=topsecret", "", "topsecret"), "k=********");
    }

    #[test]
    fn prefix_has_no_hash_tag() {
        assert_eq!(key_prefix("app{1}"), "up:app_1_:");
    }
}
