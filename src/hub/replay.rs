//! Memory of the Pusher API signatures seen within the accepted clock skew:
//! a signed request is accepted once. Bounded: entries expire with the skew
//! window, and when `cap` unexpired entries are held new requests are refused
//! (429) rather than forgetting one that could then be replayed.

use std::collections::HashMap;

pub(crate) enum Seen {
    /// First time: remembered until the window of its timestamp ends.
    New,
    /// Already accepted once.
    Replay,
    /// The memory is full of unexpired signatures.
    Full,
}

pub(crate) struct Signatures {
    /// First 16 bytes of the HMAC → unix second after which it can no longer be replayed.
    seen: HashMap<u128, i64>,
    cap: usize,
    next_prune: i64,
}

impl Signatures {
    pub fn new(cap: usize) -> Signatures {
        Signatures {
            seen: HashMap::new(),
            cap,
            next_prune: 0,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Records `signature_hex` (already verified) valid until `expires` (unix s).
    pub fn check(&mut self, signature_hex: &str, expires: i64, now: i64) -> Seen {
        if now >= self.next_prune || self.seen.len() >= self.cap {
            self.seen.retain(|_, e| *e >= now);
            self.next_prune = now + 10;
        }
        let key = key(signature_hex);
        match self.seen.get(&key) {
            Some(e) if *e >= now => return Seen::Replay,
            _ => {}
        }
        if self.seen.len() >= self.cap {
            return Seen::Full;
        }
        self.seen.insert(key, expires);
        Seen::New
    }
}

/// 128 bits of the signature: HMAC outputs do not collide by chance.
fn key(signature_hex: &str) -> u128 {
    let b = hex::decode(signature_hex.trim()).unwrap_or_default();
    let mut a = [0u8; 16];
    for (d, s) in a.iter_mut().zip(b.iter()) {
        *d = *s;
    }
    u128::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const B: &str = "ff112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn a_signature_is_accepted_once_within_its_window() {
        let mut s = Signatures::new(10);
        assert!(matches!(s.check(A, 1600, 1000), Seen::New));
        assert!(matches!(s.check(A, 1600, 1000), Seen::Replay));
        assert!(matches!(s.check(A, 1600, 1599), Seen::Replay));
        assert!(matches!(s.check(B, 1600, 1000), Seen::New));
        // After the window the timestamp check refuses it anyway; the entry is pruned.
        s.check(B, 1700, 1611);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn memory_is_bounded_and_refuses_rather_than_forgets() {
        let mut s = Signatures::new(3);
        for i in 0..3u8 {
            let sig = hex::encode([i; 32]);
            assert!(matches!(s.check(&sig, 2000, 1000), Seen::New));
        }
        let sig = hex::encode([9u8; 32]);
        assert!(matches!(s.check(&sig, 2000, 1000), Seen::Full));
        assert!(matches!(
            s.check(&hex::encode([0u8; 32]), 2000, 1000),
            Seen::Replay
        ));
        // Expired entries make room.
        assert!(matches!(s.check(&sig, 3000, 2001), Seen::New));
        assert_eq!(s.len(), 1);
    }
}
