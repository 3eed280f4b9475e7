//! Conversions between PHP values and JSON, written straight into buffers.

use ext_php_rs::boxed::ZBox;
use ext_php_rs::types::{ArrayKey, ZendHashTable, Zval};
use serde_json::Value;
use std::fmt::Write;

/// Appends the JSON text of a PHP value (like `json_encode` with
/// JSON_UNESCAPED_SLASHES): lists become arrays, other arrays objects.
pub fn write_json(zv: &Zval, out: &mut String, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Err("data is nested deeper than 64 levels".into());
    }
    if zv.is_null() {
        out.push_str("null");
    } else if let Some(b) = zv.bool() {
        out.push_str(if b { "true" } else { "false" });
    } else if let Some(n) = zv.long() {
        let _ = write!(out, "{n}");
    } else if let Some(f) = zv.double() {
        if !f.is_finite() {
            return Err(format!("data holds the non-finite number {f}"));
        }
        out.push_str(&serde_json::Number::from_f64(f).map_or("0".into(), |n| n.to_string()));
    } else if let Some(s) = zv.str() {
        write_json_str(s, out);
    } else if zv.is_string() {
        return Err("data holds a string that is not valid UTF-8".into());
    } else if let Some(ht) = zv.array() {
        let is_list = ht.has_sequential_keys();
        out.push(if is_list { '[' } else { '{' });
        for (i, (key, value)) in ht.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            if !is_list {
                match key {
                    ArrayKey::Long(n) => {
                        let _ = write!(out, "\"{n}\"");
                    }
                    ArrayKey::Str(k) => write_json_str(k, out),
                    other => write_json_str(&key_string(other), out),
                }
                out.push(':');
            }
            write_json(value, out, depth + 1)?;
        }
        out.push(if is_list { ']' } else { '}' });
    } else {
        return Err(format!(
            "data holds a value of type {:?} that cannot be JSON",
            zv.get_type()
        ));
    }
    Ok(())
}

fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// An array key as text (integer keys in decimal).
pub fn key_string(key: ArrayKey<'_>) -> String {
    match key {
        ArrayKey::Long(n) => n.to_string(),
        ArrayKey::String(s) => s,
        ArrayKey::Str(s) => s.to_owned(),
        ArrayKey::ZendString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
    }
}

/// A JSON value as a PHP value (objects become associative arrays).
pub fn json_to_zval(v: &Value) -> Zval {
    let mut zv = Zval::new();
    match v {
        Value::Null => zv.set_null(),
        Value::Bool(b) => zv.set_bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                zv.set_long(i);
            } else {
                zv.set_double(n.as_f64().unwrap_or(0.0));
            }
        }
        Value::String(s) => {
            let _ = zv.set_string(s, false);
        }
        Value::Array(items) => {
            let mut ht = ZendHashTable::with_capacity(items.len().min(u32::MAX as usize) as u32);
            for item in items {
                let _ = ht.push(json_to_zval(item));
            }
            zv.set_hashtable(ht);
        }
        Value::Object(map) => zv.set_hashtable(object_to_hashtable(map)),
    }
    zv
}

pub fn object_to_hashtable(map: &serde_json::Map<String, Value>) -> ZBox<ZendHashTable> {
    let mut ht = ZendHashTable::with_capacity(map.len().min(u32::MAX as usize) as u32);
    for (k, v) in map {
        let _ = ht.insert(k.as_str(), json_to_zval(v));
    }
    ht
}
