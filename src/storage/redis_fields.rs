//! The upload state as Redis keeps it (see `redis_state`): the fields of the upload's hash
//! and the bitmap of stored chunks, to and from a [`Manifest`]. The metadata field is JSON
//! (serde).

use super::error::{shorten, StorageError};
use super::limits::MAX_CHUNK_COUNT;
use super::manifest::{Manifest, UploadState, FORMAT_VERSION};
use super::redis_state::KEY_GRACE_S;
use redis::Value;
use std::collections::{BTreeMap, HashMap};

/// The hash fields of a new upload, as `HSET` arguments (field, value, ...).
pub(crate) fn fields_of(m: &Manifest) -> Result<Vec<String>, StorageError> {
    let meta = serde_json::to_string(&m.metadata)
        .map_err(|e| StorageError::Io(format!("encoding the metadata of {}: {e}", m.id)))?;
    let mut args = Vec::new();
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
    Ok(args)
}

/// Unix seconds of expiry to the keys' PEXPIREAT in milliseconds (0 = never).
pub(crate) fn key_expire_ms(expires_at: u64) -> u64 {
    if expires_at == 0 {
        0
    } else {
        expires_at.saturating_add(KEY_GRACE_S).saturating_mul(1000)
    }
}

pub(crate) fn state_name(s: UploadState) -> &'static str {
    match s {
        UploadState::Uploading => "uploading",
        UploadState::Complete => "complete",
        UploadState::Aborted => "aborted",
    }
}

pub(crate) fn parse_state(s: &str) -> Option<UploadState> {
    match s {
        "uploading" => Some(UploadState::Uploading),
        "complete" => Some(UploadState::Complete),
        "aborted" => Some(UploadState::Aborted),
        _ => None,
    }
}

/// HGETALL as RESP2 (flat array) or RESP3 (map).
pub(crate) fn hash_fields(v: Value) -> Option<HashMap<String, String>> {
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
            .map_err(|_| format!("field {k} is {:?}, not a number", shorten(v)))
    };
    let version = u32::try_from(num("v")?).map_err(|_| "field v is out of range".to_string())?;
    let state = get("state")?;
    let state = parse_state(state).ok_or_else(|| format!("state {:?}", shorten(state)))?;
    let chunk_count = num("count")?;
    if chunk_count > MAX_CHUNK_COUNT {
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
                .map_err(|_| format!("field {:?}", shorten(k)))?;
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
