//! Wire format between PHP processes (the recorder) and the hub's ingest socket.
//!
//! The socket is a Unix SOCK_STREAM connection kept open per PHP process, so
//! messages are length-prefixed: `u32 LE body length` then the body. The body
//! starts with a one-byte kind; integers are LE, strings are `u32 len + bytes`.
//! A hand-rolled codec keeps `publish()` well under a microsecond: no JSON
//! round trip on the PHP side, and no allocation beyond the frame buffer.

/// Largest body the hub accepts on the ingest socket.
pub const MAX_FRAME: usize = 64 * 1024;

/// How a stream of request-body bytes (one chunk or one plain request) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOutcome {
    /// The bytes were durably stored (chunk) or fully received (plain request).
    Stored = 0,
    /// The bytes are lost: short body, checksum mismatch, I/O error.
    Failed = 1,
}

/// Everything a PHP process can tell the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestMessage {
    /// First frame of every connection: the extension version (a hub of
    /// another version hands over) and how many events this process dropped
    /// while it had no connection.
    Hello { version: String, dropped: u64 },
    /// `UploadProgress\publish()`: `data` is already a JSON text.
    Publish {
        channel: String,
        event: String,
        data: String,
    },
    /// Bytes of one body stream arriving for an upload. `stream` identifies the
    /// stream (pid and request counter), so the hub can add the in-flight
    /// bytes of parallel chunks without counting any twice.
    Progress(ProgressReport),
    /// A body stream ended; its in-flight bytes are dropped, `stored_bytes`
    /// and `chunks_done` are the upload's totals afterwards.
    StreamEnd {
        upload_id: String,
        stream: u64,
        outcome: StreamOutcome,
        stored_bytes: u64,
        chunks_done: u32,
    },
    /// A terminal event (`complete`, `aborted`, `failed`); `fields` is a JSON
    /// object text with extra members (`sha256`, `path`, `error`, `bytes_total`).
    Terminal {
        upload_id: String,
        event: String,
        fields: String,
    },
    /// Ask for the latest event data of an upload; answered with one frame
    /// whose body is the JSON data, or empty when unknown.
    QueryProgress { upload_id: String },
    /// Ask for the hub's status; answered with one JSON frame.
    QueryStatus,
    /// A `Progress`, `StreamEnd` or `Terminal` of a plain request tagged with
    /// an id (`X-Progress-ID`, no `Upload` object). Anyone who can send an
    /// HTTP request makes these, so the hub never lets them speak on the
    /// channel of an `Upload`. On the wire: kind 8, then the inner body.
    TaggedRequest(Box<IngestMessage>),
}

impl IngestMessage {
    /// This message as sent for a plain tagged request (see `TaggedRequest`).
    pub fn tagged_request(&self) -> IngestMessage {
        match self {
            IngestMessage::Progress(_)
            | IngestMessage::StreamEnd { .. }
            | IngestMessage::Terminal { .. } => {
                IngestMessage::TaggedRequest(Box::new(self.clone()))
            }
            other => other.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressReport {
    pub upload_id: String,
    pub stream: u64,
    pub bytes_total: u64,
    pub chunk_count: u32,
    /// Bytes of the upload durably stored, as the sender last saw them.
    pub stored_bytes: u64,
    pub chunks_done: u32,
    /// Bytes of this stream received so far and not yet stored.
    pub inflight: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    UnknownKind(u8),
    BadUtf8,
    TooLarge(usize),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated frame"),
            DecodeError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            DecodeError::BadUtf8 => write!(f, "string is not UTF-8"),
            DecodeError::TooLarge(n) => write!(f, "frame of {n} bytes exceeds {MAX_FRAME}"),
        }
    }
}

impl std::error::Error for DecodeError {}

const HELLO: u8 = 1;
const PUBLISH: u8 = 2;
const PROGRESS: u8 = 3;
const STREAM_END: u8 = 4;
const TERMINAL: u8 = 5;
const QUERY_PROGRESS: u8 = 6;
const QUERY_STATUS: u8 = 7;
const TAGGED_REQUEST: u8 = 8;

/// Appends one length-prefixed frame to `out`.
pub fn encode(msg: &IngestMessage, out: &mut Vec<u8>) {
    let start = out.len();
    if let IngestMessage::TaggedRequest(inner) = msg {
        encode(inner, out);
        // The inner frame's length prefix stays; one more byte for the kind.
        out.insert(start + 4, TAGGED_REQUEST);
        finish(out, start);
        return;
    }
    out.extend_from_slice(&[0; 4]);
    match msg {
        IngestMessage::Hello { version, dropped } => {
            out.push(HELLO);
            put_str(out, version);
            out.extend_from_slice(&dropped.to_le_bytes());
        }
        IngestMessage::Publish {
            channel,
            event,
            data,
        } => encode_publish(channel, event, data, out, start),
        IngestMessage::Progress(p) => {
            out.push(PROGRESS);
            put_str(out, &p.upload_id);
            for v in [p.stream, p.bytes_total] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&p.chunk_count.to_le_bytes());
            out.extend_from_slice(&p.stored_bytes.to_le_bytes());
            out.extend_from_slice(&p.chunks_done.to_le_bytes());
            out.extend_from_slice(&p.inflight.to_le_bytes());
        }
        IngestMessage::StreamEnd {
            upload_id,
            stream,
            outcome,
            stored_bytes,
            chunks_done,
        } => {
            out.push(STREAM_END);
            put_str(out, upload_id);
            out.extend_from_slice(&stream.to_le_bytes());
            out.push(*outcome as u8);
            out.extend_from_slice(&stored_bytes.to_le_bytes());
            out.extend_from_slice(&chunks_done.to_le_bytes());
        }
        IngestMessage::Terminal {
            upload_id,
            event,
            fields,
        } => {
            out.push(TERMINAL);
            put_str(out, upload_id);
            put_str(out, event);
            put_str(out, fields);
        }
        IngestMessage::QueryProgress { upload_id } => {
            out.push(QUERY_PROGRESS);
            put_str(out, upload_id);
        }
        IngestMessage::QueryStatus => out.push(QUERY_STATUS),
        IngestMessage::TaggedRequest(_) => {}
    }
    if !matches!(msg, IngestMessage::Publish { .. }) {
        finish(out, start);
    }
}

/// The hot path of `publish()`: encodes straight from borrowed strings.
pub fn encode_publish(channel: &str, event: &str, data: &str, out: &mut Vec<u8>, start: usize) {
    if out.len() == start {
        out.extend_from_slice(&[0; 4]);
    }
    out.push(PUBLISH);
    put_str(out, channel);
    put_str(out, event);
    put_str(out, data);
    finish(out, start);
}

/// Writes a frame whose body is `body` (used for query answers).
pub fn encode_raw(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

fn finish(out: &mut [u8], start: usize) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// If `buf` starts with a whole frame, returns its body length and the total
/// bytes it occupies; `Ok(None)` when more bytes are needed.
pub fn frame_len(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((len, 4 + len)))
}

/// Decodes one frame body (without the length prefix).
pub fn decode(body: &[u8]) -> Result<IngestMessage, DecodeError> {
    let mut r = Reader { buf: body };
    let kind = r.u8()?;
    let msg = match kind {
        HELLO => IngestMessage::Hello {
            version: r.string()?,
            dropped: r.u64()?,
        },
        PUBLISH => IngestMessage::Publish {
            channel: r.string()?,
            event: r.string()?,
            data: r.string()?,
        },
        PROGRESS => IngestMessage::Progress(ProgressReport {
            upload_id: r.string()?,
            stream: r.u64()?,
            bytes_total: r.u64()?,
            chunk_count: r.u32()?,
            stored_bytes: r.u64()?,
            chunks_done: r.u32()?,
            inflight: r.u64()?,
        }),
        STREAM_END => IngestMessage::StreamEnd {
            upload_id: r.string()?,
            stream: r.u64()?,
            outcome: if r.u8()? == 0 {
                StreamOutcome::Stored
            } else {
                StreamOutcome::Failed
            },
            stored_bytes: r.u64()?,
            chunks_done: r.u32()?,
        },
        TERMINAL => IngestMessage::Terminal {
            upload_id: r.string()?,
            event: r.string()?,
            fields: r.string()?,
        },
        QUERY_PROGRESS => IngestMessage::QueryProgress {
            upload_id: r.string()?,
        },
        QUERY_STATUS => IngestMessage::QueryStatus,
        TAGGED_REQUEST => {
            let inner = decode(r.buf)?;
            if !matches!(
                inner,
                IngestMessage::Progress(_)
                    | IngestMessage::StreamEnd { .. }
                    | IngestMessage::Terminal { .. }
            ) {
                // Only body reports can be tagged (and no nesting).
                return Err(DecodeError::UnknownKind(TAGGED_REQUEST));
            }
            IngestMessage::TaggedRequest(Box::new(inner))
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(msg)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(msg: IngestMessage) {
        let mut buf = Vec::new();
        encode(&msg, &mut buf);
        let (len, total) = frame_len(&buf).unwrap().unwrap();
        assert_eq!(total, buf.len());
        assert_eq!(decode(&buf[4..4 + len]).unwrap(), msg);
    }

    #[test]
    fn every_kind_roundtrips() {
        roundtrip(IngestMessage::Hello {
            version: "0.1.0".into(),
            dropped: 7,
        });
        roundtrip(IngestMessage::Publish {
            channel: "private-upload.abc".into(),
            event: "progress".into(),
            data: "{\"a\":1}".into(),
        });
        roundtrip(IngestMessage::Progress(ProgressReport {
            upload_id: "x".into(),
            stream: 1 << 40,
            bytes_total: 10,
            chunk_count: 2,
            stored_bytes: 3,
            chunks_done: 1,
            inflight: 4,
        }));
        roundtrip(IngestMessage::StreamEnd {
            upload_id: "x".into(),
            stream: 9,
            outcome: StreamOutcome::Failed,
            stored_bytes: 5,
            chunks_done: 1,
        });
        roundtrip(IngestMessage::Terminal {
            upload_id: "x".into(),
            event: "complete".into(),
            fields: "{}".into(),
        });
        roundtrip(IngestMessage::QueryProgress {
            upload_id: "x".into(),
        });
        roundtrip(IngestMessage::QueryStatus);
        let p = IngestMessage::Progress(ProgressReport {
            upload_id: "x".into(),
            stream: 2,
            bytes_total: 10,
            chunk_count: 1,
            stored_bytes: 0,
            chunks_done: 0,
            inflight: 4,
        });
        roundtrip(p.tagged_request());
        roundtrip(
            IngestMessage::Terminal {
                upload_id: "x".into(),
                event: "complete".into(),
                fields: "{}".into(),
            }
            .tagged_request(),
        );
        roundtrip(
            IngestMessage::StreamEnd {
                upload_id: "x".into(),
                stream: 9,
                outcome: StreamOutcome::Stored,
                stored_bytes: 5,
                chunks_done: 1,
            }
            .tagged_request(),
        );
        // Only body reports are tagged.
        assert_eq!(
            IngestMessage::QueryStatus.tagged_request(),
            IngestMessage::QueryStatus
        );
    }

    #[test]
    fn tagged_frames_carry_only_body_reports() {
        let mut buf = Vec::new();
        encode(&IngestMessage::QueryStatus, &mut buf);
        let mut body = vec![TAGGED_REQUEST];
        body.extend_from_slice(&buf[4..]);
        assert_eq!(decode(&body), Err(DecodeError::UnknownKind(TAGGED_REQUEST)));
        assert_eq!(
            decode(&[TAGGED_REQUEST, TAGGED_REQUEST, PROGRESS]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(decode(&[TAGGED_REQUEST]), Err(DecodeError::Truncated));
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut buf = Vec::new();
        encode(&IngestMessage::QueryStatus, &mut buf);
        assert_eq!(frame_len(&buf[..3]).unwrap(), None);
        assert_eq!(frame_len(&buf[..4]).unwrap(), None);
    }

    #[test]
    fn hostile_bodies_are_errors_not_panics() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[99]), Err(DecodeError::UnknownKind(99)));
        assert_eq!(
            decode(&[PUBLISH, 255, 255, 255, 255]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(&[PUBLISH, 1, 0, 0, 0, 0xff]),
            Err(DecodeError::BadUtf8)
        );
        assert!(matches!(
            frame_len(&[0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::TooLarge(_))
        ));
    }
}
