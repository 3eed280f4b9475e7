//! What one client can hold of the hub's descriptors.
//!
//! Every accepted TCP connection takes a descriptor before the hub knows what
//! it is. So the hub works from its fd limit (the soft limit is raised to the
//! hard one at start): a reserve is kept for what must keep working during a
//! flood (the ingest connections of PHP processes, Redis, the log, the
//! runtime's own descriptors), the rest is the TCP budget. Connections that
//! have not finished their request head / WebSocket handshake ("pending") are
//! capped, and the oldest is closed to make room for a new one, so a flood of
//! idle connections cannot keep `/health` or a browser out. Connections per
//! client address are capped too (loopback excepted: that is a proxy on the
//! host, which must do its own per-client limiting).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::lock;

/// The numbers derived from the fd limit and the directives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    pub fd_limit: u64,
    /// Descriptors never used for TCP clients.
    pub reserve: u64,
    /// TCP connections of all kinds at once.
    pub tcp: usize,
    pub pending: usize,
    /// WebSocket connections.
    pub websockets: u64,
    /// Per client address (0 = no limit).
    pub per_ip: usize,
}

impl Budget {
    /// `max_connections` / `max_pending_handshakes` 0 = derived.
    pub fn derive(fd_limit: u64, max_connections: u64, max_pending: u64, per_ip: u64) -> Budget {
        let reserve = (fd_limit / 8).max(24);
        let tcp = fd_limit.saturating_sub(reserve).max(4);
        let pending = if max_pending > 0 {
            max_pending.min(tcp)
        } else {
            (tcp / 4).clamp(4, 1024)
        };
        let derived_ws = tcp.saturating_sub(pending).max(1);
        let websockets = if max_connections > 0 {
            max_connections.min(derived_ws)
        } else {
            derived_ws
        };
        Budget {
            fd_limit,
            reserve,
            tcp: usize::try_from(tcp).unwrap_or(usize::MAX),
            pending: usize::try_from(pending).unwrap_or(usize::MAX),
            websockets,
            per_ip: usize::try_from(per_ip).unwrap_or(usize::MAX),
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now.
pub(crate) fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit write/read the struct given.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        if r.rlim_cur == libc::RLIM_INFINITY {
            1 << 20
        } else {
            r.rlim_cur
        }
    }
}

/// The soft RLIMIT_NOFILE as it is.
pub(crate) fn fd_limit() -> u64 {
    // SAFETY: getrlimit writes the struct given.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur == libc::RLIM_INFINITY {
            1 << 20
        } else {
            r.rlim_cur
        }
    }
}

pub(crate) struct Limits {
    pub budget: Budget,
    /// Loopback clients count per address too (tests).
    count_loopback: bool,
    inner: Mutex<Inner>,
    /// A slot was released.
    freed: Notify,
}

#[derive(Default)]
struct Inner {
    open: usize,
    next: u64,
    /// Pending connections, oldest first: id → (address, eviction signal).
    pending: BTreeMap<u64, (IpAddr, Arc<Notify>)>,
    per_ip: HashMap<IpAddr, usize>,
}

pub(crate) enum Admit {
    Ok(Slot),
    /// Room is being made (an old pending connection was told to close).
    Wait,
    /// No room: close the new connection.
    Refuse(&'static str),
}

/// One admitted TCP connection; released on drop.
pub(crate) struct Slot {
    limits: Arc<Limits>,
    id: u64,
    ip: Option<IpAddr>,
    evict: Arc<Notify>,
}

impl Slot {
    /// Resolves when the connection must close to make room.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }

    /// The handshake is done: no longer pending (and no longer evictable).
    pub fn established(&self) {
        lock(&self.limits.inner).pending.remove(&self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = lock(&self.limits.inner);
        g.open = g.open.saturating_sub(1);
        g.pending.remove(&self.id);
        if let Some(ip) = self.ip {
            if let Some(n) = g.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    g.per_ip.remove(&ip);
                }
            }
        }
        drop(g);
        self.limits.freed.notify_one();
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl Limits {
    pub fn new(budget: Budget, count_loopback: bool) -> Arc<Limits> {
        Arc::new(Limits {
            budget,
            count_loopback,
            inner: Mutex::new(Inner::default()),
            freed: Notify::new(),
        })
    }

    /// Waits until a slot is released (or `max` passed).
    pub async fn wait_freed(&self, max: std::time::Duration) {
        let _ = tokio::time::timeout(max, self.freed.notified()).await;
    }

    /// TCP connections open and pending ones.
    pub fn counts(&self) -> (usize, usize) {
        let g = lock(&self.inner);
        (g.open, g.pending.len())
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Admit {
        let b = self.budget;
        let mut g = lock(&self.inner);
        let counted = b.per_ip > 0 && (self.count_loopback || !is_loopback(ip));
        if counted && g.per_ip.get(&ip).copied().unwrap_or(0) >= b.per_ip {
            let oldest = g
                .pending
                .iter()
                .find(|(_, (a, _))| *a == ip)
                .map(|(id, _)| *id);
            return match oldest {
                Some(id) => {
                    evict(&mut g, id);
                    Admit::Wait
                }
                None => Admit::Refuse("too many connections from this address"),
            };
        }
        if g.open >= b.tcp {
            return match g.pending.keys().next().copied() {
                Some(id) => {
                    evict(&mut g, id);
                    Admit::Wait
                }
                None => Admit::Refuse("no descriptor left for TCP clients"),
            };
        }
        if g.pending.len() >= b.pending {
            if let Some(id) = g.pending.keys().next().copied() {
                evict(&mut g, id);
            }
        }
        g.next += 1;
        let id = g.next;
        let evict = Arc::new(Notify::new());
        g.pending.insert(id, (ip, evict.clone()));
        g.open += 1;
        if counted {
            *g.per_ip.entry(ip).or_insert(0) += 1;
        }
        drop(g);
        Admit::Ok(Slot {
            limits: self.clone(),
            id,
            ip: counted.then_some(ip),
            evict,
        })
    }
}

/// Tells pending connection `id` to close; it no longer counts as pending
/// (its descriptor counts until it is closed).
fn evict(g: &mut Inner, id: u64) {
    if let Some((_, n)) = g.pending.remove(&id) {
        n.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_from_fd_limits() {
        let b = Budget::derive(64, 0, 0, 256);
        assert_eq!(
            (b.reserve, b.tcp, b.pending, b.websockets),
            (24, 40, 10, 30)
        );
        let b = Budget::derive(1024, 0, 0, 0);
        assert_eq!(
            (b.reserve, b.tcp, b.pending, b.websockets),
            (128, 896, 224, 672)
        );
        let b = Budget::derive(1 << 20, 0, 0, 0);
        assert_eq!(
            (b.pending, b.websockets),
            (1024, (1 << 20) - (1 << 17) - 1024)
        );
        // Configured values are kept within what the descriptors allow.
        let b = Budget::derive(1024, 100, 16, 0);
        assert_eq!((b.pending, b.websockets), (16, 100));
        let b = Budget::derive(64, 5000, 0, 0);
        assert_eq!(b.websockets, 30);
        // Never zero, even with an absurd limit.
        let b = Budget::derive(8, 0, 0, 0);
        assert!(b.tcp >= 4 && b.pending >= 1 && b.websockets >= 1);
    }

    #[test]
    fn the_oldest_pending_connection_makes_room() {
        let l = Limits::new(Budget::derive(64, 0, 0, 0), false);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut slots = Vec::new();
        for _ in 0..10 {
            match l.admit(ip) {
                Admit::Ok(s) => slots.push(s),
                _ => panic!("refused"),
            }
        }
        assert_eq!(l.counts(), (10, 10));
        // The 11th evicts the first (pending cap 10).
        let Admit::Ok(s) = l.admit(ip) else { panic!() };
        slots.push(s);
        assert_eq!(l.counts(), (11, 10));
        let first = slots.remove(0);
        assert!(futures_util::FutureExt::now_or_never(first.evicted()).is_some());
        drop(first);
        assert_eq!(l.counts(), (10, 10));
        // Established connections are never evicted; when the TCP budget is
        // all established, new connections are refused.
        for s in &slots {
            s.established();
        }
        while l.counts().0 < 40 {
            let Admit::Ok(s) = l.admit(ip) else { panic!() };
            s.established();
            slots.push(s);
        }
        assert!(matches!(l.admit(ip), Admit::Refuse(_)));
        drop(slots.pop());
        assert!(matches!(l.admit(ip), Admit::Ok(_)));
    }

    #[test]
    fn per_address_cap_evicts_that_address_only() {
        let l = Limits::new(Budget::derive(1024, 0, 0, 3), false);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let other = match l.admit(b) {
            Admit::Ok(s) => s,
            _ => panic!(),
        };
        let mut held: Vec<Slot> = (0..3)
            .map(|_| match l.admit(a) {
                Admit::Ok(s) => s,
                _ => panic!(),
            })
            .collect();
        // The 4th from `a` evicts a's oldest pending, not b's.
        assert!(matches!(l.admit(a), Admit::Wait));
        assert!(futures_util::FutureExt::now_or_never(other.evict.notified()).is_none());
        drop(held.remove(0));
        assert!(matches!(l.admit(a), Admit::Ok(_)));
        for s in &held {
            s.established();
        }
        // All of a's connections established: refused.
        let third = match l.admit(a) {
            Admit::Ok(s) => s,
            _ => panic!(),
        };
        third.established();
        assert!(matches!(l.admit(a), Admit::Refuse(_)));
        // Loopback is not counted per address.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo_slots: Vec<_> = (0..5).map(|_| l.admit(lo)).collect();
        assert!(lo_slots.iter().all(|s| matches!(s, Admit::Ok(_))));
    }
}
