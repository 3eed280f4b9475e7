//! Upload state in Redis, for several hosts sharing one storage directory
//! (`upload_progress.redis_url`). The data file stays on the shared disk; what
//! the manifest holds in single-host mode lives in two keys per upload, both
//! with the hash tag of the upload's channel (so they share a Cluster slot
//! with the hub's `latest` and `agg` keys of that upload):
//!
//! - `up:<app>:upload:{private-upload.<id>}`: a hash of the sizes, state,
//!   metadata (JSON), expected sha256, times, final path and one
//!   `sha:<index>` field per chunk that came with a checksum;
//! - `up:<app>:chunks:{private-upload.<id>}`: a bitmap, bit `i` set once
//!   chunk `i` is durably stored.
//!
//! Every change is one Lua script, so marks from concurrent writers on
//! different hosts never overwrite each other and a chunk is never marked on an
//! aborted or expired upload. Both keys expire `KEY_GRACE_S` after the upload
//! does, so that the next expiry sweep can still tell the subscribers and
//! remove the data.
//!
//! Each PHP process keeps one connection (no thread, no runtime: the
//! blocking client of the `redis` crate with short timeouts). Any failure drops
//! it, maps to [`StorageError::Unavailable`], and the next call connects again.

use super::error::StorageError;
use super::manifest::{Manifest, UploadState, FORMAT_VERSION};
use crate::redis_url::RedisSettings;
use redis::{ConnectionLike, RedisError, Script, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// The keys outlive the upload's expiry by this much (see the module docs).
pub const KEY_GRACE_S: u64 = 600;

/// How a [`super::Store`] reaches Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStateOptions {
    pub settings: RedisSettings,
    /// `up:<app>:` (see [`crate::redis_url::key_prefix`]).
    pub key_prefix: String,
    /// Connect, read and write timeout of every call.
    pub timeout: Duration,
}

const COMMON: &str = r#"
local h, b = KEYS[1], KEYS[2]
local function snap(code)
  return {code, redis.call('HGETALL', h), redis.call('GET', b)}
end
local function live(now)
  local s = redis.call('HMGET', h, 'state', 'expires_at')
  if not s[1] then return nil end
  local exp = tonumber(s[2]) or 0
  if s[1] == 'aborted' or (exp ~= 0 and now >= exp) then return nil end
  return s[1]
end
local function keep(at_ms)
  if at_ms > 0 then
    redis.call('PEXPIREAT', h, at_ms)
    redis.call('PEXPIREAT', b, at_ms)
  else
    redis.call('PERSIST', h)
    redis.call('PERSIST', b)
  end
end
"#;

// LOAD: -> {1, fields, bits}
const LOAD: &str = "return snap(1)";

// CREATE: ARGV key_expire_ms, chunk_count, field, value, ... -> 1 | 0 (existed)
const CREATE: &str = r#"
if redis.call('EXISTS', h) == 1 then return 0 end
redis.call('DEL', b)
redis.call('HSET', h, unpack(ARGV, 3))
redis.call('SETBIT', b, tonumber(ARGV[2]) - 1, 0)
keep(tonumber(ARGV[1]))
return 1
"#;

// MARK: ARGV now, index, sha256 or '', expires_at, key_expire_ms -> {0} | snap
const MARK: &str = r#"
local s = live(tonumber(ARGV[1]))
if not s then return {0} end
if s == 'uploading' then
  redis.call('SETBIT', b, tonumber(ARGV[2]), 1)
  if ARGV[3] ~= '' then redis.call('HSET', h, 'sha:' .. ARGV[2], ARGV[3]) end
  redis.call('HSET', h, 'touched_at', ARGV[1], 'expires_at', ARGV[4])
  keep(tonumber(ARGV[5]))
end
return snap(1)
"#;

// COMPLETE: ARGV now, path, expires_at, key_expire_ms, chunk_count
//   -> {0} gone | {2, ...} chunks missing | {1, ...}
const COMPLETE: &str = r#"
local s = live(tonumber(ARGV[1]))
if not s then return {0} end
if s == 'uploading' then
  if redis.call('BITCOUNT', b) < tonumber(ARGV[5]) then return snap(2) end
  redis.call('HSET', h, 'state', 'complete', 'path', ARGV[2],
             'touched_at', ARGV[1], 'expires_at', ARGV[3])
  keep(tonumber(ARGV[4]))
end
return snap(1)
"#;

// ABORT: ARGV now -> 0 unknown | 1 aborted | 2 it had expired (removed anyway)
const ABORT: &str = r#"
if redis.call('EXISTS', h) == 0 then return 0 end
local gone = live(tonumber(ARGV[1])) == nil
redis.call('DEL', h, b)
if gone then return 2 end
return 1
"#;

// EXPIRE (sweep): ARGV now -> the state it had, or false when live or gone
const EXPIRE: &str = r#"
local st = redis.call('HGET', h, 'state')
if not st or st == 'aborted' then return false end
if live(tonumber(ARGV[1])) then return false end
redis.call('DEL', h, b)
return st
"#;

struct Scripts {
    load: Script,
    create: Script,
    mark: Script,
    complete: Script,
    abort: Script,
    expire: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| Script::new(&format!("{COMMON}\n{body}"));
        Scripts {
            load: s(LOAD),
            create: s(CREATE),
            mark: s(MARK),
            complete: s(COMPLETE),
            abort: s(ABORT),
            expire: s(EXPIRE),
        }
    }
}

enum Conn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    fn as_dyn(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c.as_mut(),
        }
    }
}

struct Owned {
    /// The process that connected: a forked child must not talk on (or
    /// close the TLS session of) its parent's connection.
    pid: u32,
    conn: Conn,
}

/// Result of [`RedisState::complete`].
pub(crate) enum Completed {
    Done(Manifest),
    /// Redis misses marks the caller saw (lost by a Redis restart without
    /// persistence): the caller reports the chunks missing.
    Missing(Manifest),
}

/// Result of [`RedisState::abort`].
pub(crate) enum AbortOutcome {
    Unknown,
    Removed,
    WasExpired,
}

pub(crate) struct RedisState {
    opts: RedisStateOptions,
    scripts: Scripts,
    conn: Mutex<Option<Owned>>,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("redis", &self.opts.settings.describe())
            .finish()
    }
}

impl RedisState {
    pub fn new(opts: RedisStateOptions) -> RedisState {
        RedisState {
            opts,
            scripts: Scripts::new(),
            conn: Mutex::new(None),
        }
    }

    pub fn describe(&self) -> String {
        self.opts.settings.describe()
    }

    fn keys(&self, id: &str) -> [String; 2] {
        let p = &self.opts.key_prefix;
        [
            format!("{p}upload:{{private-upload.{id}}}"),
            format!("{p}chunks:{{private-upload.{id}}}"),
        ]
    }

    /// The state of upload `id`, `None` when Redis has none.
    pub fn load(&self, id: &str) -> Result<Option<Manifest>, StorageError> {
        let v = self.run(id, "reading", &self.scripts.load, &[])?;
        let (_, m) = self.snapshot(id, v)?;
        Ok(m)
    }

    /// Stores a new upload's state.
    pub fn create(&self, m: &Manifest) -> Result<(), StorageError> {
        let mut args = vec![
            key_expire_ms(m.expires_at).to_string(),
            m.chunk_count.to_string(),
        ];
        let meta = serde_json::to_string(&m.metadata)
            .map_err(|e| StorageError::Io(format!("encoding the metadata of {}: {e}", m.id)))?;
        let mut field = |k: &str, v: String| {
            args.push(k.to_string());
            args.push(v);
        };
        field("v", FORMAT_VERSION.to_string());
        field("id", m.id.clone());
        field("state", state_name(m.state).to_string());
        field("total", m.total_bytes.to_string());
        field("chunk_size", m.chunk_size.to_string());
        field("count", m.chunk_count.to_string());
        field("meta", meta);
        field("created_at", m.created_at.to_string());
        field("touched_at", m.touched_at.to_string());
        field("expires_at", m.expires_at.to_string());
        if let Some(sha) = &m.sha256 {
            field("sha256", sha.clone());
        }
        // 0 ("exists") can only be this call's own first attempt whose reply was
        // lost: ids carry 128 random bits and their directory was just made.
        self.run(&m.id, "creating", &self.scripts.create, &args)
            .map(drop)
    }

    /// Marks chunk `index` stored (when the upload is live and uploading) and
    /// returns the state after it; `None` when the upload is gone.
    pub fn mark(
        &self,
        id: &str,
        index: u64,
        sha256: Option<&str>,
        now: u64,
        expires_at: u64,
    ) -> Result<Option<Manifest>, StorageError> {
        let args = [
            now.to_string(),
            index.to_string(),
            sha256.unwrap_or("").to_string(),
            expires_at.to_string(),
            key_expire_ms(expires_at).to_string(),
        ];
        let v = self.run(id, "marking a chunk of", &self.scripts.mark, &args)?;
        Ok(self.snapshot(id, v)?.1)
    }

    /// Records completion; `None` when the upload is gone.
    pub fn complete(
        &self,
        m: &Manifest,
        path: &str,
        now: u64,
        expires_at: u64,
    ) -> Result<Option<Completed>, StorageError> {
        let args = [
            now.to_string(),
            path.to_string(),
            expires_at.to_string(),
            key_expire_ms(expires_at).to_string(),
            m.chunk_count.to_string(),
        ];
        let v = self.run(&m.id, "completing", &self.scripts.complete, &args)?;
        Ok(match self.snapshot(&m.id, v)? {
            (2, Some(m)) => Some(Completed::Missing(m)),
            (_, Some(m)) => Some(Completed::Done(m)),
            (_, None) => None,
        })
    }

    pub fn abort(&self, id: &str, now: u64) -> Result<AbortOutcome, StorageError> {
        match self.run(id, "aborting", &self.scripts.abort, &[now.to_string()])? {
            Value::Int(1) => Ok(AbortOutcome::Removed),
            Value::Int(2) => Ok(AbortOutcome::WasExpired),
            _ => Ok(AbortOutcome::Unknown),
        }
    }

    /// Removes the state of an expired upload; the state it had, `None` when
    /// it is live (touched meanwhile) or already gone.
    pub fn expire(&self, id: &str, now: u64) -> Result<Option<UploadState>, StorageError> {
        match self.run(id, "expiring", &self.scripts.expire, &[now.to_string()])? {
            Value::BulkString(s) => Ok(parse_state(&String::from_utf8_lossy(&s))),
            Value::SimpleString(s) => Ok(parse_state(&s)),
            _ => Ok(None),
        }
    }

    // ---- internals ----

    fn run(
        &self,
        id: &str,
        what: &str,
        script: &Script,
        args: &[String],
    ) -> Result<Value, StorageError> {
        let mut guard = self.lock();
        let reused = guard.as_ref().is_some_and(|o| o.pid == std::process::id());
        let attempt = |slot: &mut Option<Owned>| {
            self.connection(slot).and_then(|conn| {
                let [h, b] = self.keys(id);
                let mut inv = script.key(h);
                inv.key(b);
                for a in args {
                    inv.arg(a);
                }
                inv.invoke::<Value>(conn.as_dyn())
            })
        };
        let mut result = attempt(&mut guard);
        if let Err(e) = &result {
            *guard = None;
            // A connection kept from an earlier request finds out only now that
            // Redis restarted or an idle timeout closed it: one fresh try. The
            // scripts are idempotent, so a retry after a lost reply is harmless;
            // a timeout is not retried (it would double the wait).
            if reused && !e.is_timeout() && (e.is_connection_dropped() || e.is_io_error()) {
                result = attempt(&mut guard);
            }
        }
        result.map_err(|e| {
            // Whatever went wrong, the connection may be out of step: start afresh.
            *guard = None;
            StorageError::Unavailable(format!(
                "the upload state in Redis {} is unavailable while {what} upload {id}: {e}",
                self.describe()
            ))
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Owned>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connection<'a>(&self, slot: &'a mut Option<Owned>) -> Result<&'a mut Conn, RedisError> {
        let pid = std::process::id();
        if slot.as_ref().is_some_and(|o| o.pid != pid) {
            // Inherited through fork: leave the parent's socket and session alone.
            std::mem::forget(slot.take());
        }
        if slot.is_none() {
            *slot = Some(Owned {
                pid,
                conn: self.connect()?,
            });
        }
        match slot.as_mut() {
            Some(o) => Ok(&mut o.conn),
            None => Err(RedisError::from(std::io::Error::other("no connection"))),
        }
    }

    fn connect(&self) -> Result<Conn, RedisError> {
        let t = self.opts.timeout;
        let urls = &self.opts.settings.urls;
        if self.opts.settings.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(urls.clone())
                .connection_timeout(t)
                .response_timeout(t)
                .retries(1)
                .build()?;
            Ok(Conn::Cluster(Box::new(client.get_connection()?)))
        } else {
            let url = urls.first().map(String::as_str).unwrap_or_default();
            let client = redis::Client::open(url)?;
            let conn = client.get_connection_with_timeout(t)?;
            conn.set_read_timeout(Some(t))?;
            conn.set_write_timeout(Some(t))?;
            Ok(Conn::Single(conn))
        }
    }

    /// `{code, fields, bits}` (or `{0}`) to the code and the manifest it describes.
    fn snapshot(&self, id: &str, v: Value) -> Result<(i64, Option<Manifest>), StorageError> {
        let bad = |why: &str| {
            StorageError::Io(format!(
                "unexpected answer from Redis {} for upload {id}: {why}",
                self.describe()
            ))
        };
        let Value::Array(items) = v else {
            return Err(bad("not an array"));
        };
        let mut items = items.into_iter();
        let code = match items.next() {
            Some(Value::Int(c)) => c,
            _ => return Err(bad("no status code")),
        };
        let fields = match items.next() {
            None => return Ok((code, None)),
            Some(f) => hash_fields(f).ok_or_else(|| bad("fields are not a hash"))?,
        };
        if fields.is_empty() {
            return Ok((code, None));
        }
        let bits = match items.next() {
            Some(Value::BulkString(b)) => b,
            _ => Vec::new(),
        };
        let m = manifest_from(&fields, &bits).map_err(|why| {
            StorageError::Io(format!(
                "the state of upload {id} in Redis {} is not valid: {why}",
                self.describe()
            ))
        })?;
        m.check(
            id,
            &format!("the state of upload {id} in Redis {}", self.describe()),
        )?;
        Ok((code, Some(m)))
    }
}

/// Unix seconds of expiry to the keys' PEXPIREAT in milliseconds (0 = never).
fn key_expire_ms(expires_at: u64) -> u64 {
    if expires_at == 0 {
        0
    } else {
        expires_at.saturating_add(KEY_GRACE_S).saturating_mul(1000)
    }
}

fn state_name(s: UploadState) -> &'static str {
    match s {
        UploadState::Uploading => "uploading",
        UploadState::Complete => "complete",
        UploadState::Aborted => "aborted",
    }
}

fn parse_state(s: &str) -> Option<UploadState> {
    match s {
        "uploading" => Some(UploadState::Uploading),
        "complete" => Some(UploadState::Complete),
        "aborted" => Some(UploadState::Aborted),
        _ => None,
    }
}

/// HGETALL as RESP2 (flat array) or RESP3 (map).
fn hash_fields(v: Value) -> Option<HashMap<String, String>> {
    let text = |v: Value| match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    };
    let mut out = HashMap::new();
    match v {
        Value::Array(items) => {
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.insert(text(k)?, text(v)?);
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                out.insert(text(k)?, text(v)?);
            }
        }
        Value::Nil => {}
        _ => return None,
    }
    Some(out)
}

/// The manifest described by the hash fields and the bitmap (bit `i` of the
/// bitmap is bit `7 - i % 8` of byte `i / 8`, as SETBIT numbers them).
pub(crate) fn manifest_from(f: &HashMap<String, String>, bits: &[u8]) -> Result<Manifest, String> {
    let get = |k: &str| f.get(k).ok_or_else(|| format!("field {k} is missing"));
    let num = |k: &str| -> Result<u64, String> {
        let v = get(k)?;
        v.parse::<u64>()
            .map_err(|_| format!("field {k} is {:?}, not a number", super::error::shorten(v)))
    };
    let version = u32::try_from(num("v")?).map_err(|_| "field v is out of range".to_string())?;
    let state = get("state")?;
    let state =
        parse_state(state).ok_or_else(|| format!("state {:?}", super::error::shorten(state)))?;
    let chunk_count = num("count")?;
    if chunk_count > super::MAX_CHUNK_COUNT {
        return Err(format!("{chunk_count} chunks"));
    }
    let stored: String = (0..chunk_count as usize)
        .map(|i| {
            let set = bits.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0);
            if set {
                '1'
            } else {
                '0'
            }
        })
        .collect();
    let metadata: BTreeMap<String, String> = serde_json::from_str(get("meta")?)
        .map_err(|e| format!("field meta is not a JSON object of strings: {e}"))?;
    let mut chunk_sha256 = BTreeMap::new();
    for (k, v) in f {
        if let Some(i) = k.strip_prefix("sha:") {
            let i = i
                .parse::<u64>()
                .map_err(|_| format!("field {:?}", super::error::shorten(k)))?;
            chunk_sha256.insert(i, v.clone());
        }
    }
    Ok(Manifest {
        version,
        id: get("id")?.clone(),
        state,
        total_bytes: num("total")?,
        chunk_size: num("chunk_size")?,
        chunk_count,
        stored,
        chunk_sha256,
        metadata,
        sha256: f.get("sha256").cloned(),
        created_at: num("created_at")?,
        touched_at: num("touched_at")?,
        expires_at: num("expires_at")?,
        path: f.get("path").cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn base() -> HashMap<String, String> {
        fields(&[
            ("v", "1"),
            ("id", "abc"),
            ("state", "uploading"),
            ("total", "20"),
            ("chunk_size", "2"),
            ("count", "10"),
            ("meta", r#"{"name":"a.bin"}"#),
            ("created_at", "5"),
            ("touched_at", "6"),
            ("expires_at", "7"),
        ])
    }

    #[test]
    fn bitmap_bits_are_numbered_like_setbit() {
        // SETBIT k 0 1, SETBIT k 9 1 -> bytes 0x80 0x40
        let m = manifest_from(&base(), &[0x80, 0x40]).unwrap();
        assert_eq!(m.stored, "1000000001");
        assert_eq!(m.missing(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        // A short bitmap means the chunks past its end are missing.
        let m = manifest_from(&base(), &[]).unwrap();
        assert_eq!(m.stored, "0000000000");
        assert_eq!(m.metadata.get("name").map(String::as_str), Some("a.bin"));
    }

    #[test]
    fn chunk_checksums_and_optional_fields() {
        let mut f = base();
        f.insert("sha:3".into(), "ab".repeat(32));
        f.insert("sha256".into(), "cd".repeat(32));
        let m = manifest_from(&f, &[0x10]).unwrap();
        assert_eq!(m.chunk_sha256.get(&3), Some(&"ab".repeat(32)));
        assert_eq!(m.sha256, Some("cd".repeat(32)));
        assert!(m.path.is_none());
    }

    #[test]
    fn damaged_state_names_the_field() {
        let mut f = base();
        f.insert("total".into(), "lots".into());
        assert!(manifest_from(&f, &[]).unwrap_err().contains("total"));
        let mut f = base();
        f.remove("meta");
        assert!(manifest_from(&f, &[]).unwrap_err().contains("meta"));
        let mut f = base();
        f.insert("state".into(), "exploded".into());
        assert!(manifest_from(&f, &[]).unwrap_err().contains("exploded"));
        let mut f = base();
        f.insert("count".into(), "99999999999".into());
        assert!(manifest_from(&f, &[]).is_err());
    }

    proptest::proptest! {
        /// Whatever another host (or anyone with access to Redis) left in the keys:
        /// an error or a manifest that passes the same check as one read from disk.
        #[test]
        fn arbitrary_state_never_panics(
            mutations in proptest::collection::vec(
                (proptest::sample::select(vec![
                    "v", "id", "state", "total", "chunk_size", "count", "meta",
                    "created_at", "touched_at", "expires_at", "sha256", "path", "sha:0", "sha:x",
                ]), "[-0-9a-z{}\":,]{0,24}"),
                0..6,
            ),
            bits in proptest::collection::vec(proptest::num::u8::ANY, 0..4),
        ) {
            let mut f = base();
            for (k, v) in mutations {
                f.insert(k.to_string(), v);
            }
            if let Ok(m) = manifest_from(&f, &bits) {
                if m.check("abc", "test").is_ok() {
                    proptest::prop_assert_eq!(m.stored.len() as u64, m.chunk_count);
                    proptest::prop_assert!(m.chunk_count * m.chunk_size >= m.total_bytes);
                }
            }
        }
    }

    #[test]
    fn key_expiry_keeps_a_grace_period() {
        assert_eq!(key_expire_ms(0), 0);
        assert_eq!(key_expire_ms(1000), (1000 + KEY_GRACE_S) * 1000);
        assert_eq!(key_expire_ms(u64::MAX), u64::MAX);
    }
}
