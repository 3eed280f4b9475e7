//! Upload ids: 26 characters of `[0-9a-z]`, made from 128 random bits.

use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Length of every upload id.
pub const ID_LEN: usize = 26;

const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// True when `id` is exactly 26 characters of `[0-9a-z]`. Only such ids ever reach the
/// filesystem, so an id can never name a path outside the store (`..`, `/`, NUL, ...).
pub fn valid_id(id: &str) -> bool {
    id.len() == ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// A new upload id: 128 random bits from the OS (getrandom), in base 36, left-padded with `0`
/// to 26 characters (2^128 needs 25 base-36 digits, so the first character is always `0`).
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::getrandom(&mut bytes).is_err() {
        // The getrandom syscall does not fail on a supported Linux; should it anyway, do not
        // panic inside PHP: derive the bits from time, pid, a counter and a stack address.
        bytes = fallback_bits();
    }
    encode(u128::from_le_bytes(bytes))
}

fn encode(mut n: u128) -> String {
    let mut out = [b'0'; ID_LEN];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    out.iter().map(|&b| char::from(b)).collect()
}

fn fallback_bits() -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let local = 0u8;
    let mut h = Sha256::new();
    h.update(now.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update((&local as *const u8 as usize).to_le_bytes());
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert!(valid_id(&a), "{a}");
        assert!(valid_id(&b), "{b}");
        assert_ne!(a, b);
        assert_eq!(encode(u128::MAX), "0f5lxx1zz5pnorynqglhzmsp33");
        assert_eq!(encode(0), "0".repeat(26));
        assert!(valid_id(&encode(u128::from_le_bytes(fallback_bits()))));
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "",
            "../etc",
            "0123456789abcdefghijklmnoP",
            "0123456789abcdefghijklmno",
            "0123456789abcdefghijklmnopq",
            "0123456789abcdefghijklmn/.",
            "0123456789abcdefghijklmnö",
            "0123456789abcdefghijklmn\0a",
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(valid_id("0123456789abcdefghijklmnop"));
    }
}
