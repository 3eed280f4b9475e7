//! Conversions between PHP values and JSON: arrays are walked in place and fed to serde.

use ext_php_rs::boxed::ZBox;
use ext_php_rs::flags::DataType;
use ext_php_rs::types::{ArrayKey, ZendHashTable, ZendStr, Zval};
use serde::ser::{Error as _, SerializeMap, SerializeSeq, Serializer};
use serde::Serialize;
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

/// Deepest nesting publish() accepts (json_encode's default is 512; events are small).
const MAX_DEPTH: usize = 64;

/// A PHP value as serde sees it: arrays are walked in place (borrowed keys and values),
/// and serde_json writes the text. Lists become JSON arrays, other arrays objects, as
/// `json_encode` with JSON_UNESCAPED_SLASHES.
pub struct PhpJson<'a> {
    zv: &'a Zval,
    depth: usize,
}

impl<'a> PhpJson<'a> {
    pub fn new(zv: &'a Zval) -> Self {
        PhpJson { zv, depth: 0 }
    }
}

/// An integer key of a PHP array as a JSON object key (signed in PHP).
struct IntKey(i64);

impl Serialize for IntKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(itoa::Buffer::new().format(self.0))
    }
}

impl Serialize for PhpJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.depth > MAX_DEPTH {
            return Err(S::Error::custom("data is nested deeper than 64 levels"));
        }
        let zv = self.zv.dereference();
        let zv = zv.indirect().unwrap_or(zv);
        if zv.is_null() {
            s.serialize_unit()
        } else if let Some(b) = zv.bool() {
            s.serialize_bool(b)
        } else if let Some(n) = zv.long() {
            s.serialize_i64(n)
        } else if let Some(f) = zv.double() {
            if !f.is_finite() {
                return Err(S::Error::custom(format!(
                    "data holds the non-finite number {f}"
                )));
            }
            s.serialize_f64(f)
        } else if let Some(text) = zv.str() {
            s.serialize_str(text)
        } else if zv.is_string() {
            Err(S::Error::custom(
                "data holds a string that is not valid UTF-8",
            ))
        } else if let Some(ht) = zv.array() {
            let depth = self.depth + 1;
            let len = Some(ht.len());
            if is_list(ht) {
                let mut seq = s.serialize_seq(len)?;
                for (_, zv) in Entries::new(ht) {
                    seq.serialize_element(&PhpJson { zv, depth })?;
                }
                seq.end()
            } else {
                let mut map = s.serialize_map(len)?;
                for (key, zv) in Entries::new(ht) {
                    match key {
                        Key::Index(n) => map.serialize_key(&IntKey(n as i64))?,
                        Key::Name(bytes) => match std::str::from_utf8(bytes) {
                            Ok(k) => map.serialize_key(k)?,
                            Err(_) => {
                                return Err(S::Error::custom(
                                    "data holds a key that is not valid UTF-8",
                                ))
                            }
                        },
                    }
                    map.serialize_value(&PhpJson { zv, depth })?;
                }
                map.end()
            }
        } else {
            Err(S::Error::custom(format!(
                "data holds a value of type {:?} that cannot be JSON",
                zv.get_type()
            )))
        }
    }
}

/// Appends the JSON text of a PHP value to `out`.
pub fn write_json(zv: &Zval, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    PhpJson::new(zv).serialize(&mut serde_json::Serializer::new(out))
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
