//! Functions of the `UploadProgress` namespace.
// PHP parameter names are camelCase (named arguments use them).
#![allow(non_snake_case)]

use crate::php::convert::{object_to_hashtable, write_json};
use crate::php::errors::{invalid_argument, value_error};
use crate::php::{ini, recorder};
use crate::protocol::ingest::IngestMessage;
use crate::protocol::pusher;
use crate::recorder::client::QueryError;
use crate::recorder::spawn;
use ext_php_rs::boxed::ZBox;
use ext_php_rs::prelude::*;
use ext_php_rs::types::{ZendHashTable, Zval};
use std::time::Duration;

/// Largest `data` of one event, as Pusher allows.
pub const MAX_EVENT_DATA: usize = 10 * 1024;

/// Adds this module's functions (the macro's wrappers are private to it).
pub fn register(builder: ModuleBuilder<'_>) -> ModuleBuilder<'_> {
    builder
        .function(wrap_function!(version))
        .function(wrap_function!(publish))
        .function(wrap_function!(auth))
        .function(wrap_function!(progress))
        .function(wrap_function!(hub_status))
}

/// Semver of the extension.
#[php_function]
#[php(name = "UploadProgress\\version")]
pub fn version() -> &'static str {
    recorder::VERSION
}

/// Queues an event for every subscriber of `$channel`; false when dropped.
/// Never blocks. `$data` is a string (sent as is) or an array (sent as JSON).
#[php_function]
#[php(name = "UploadProgress\\publish")]
pub fn publish(channel: &str, event: &str, data: &Zval) -> PhpResult<bool> {
    pusher::validate_channel(channel).map_err(value_error)?;
    pusher::validate_event(event).map_err(value_error)?;
    let mut json;
    let text = if let Some(s) = data.str() {
        s
    } else if data.is_array() {
        json = Vec::with_capacity(256);
        write_json(data, &mut json).map_err(|e| value_error(e.to_string()))?;
        // serde_json writes UTF-8 only (every string and key was checked).
        std::str::from_utf8(&json).map_err(|e| value_error(format!("publish(): {e}")))?
    } else {
        return Err(value_error(format!(
            "publish(): data must be an array or a string, {:?} given",
            data.get_type()
        )));
    };
    if text.len() > MAX_EVENT_DATA {
        return Err(value_error(format!(
            "publish(): data of {} bytes exceeds the limit of {MAX_EVENT_DATA} bytes",
            text.len()
        )));
    }
    Ok(recorder::publish(channel, event, text))
}

/// The body a Pusher auth endpoint returns for this socket and channel.
#[php_function]
#[php(name = "UploadProgress\\auth")]
pub fn auth(socketId: &str, channel: &str, channelData: Option<&str>) -> PhpResult<String> {
    let cfg = ini::config();
    if cfg.app_secret.is_empty() {
        return Err(invalid_argument(match crate::secret::last_error() {
            Some(why) => format!("auth(): no app secret: {why}"),
            None => format!(
                "auth(): no app secret: set upload_progress.app_secret or make {} writable",
                cfg.storage_dir.display()
            ),
        }));
    }
    pusher::channel_auth(
        &cfg.app_key,
        &cfg.app_secret,
        socketId,
        channel,
        channelData,
    )
    .map_err(invalid_argument)
}

fn query_json(msg: &IngestMessage) -> Result<serde_json::Value, QueryError> {
    let body = recorder::query(msg, Duration::from_millis(250))?;
    if body.is_empty() {
        return Err(QueryError::NoAnswer);
    }
    serde_json::from_slice(&body).map_err(|_| QueryError::NoAnswer)
}

/// Latest event data of an upload as the hub knows it; null when unknown.
#[php_function]
#[php(name = "UploadProgress\\progress")]
pub fn progress(uploadId: &str) -> Option<ZBox<ZendHashTable>> {
    if !crate::recorder::valid_progress_id(uploadId) {
        return None;
    }
    match query_json(&IngestMessage::QueryProgress {
        upload_id: uploadId.to_owned(),
    })
    .ok()?
    {
        serde_json::Value::Object(map) => Some(object_to_hashtable(&map)),
        _ => None,
    }
}

/// State of this host's hub.
#[php_function]
#[php(name = "UploadProgress\\hub_status")]
pub fn hub_status() -> ZBox<ZendHashTable> {
    status_map().map_or_else(ZendHashTable::new, |m| object_to_hashtable(&m))
}

/// The hub's answer, completed with what this process knows when no hub answers.
pub fn status_map() -> Option<serde_json::Map<String, serde_json::Value>> {
    use serde_json::{json, Value};
    let cfg = ini::config();
    let local_dropped = recorder::dropped();
    let answer = query_json(&IngestMessage::QueryStatus);
    let mut map = match &answer {
        Ok(Value::Object(m)) => m.clone(),
        _ => {
            let Value::Object(m) = json!({
                "running": false,
                "pid": null,
                "connections": 0,
                "channels": 0,
                "uptime_s": 0,
                "version": recorder::VERSION,
                "events_dropped": 0,
            }) else {
                return None;
            };
            m
        }
    };
    if let Err(QueryError::Foreign(uid)) = answer {
        // Another user's process squats the socket name: say who, ask nothing.
        map.insert("error".into(), json!(recorder::foreign_message(uid)));
        map.insert("foreign_uid".into(), json!(uid));
    }
    let running = map.get("running").and_then(Value::as_bool) == Some(true);
    if !running {
        // Why no hub runs and when a worker tries again (per host, see spawn.rs).
        if let Some(st) = recorder::spawn_state() {
            let now = spawn::now_ms();
            map.insert(
                "spawn_error".into(),
                if st.reason.is_empty() {
                    Value::Null
                } else {
                    json!(st.reason)
                },
            );
            map.insert("next_spawn_in_s".into(), json!(st.next_spawn_in_s(now)));
            map.insert("spawn_attempts".into(), json!(st.failures));
        }
    }
    map.insert("listen".into(), json!(cfg.listen));
    map.insert("hub_socket".into(), json!(cfg.hub_socket));
    map.insert("mode".into(), json!(cfg.hub.as_str()));
    if !cfg.redis_url.is_empty() {
        map.insert(
            "redis_url".into(),
            json!(crate::redis_url::redacted_list(&cfg.redis_url)),
        );
    }
    let hub_dropped = map
        .get("events_dropped")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    map.insert("events_dropped".into(), json!(hub_dropped + local_dropped));
    map.insert("events_dropped_here".into(), json!(local_dropped));
    // Progress replaced by a newer one while the hub was not reading: not lost.
    map.insert("events_coalesced_here".into(), json!(recorder::coalesced()));
    // Whatever the hub said, no credential leaves through this array.
    for v in map.values_mut() {
        if let Value::String(s) = v {
            let clean = crate::redis_url::scrub(s, &cfg.redis_url, &cfg.app_secret);
            if clean != *s {
                *s = clean;
            }
        }
    }
    Some(map)
}
