//! Knobs that tests turn down.

use std::time::Duration;

/// Knobs that tests turn down; production uses `Tunables::default()`.
#[derive(Debug, Clone)]
pub(crate) struct Tunables {
    /// Messages queued per connection before it counts as a slow consumer.
    pub queue_cap: usize,
    /// How long a `pusher:ping` may stay unanswered.
    pub pong_timeout: Duration,
    /// How long one write to a client may block.
    pub write_timeout: Duration,
    /// Deadline for the HTTP request head (and body) of a new connection.
    pub handshake_timeout: Duration,
    /// How long the latest event of a channel without subscribers is kept.
    pub retention: Duration,
    /// Period of the sweeper.
    pub sweep_every: Duration,
    /// Closing all connections at shutdown is spread over this long.
    pub close_spread: Duration,
    /// Period of the PING that detects a dead Redis connection.
    pub redis_ping_every: Duration,
    /// Deadline of one Redis command (and of a connect, twice this).
    pub redis_timeout: Duration,
    /// The descriptor limit to plan with (None: the process's soft limit).
    pub fd_limit: Option<u64>,
    /// Count loopback clients per address too (tests; in production loopback
    /// is a proxy on the host).
    pub count_loopback_per_ip: bool,
}

impl Default for Tunables {
    fn default() -> Self {
        Tunables {
            queue_cap: 128,
            pong_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            retention: Duration::from_secs(3600),
            sweep_every: Duration::from_secs(30),
            close_spread: Duration::from_millis(1000),
            redis_ping_every: Duration::from_secs(1),
            redis_timeout: Duration::from_secs(2),
            fd_limit: None,
            count_loopback_per_ip: false,
        }
    }
}
