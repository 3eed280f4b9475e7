//! Frames waiting for room in the socket to the hub (per process, in order). Progress
//! frames of one upload stream or one channel replace each other (the latest wins: counted
//! as coalesced, not lost); terminal frames (`StreamEnd`, `complete`, `aborted`,
//! `failed`) are kept in order up to a hard bound; other frames up to a softer one.

use std::collections::VecDeque;

/// Bytes of non-terminal frames the queue holds before new ones are dropped.
pub const SOFT_BYTES: usize = 1 << 20;
/// Bytes of all frames the queue holds before even a terminal frame is dropped.
pub const HARD_BYTES: usize = 4 << 20;

/// What a frame is, as far as queueing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class<'a> {
    /// Replaces a queued progress frame of the same `key` (upload id or channel) and
    /// `stream` (0 for publish()), unless a kept frame of that key stands after it.
    Progress { key: &'a str, stream: u64 },
    /// Kept in order; `terminal` frames may use the queue up to `HARD_BYTES`.
    Keep { key: &'a str, terminal: bool },
}

/// The class of a publish() frame: `progress` events coalesce per channel.
pub fn publish_class<'a>(channel: &'a str, event: &str) -> Class<'a> {
    if event == "progress" {
        Class::Progress {
            key: channel,
            stream: 0,
        }
    } else {
        Class::Keep {
            key: channel,
            terminal: matches!(event, "complete" | "aborted" | "failed"),
        }
    }
}

#[derive(Debug)]
struct Entry {
    frame: Vec<u8>,
    key: String,
    /// `Some(stream)` for a progress frame that may still be replaced.
    progress: Option<u64>,
}

/// What `push` did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// It replaced an older progress frame (one coalesced).
    Coalesced,
    /// Over the bound: dropped.
    Dropped,
}

#[derive(Debug, Default)]
pub struct Queue {
    entries: VecDeque<Entry>,
    /// Bytes of the front entry already written to the socket: it is committed to the
    /// stream (its tail must follow) and is never replaced.
    front_sent: usize,
    bytes: usize,
}

impl Queue {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn push(&mut self, frame: &[u8], class: Class<'_>) -> Pushed {
        let (key, progress, limit) = match class {
            Class::Progress { key, stream } => (key, Some(stream), SOFT_BYTES),
            Class::Keep { key, terminal } => {
                (key, None, if terminal { HARD_BYTES } else { SOFT_BYTES })
            }
        };
        if let Some(stream) = progress {
            // The newest frame of this key decides: a progress frame of the same stream is
            // replaced in place; a kept frame (e.g. StreamEnd) after it is a barrier.
            let first_free = usize::from(self.front_sent > 0);
            if let Some(i) = self.entries.iter().rposition(|e| e.key == key) {
                let e = &mut self.entries[i];
                if i >= first_free && e.progress == Some(stream) {
                    self.bytes = self.bytes - e.frame.len() + frame.len();
                    e.frame.clear();
                    e.frame.extend_from_slice(frame);
                    return Pushed::Coalesced;
                }
            }
        }
        if self.bytes + frame.len() > limit {
            return Pushed::Dropped;
        }
        self.bytes += frame.len();
        self.entries.push_back(Entry {
            frame: frame.to_vec(),
            key: key.to_owned(),
            progress,
        });
        Pushed::Queued
    }

    /// A frame of which the socket took `sent` bytes (the queue is empty): the rest must
    /// follow whatever the bounds.
    pub fn push_sent(&mut self, frame: &[u8], sent: usize, class: Class<'_>) {
        let (key, progress) = match class {
            Class::Progress { key, stream } => (key, Some(stream)),
            Class::Keep { key, .. } => (key, None),
        };
        self.bytes += frame.len();
        self.front_sent = sent;
        self.entries.push_back(Entry {
            frame: frame.to_vec(),
            key: key.to_owned(),
            progress,
        });
    }

    /// The unsent rest of the front frame.
    pub fn front(&self) -> Option<&[u8]> {
        self.entries.front().map(|e| &e.frame[self.front_sent..])
    }

    /// `n` more bytes of the front frame went out.
    pub fn advance(&mut self, n: usize) {
        let Some(front) = self.entries.front() else {
            return;
        };
        self.front_sent += n;
        if self.front_sent >= front.frame.len() {
            self.bytes -= front.frame.len();
            self.front_sent = 0;
            self.entries.pop_front();
        }
    }

    /// The connection is gone: a half-sent front frame cannot be finished on another one
    /// (returns whether one was lost); whole frames wait for the next connection.
    pub fn reset_stream(&mut self) -> bool {
        if self.front_sent == 0 {
            return false;
        }
        self.front_sent = 0;
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.frame.len();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut Queue) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(f) = q.front() {
            out.push(f.to_vec());
            let n = f.len();
            q.advance(n);
        }
        out
    }

    #[test]
    fn progress_coalesces_until_a_kept_frame_of_its_key() {
        let mut q = Queue::default();
        let p = |key| Class::Progress { key, stream: 1 };
        assert_eq!(q.push(b"a1", p("a")), Pushed::Queued);
        assert_eq!(q.push(b"b1", p("b")), Pushed::Queued);
        assert_eq!(q.push(b"a2", p("a")), Pushed::Coalesced);
        assert_eq!(
            q.push(
                b"A-end",
                Class::Keep {
                    key: "a",
                    terminal: true
                }
            ),
            Pushed::Queued
        );
        assert_eq!(
            q.push(b"a3", p("a")),
            Pushed::Queued,
            "not moved before the end"
        );
        assert_eq!(q.push(b"b2", p("b")), Pushed::Coalesced);
        assert_eq!(
            q.push(
                b"a9",
                Class::Progress {
                    key: "a",
                    stream: 2
                }
            ),
            Pushed::Queued
        );
        assert_eq!(q.bytes(), 2 + 2 + 5 + 2 + 2);
        let out = drain(&mut q);
        assert_eq!(out, [&b"a2"[..], b"b2", b"A-end", b"a3", b"a9"]);
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn a_half_sent_front_is_never_replaced_and_bounds_hold() {
        let mut q = Queue::default();
        let p = Class::Progress {
            key: "a",
            stream: 0,
        };
        q.push(b"first", p);
        q.advance(2);
        assert_eq!(q.front(), Some(&b"rst"[..]));
        assert_eq!(q.push(b"second", p), Pushed::Queued);
        assert_eq!(q.push(b"third", p), Pushed::Coalesced);
        assert!(
            q.reset_stream(),
            "the half-sent frame is lost with its connection"
        );
        assert_eq!(drain(&mut q), [&b"third"[..]]);

        let big = vec![0u8; SOFT_BYTES / 2 + 1];
        let kept = |terminal| Class::Keep { key: "x", terminal };
        assert_eq!(q.push(&big, kept(false)), Pushed::Queued);
        assert_eq!(
            q.push(&big, kept(false)),
            Pushed::Dropped,
            "over the soft bound"
        );
        assert_eq!(
            q.push(&big, kept(true)),
            Pushed::Queued,
            "a terminal frame still fits"
        );
        assert_eq!(
            publish_class("c", "complete"),
            Class::Keep {
                key: "c",
                terminal: true
            }
        );
        assert_eq!(
            publish_class("c", "progress"),
            Class::Progress {
                key: "c",
                stream: 0
            }
        );
    }
}
