//! Conversions between PHP values and JSON, written straight into buffers.

use ext_php_rs::boxed::ZBox;
use ext_php_rs::flags::DataType;
use ext_php_rs::types::{ArrayKey, ZendHashTable, ZendStr, Zval};
use serde_json::Value;

/// zend_hash.h: the array stores bare zvals indexed 0..n (no keys).
const HASH_FLAG_PACKED: u32 = 1 << 2;

/// A key of a PHP array, borrowed from the array itself.
enum Key<'a> {
    Index(u64),
    Name(&'a [u8]),
}

/// Walks the slots of a `zend_array` in order, borrowing keys instead of
/// copying them (ext-php-rs's iterator hands out every key as a new String,
/// which was a fifth of publish()'s time).
struct Entries<'a> {
    ht: &'a ZendHashTable,
    pos: u32,
    packed: bool,
}

impl<'a> Entries<'a> {
    fn new(ht: &'a ZendHashTable) -> Self {
        // SAFETY: reading the flags word of a live array.
        let flags = unsafe { ht.u.flags };
        Entries {
            ht,
            pos: 0,
            packed: flags & HASH_FLAG_PACKED != 0,
        }
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = (Key<'a>, &'a Zval);

    fn next(&mut self) -> Option<Self::Item> {
        while self.pos < self.ht.nNumUsed {
            let i = self.pos as usize;
            self.pos += 1;
            // SAFETY: slots 0..nNumUsed of a live array are initialised; deleted
            // ones are IS_UNDEF and skipped. The array outlives the borrow.
            unsafe {
                if self.packed {
                    let zv: &'a Zval = &*self.ht.__bindgen_anon_1.arPacked.add(i);
                    if zv.get_type() != DataType::Undef {
                        return Some((Key::Index(i as u64), zv));
                    }
                } else {
                    let bucket = &*self.ht.__bindgen_anon_1.arData.add(i);
                    if bucket.val.get_type() == DataType::Undef {
                        continue;
                    }
                    let key = if bucket.key.is_null() {
                        Key::Index(bucket.h)
                    } else {
                        Key::Name((*bucket.key.cast::<ZendStr>()).as_bytes())
                    };
                    return Some((key, &bucket.val));
                }
            }
        }
        None
    }
}

/// `json_encode`'s rule: a list is an array whose keys are 0, 1, 2, ... in order.
fn is_list(ht: &ZendHashTable) -> bool {
    Entries::new(ht)
        .enumerate()
        .all(|(i, (k, _))| matches!(k, Key::Index(n) if n == i as u64))
}

/// Appends the JSON text of a PHP value (like `json_encode` with
/// JSON_UNESCAPED_SLASHES): lists become arrays, other arrays objects.
pub fn write_json(zv: &Zval, out: &mut String, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Err("data is nested deeper than 64 levels".into());
    }
    let zv = zv.dereference();
    let zv = zv.indirect().unwrap_or(zv);
    if zv.is_null() {
        out.push_str("null");
    } else if let Some(b) = zv.bool() {
        out.push_str(if b { "true" } else { "false" });
    } else if let Some(n) = zv.long() {
        out.push_str(itoa::Buffer::new().format(n));
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
        let list = is_list(ht);
        out.push(if list { '[' } else { '{' });
        for (i, (key, value)) in Entries::new(ht).enumerate() {
            if i > 0 {
                out.push(',');
            }
            if !list {
                match key {
                    Key::Index(n) => {
                        out.push('"');
                        // Integer keys are signed in PHP.
                        out.push_str(itoa::Buffer::new().format(n as i64));
                        out.push('"');
                    }
                    Key::Name(bytes) => match std::str::from_utf8(bytes) {
                        Ok(k) => write_json_str(k, out),
                        Err(_) => return Err("data holds a key that is not valid UTF-8".into()),
                    },
                }
                out.push(':');
            }
            write_json(value, out, depth + 1)?;
        }
        out.push(if list { ']' } else { '}' });
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
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(HEX[(c as usize) >> 4] as char);
                out.push(HEX[(c as usize) & 0xf] as char);
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
