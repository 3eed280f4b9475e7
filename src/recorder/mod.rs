//! The recorder: what runs inside every PHP process. Pure Rust; the Zend/SAPI
//! hooks in `php::hooks` feed it.

pub mod client;
pub mod spawn;

use crate::protocol::ingest::{IngestMessage, ProgressReport, StreamOutcome};
use std::time::{Duration, Instant};

/// Upload ids from clients become Pusher channel names, so they must follow
/// the channel-name alphabet; the length cap keeps `private-upload.` + id
/// inside Pusher's 164 characters.
pub fn valid_progress_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b))
}

/// Finds `name` in a raw query string (`a=1&X-Progress-ID=abc`).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        k.eq_ignore_ascii_case(name).then_some(v)
    })
}

/// CGI variable name of a request header: `X-Progress-ID` → `HTTP_X_PROGRESS_ID`.
pub fn header_env_name(header: &str) -> String {
    let mut s = String::with_capacity(header.len() + 5);
    s.push_str("HTTP_");
    for c in header.chars() {
        s.push(if c == '-' {
            '_'
        } else {
            c.to_ascii_uppercase()
        });
    }
    s
}

/// Identifies one stream of body bytes across all PHP processes of a host.
pub fn stream_id(pid: u32, counter: u32) -> u64 {
    (u64::from(pid) << 32) | u64::from(counter)
}

/// Progress of one request body that carries a progress id (no Upload object):
/// turns byte counts into throttled ingest messages.
#[derive(Debug)]
pub struct BodyTracker {
    pub upload_id: String,
    stream: u64,
    /// Content-Length, 0 when unknown.
    total: u64,
    received: u64,
    min_interval: Duration,
    last_sent: Option<Instant>,
    ended: bool,
}

impl BodyTracker {
    pub fn new(upload_id: String, stream: u64, content_length: i64, min_interval_ms: u64) -> Self {
        BodyTracker {
            upload_id,
            stream,
            total: u64::try_from(content_length).unwrap_or(0),
            received: 0,
            min_interval: Duration::from_millis(min_interval_ms),
            last_sent: None,
            ended: false,
        }
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    fn report(&self) -> IngestMessage {
        IngestMessage::Progress(ProgressReport {
            upload_id: self.upload_id.clone(),
            stream: self.stream,
            bytes_total: self.total.max(self.received),
            chunk_count: 1,
            stored_bytes: 0,
            chunks_done: 0,
            inflight: self.received,
        })
    }

    /// Called after every read of the body: `n` bytes arrived (0 = the SAPI
    /// has no more). Returns the messages to send now.
    pub fn on_read(&mut self, n: usize, now: Instant) -> Vec<IngestMessage> {
        if self.ended {
            return Vec::new();
        }
        self.received += n as u64;
        let finished = self.total > 0 && self.received >= self.total;
        if n == 0 || finished {
            return self.end(finished || self.total == 0);
        }
        let due = self
            .last_sent
            .is_none_or(|t| now.duration_since(t) >= self.min_interval);
        if due {
            self.last_sent = Some(now);
            vec![self.report()]
        } else {
            Vec::new()
        }
    }

    /// The body ended: `complete` when all bytes came, `failed` otherwise.
    fn end(&mut self, complete: bool) -> Vec<IngestMessage> {
        self.ended = true;
        let total = self.total.max(self.received);
        let (outcome, event, fields) = if complete {
            (
                StreamOutcome::Stored,
                "complete",
                format!("{{\"bytes_total\":{total}}}"),
            )
        } else {
            (
                StreamOutcome::Failed,
                "failed",
                format!(
                    "{{\"bytes_total\":{total},\"error\":\"client went away after {} of {} bytes\"}}",
                    self.received, self.total
                ),
            )
        };
        // The hub answers StreamEnd with a last progress event of its own.
        let mut out = Vec::with_capacity(2);
        out.push(IngestMessage::StreamEnd {
            upload_id: self.upload_id.clone(),
            stream: self.stream,
            outcome,
            stored_bytes: if complete { total } else { 0 },
            chunks_done: u32::from(complete),
        });
        out.push(IngestMessage::Terminal {
            upload_id: self.upload_id.clone(),
            event: event.into(),
            fields,
        });
        out
    }

    /// PHP's multipart parser reached the closing boundary: the body is
    /// complete even if trailing bytes after it were never read.
    pub fn on_parsed_end(&mut self) -> Vec<IngestMessage> {
        if self.ended {
            return Vec::new();
        }
        self.end(true)
    }

    /// The request ended without the body being read to its end (the script
    /// did not read it, or the client aborted): release the in-flight bytes.
    pub fn abandon(&mut self) -> Vec<IngestMessage> {
        if self.ended {
            return Vec::new();
        }
        if self.received > 0 && self.received < self.total {
            return self.end(false);
        }
        self.ended = true;
        vec![IngestMessage::StreamEnd {
            upload_id: self.upload_id.clone(),
            stream: self.stream,
            outcome: StreamOutcome::Failed,
            stored_bytes: 0,
            chunks_done: 0,
        }]
    }
}

/// Time-based throttle for the progress of one chunk stream.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
}

impl Throttle {
    pub fn new(min_interval_ms: u64) -> Self {
        Throttle {
            interval: Duration::from_millis(min_interval_ms),
            last: None,
        }
    }

    pub fn due(&mut self, now: Instant) -> bool {
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= self.interval);
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// The reports of one chunk being written into an upload: throttled progress while the
/// bytes stream in, then exactly one `StreamEnd`. Pure: the caller sends what it returns.
#[derive(Debug)]
pub struct ChunkStream {
    upload_id: String,
    stream: u64,
    bytes_total: u64,
    chunk_count: u32,
    /// What the upload had stored before this chunk.
    stored_bytes: u64,
    chunks_done: u32,
    throttle: Throttle,
}

fn clamp_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl ChunkStream {
    /// `stored_bytes`/`chunks_done`: the upload's state before this chunk.
    pub fn new(
        upload_id: &str,
        stream: u64,
        bytes_total: u64,
        chunk_count: u64,
        stored_bytes: u64,
        chunks_done: u64,
        min_interval_ms: u64,
    ) -> Self {
        ChunkStream {
            upload_id: upload_id.to_owned(),
            stream,
            bytes_total,
            chunk_count: clamp_u32(chunk_count),
            stored_bytes,
            chunks_done: clamp_u32(chunks_done),
            throttle: Throttle::new(min_interval_ms),
        }
    }

    /// `inflight` bytes of the chunk arrived so far: a report when one is due.
    pub fn progress(&mut self, inflight: u64, now: Instant) -> Option<IngestMessage> {
        self.throttle.due(now).then(|| {
            IngestMessage::Progress(ProgressReport {
                upload_id: self.upload_id.clone(),
                stream: self.stream,
                bytes_total: self.bytes_total,
                chunk_count: self.chunk_count,
                stored_bytes: self.stored_bytes,
                chunks_done: self.chunks_done,
                inflight,
            })
        })
    }

    /// The chunk was stored: the upload now has `stored_bytes` in `chunks_done` chunks.
    pub fn stored(&self, stored_bytes: u64, chunks_done: u64) -> IngestMessage {
        self.end(StreamOutcome::Stored, stored_bytes, clamp_u32(chunks_done))
    }

    /// The chunk was not stored: the upload is as it was before.
    pub fn failed(&self) -> IngestMessage {
        self.end(StreamOutcome::Failed, self.stored_bytes, self.chunks_done)
    }

    fn end(&self, outcome: StreamOutcome, stored_bytes: u64, chunks_done: u32) -> IngestMessage {
        IngestMessage::StreamEnd {
            upload_id: self.upload_id.clone(),
            stream: self.stream,
            outcome,
            stored_bytes,
            chunks_done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_params() {
        assert!(valid_progress_id("abc-123_x"));
        assert!(!valid_progress_id(""));
        assert!(!valid_progress_id("a/b"));
        assert!(!valid_progress_id(&"a".repeat(129)));
        assert_eq!(
            query_param("a=1&X-Progress-ID=xyz", "x-progress-id"),
            Some("xyz")
        );
        assert_eq!(query_param("a=1", "X-Progress-ID"), None);
        assert_eq!(header_env_name("X-Progress-ID"), "HTTP_X_PROGRESS_ID");
    }

    #[test]
    fn body_progress_is_throttled_and_ends_with_complete() {
        let t0 = Instant::now();
        let mut b = BodyTracker::new("u".into(), 1, 100, 100);
        assert_eq!(b.on_read(10, t0).len(), 1, "first read reports at once");
        assert!(b.on_read(10, t0 + Duration::from_millis(50)).is_empty());
        assert_eq!(b.on_read(10, t0 + Duration::from_millis(150)).len(), 1);
        let end = b.on_read(70, t0 + Duration::from_millis(160));
        assert!(
            matches!(end.last(), Some(IngestMessage::Terminal { event, .. }) if event == "complete")
        );
        assert!(b.on_read(0, t0).is_empty(), "nothing after the end");
    }

    #[test]
    fn multipart_end_completes_even_with_unread_trailer() {
        let mut b = BodyTracker::new("u".into(), 1, 100, 100);
        b.on_read(98, Instant::now());
        let end = b.on_parsed_end();
        assert!(
            matches!(end.last(), Some(IngestMessage::Terminal { event, .. }) if event == "complete")
        );
        assert!(b.abandon().is_empty());
    }

    #[test]
    fn short_body_fails() {
        let mut b = BodyTracker::new("u".into(), 1, 100, 100);
        b.on_read(40, Instant::now());
        let end = b.on_read(0, Instant::now());
        assert!(
            matches!(end.last(), Some(IngestMessage::Terminal { event, fields, .. })
            if event == "failed" && fields.contains("40 of 100"))
        );
    }

    #[test]
    fn chunk_stream_throttles_progress_and_ends_once_per_outcome() {
        let t0 = Instant::now();
        let mut c = ChunkStream::new("u", 7, 1000, 4, 250, 1, 100);
        assert!(
            c.progress(10, t0).is_some(),
            "the first report goes at once"
        );
        assert!(c.progress(20, t0 + Duration::from_millis(50)).is_none());
        match c.progress(30, t0 + Duration::from_millis(150)) {
            Some(IngestMessage::Progress(p)) => {
                assert_eq!(
                    (p.stream, p.stored_bytes, p.chunks_done, p.inflight),
                    (7, 250, 1, 30)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.stored(500, 2),
            IngestMessage::StreamEnd {
                outcome: StreamOutcome::Stored,
                stored_bytes: 500,
                chunks_done: 2,
                ..
            }
        ));
        assert!(matches!(
            c.failed(),
            IngestMessage::StreamEnd {
                outcome: StreamOutcome::Failed,
                stored_bytes: 250,
                chunks_done: 1,
                ..
            }
        ));
    }

    #[test]
    fn unread_body_releases_inflight_without_terminal() {
        let mut b = BodyTracker::new("u".into(), 1, 100, 100);
        let out = b.abandon();
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], IngestMessage::StreamEnd { .. }));
    }
}
