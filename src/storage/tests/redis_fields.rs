//! The Redis field codec: bit numbering, optional fields, damaged state.

use super::*;
use crate::storage::redis_fields::{key_expire_ms, manifest_from};
use std::collections::HashMap;

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
