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

use super::backend::{AbortOutcome, Completed, MakeDurable, Mark, StateBackend};
use super::error::StorageError;
use super::locks::LockFile;
use super::manifest::{Manifest, UploadState};
use super::redis_fields::{fields_of, hash_fields, key_expire_ms, manifest_from, parse_state};
use super::root::{Dir, Root};
use crate::redis_url::RedisSettings;
use redis::{ConnectionLike, RedisError, Script, Value};
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
}

/// The upload state in Redis: the same state changes as the manifest files, each one Lua
/// script, so no manifest lock is needed for a mark.
impl StateBackend for RedisState {
    /// The state of upload `id`, `None` when Redis has none.
    fn load(&self, _root: &Root, id: &str) -> Result<Option<Manifest>, StorageError> {
        let v = self.run(id, "reading", &self.scripts.load, &[])?;
        let (_, m) = self.snapshot(id, v)?;
        Ok(m)
    }

    /// Stores a new upload's state, last: the upload exists for other hosts only once its
    /// files do.
    fn create(
        &self,
        _dir: &Dir,
        m: &Manifest,
        make_durable: MakeDurable,
    ) -> Result<(), StorageError> {
        make_durable()?;
        let mut args = vec![
            key_expire_ms(m.expires_at).to_string(),
            m.chunk_count.to_string(),
        ];
        args.extend(fields_of(m)?);
        // 0 ("exists") can only be this call's own first attempt whose reply was
        // lost: ids carry 128 random bits and their directory was just made.
        self.run(&m.id, "creating", &self.scripts.create, &args)
            .map(drop)
    }

    /// Marks chunk `index` stored (when the upload is live and uploading) and
    /// returns the state after it; `None` when the upload is gone.
    fn mark(
        &self,
        _dir: &Dir,
        lock: &LockFile,
        mark: Mark,
    ) -> Result<Option<Manifest>, StorageError> {
        let id = lock.id();
        let args = [
            mark.now.to_string(),
            mark.index.to_string(),
            mark.sha256.unwrap_or_default(),
            mark.expires_at.to_string(),
            key_expire_ms(mark.expires_at).to_string(),
        ];
        let v = self.run(id, "marking a chunk of", &self.scripts.mark, &args)?;
        Ok(self.snapshot(id, v)?.1)
    }

    /// Records completion; `Missing` when Redis misses marks the caller saw (lost by a
    /// Redis restart without persistence).
    fn complete(&self, _dir: &Dir, m: Manifest) -> Result<Completed, StorageError> {
        let args = [
            m.touched_at.to_string(),
            m.path.clone().unwrap_or_default(),
            m.expires_at.to_string(),
            key_expire_ms(m.expires_at).to_string(),
            m.chunk_count.to_string(),
        ];
        let v = self.run(&m.id, "completing", &self.scripts.complete, &args)?;
        Ok(match self.snapshot(&m.id, v)? {
            (2, Some(m)) => Completed::Missing(m),
            (_, Some(m)) => Completed::Done(m),
            (_, None) => Completed::Gone,
        })
    }

    fn abort(&self, _dir: &Dir, id: &str, now: u64) -> Result<AbortOutcome, StorageError> {
        match self.run(id, "aborting", &self.scripts.abort, &[now.to_string()])? {
            Value::Int(1) => Ok(AbortOutcome::Removed),
            Value::Int(2) => Ok(AbortOutcome::WasExpired),
            _ => Ok(AbortOutcome::Unknown),
        }
    }

    /// Removes the state of an expired upload; the state it had, `None` when
    /// it is live (touched meanwhile) or already gone.
    fn expire(&self, _dir: &Dir, id: &str, now: u64) -> Result<Option<UploadState>, StorageError> {
        match self.run(id, "expiring", &self.scripts.expire, &[now.to_string()])? {
            Value::BulkString(s) => Ok(parse_state(&String::from_utf8_lossy(&s))),
            Value::SimpleString(s) => Ok(parse_state(&s)),
            _ => Ok(None),
        }
    }
}

impl RedisState {
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
