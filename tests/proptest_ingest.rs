//! Property tests of the ingest wire format (`upload_progress::protocol::ingest`), the
//! bytes every PHP process of the host may send to the hub: arbitrary bytes never panic
//! the decoder, and every message survives encode → frame_len → decode unchanged.
//!
//! Bounded: `PROPTEST_CASES` (default 2000 here) cases per property, well under 10 s.

mod common;

use common::config;
use proptest::prelude::*;
use upload_progress::protocol::ingest::{
    decode, encode, encode_publish, encode_raw, frame_len, DecodeError, IngestMessage,
    ProgressReport, StreamOutcome, MAX_FRAME,
};

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.\\-_]{0,40}",
        any::<String>(),
        proptest::collection::vec(any::<char>(), 0..300).prop_map(|v| v.into_iter().collect()),
    ]
}

fn message() -> impl Strategy<Value = IngestMessage> {
    prop_oneof![
        (text(), any::<u64>())
            .prop_map(|(version, dropped)| IngestMessage::Hello { version, dropped }),
        (text(), text(), text()).prop_map(|(channel, event, data)| IngestMessage::Publish {
            channel,
            event,
            data
        }),
        (
            text(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(
                |(
                    upload_id,
                    stream,
                    bytes_total,
                    chunk_count,
                    stored_bytes,
                    chunks_done,
                    inflight,
                )| {
                    IngestMessage::Progress(ProgressReport {
                        upload_id,
                        stream,
                        bytes_total,
                        chunk_count,
                        stored_bytes,
                        chunks_done,
                        inflight,
                    })
                }
            ),
        (
            text(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(|(upload_id, stream, ok, stored_bytes, chunks_done)| {
                IngestMessage::StreamEnd {
                    upload_id,
                    stream,
                    outcome: if ok {
                        StreamOutcome::Stored
                    } else {
                        StreamOutcome::Failed
                    },
                    stored_bytes,
                    chunks_done,
                }
            }),
        (text(), text(), text()).prop_map(|(upload_id, event, fields)| IngestMessage::Terminal {
            upload_id,
            event,
            fields
        }),
        text().prop_map(|upload_id| IngestMessage::QueryProgress { upload_id }),
        Just(IngestMessage::QueryStatus),
    ]
}

/// Every message, and the body reports of plain tagged requests (kind 8).
fn any_message() -> impl Strategy<Value = IngestMessage> {
    prop_oneof![
        3 => message(),
        1 => message().prop_map(|m| m.tagged_request()),
    ]
}

fn is_body_report(m: &IngestMessage) -> bool {
    matches!(
        m,
        IngestMessage::Progress(_)
            | IngestMessage::StreamEnd { .. }
            | IngestMessage::Terminal { .. }
    )
}

/// Drives the decoder the way the hub's ingest loop does: frame after frame out of
/// one buffer, stopping at the first error or at an incomplete frame.
fn drain(buf: &[u8]) -> Result<Vec<IngestMessage>, DecodeError> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some((len, total)) = frame_len(&buf[off..])? {
        assert_eq!(total, len + 4);
        assert!(len <= MAX_FRAME);
        assert!(off + total <= buf.len());
        out.push(decode(&buf[off + 4..off + total])?);
        off += total;
    }
    Ok(out)
}

proptest! {
    #![proptest_config(config(1))]

    /// Arbitrary bytes, as a frame body or as a stream: errors, never panics.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes);
        let _ = frame_len(&bytes);
        let _ = drain(&bytes);
    }

    /// Bodies that start with a valid kind byte and carry hostile lengths.
    #[test]
    fn hostile_lengths_never_panic(kind in 0u8..10, lens in proptest::collection::vec(any::<u32>(), 0..4),
                                   tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut body = vec![kind];
        for l in lens {
            body.extend_from_slice(&l.to_le_bytes());
        }
        body.extend_from_slice(&tail);
        let _ = decode(&body);
        let mut framed = (body.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&body);
        let _ = drain(&framed);
    }

    /// Every message round-trips; a stream of several frames decodes to the same list.
    #[test]
    fn encode_decode_roundtrip(msgs in proptest::collection::vec(any_message(), 1..6)) {
        let mut buf = Vec::new();
        for m in &msgs {
            encode(m, &mut buf);
        }
        prop_assert_eq!(drain(&buf).unwrap(), msgs.clone());
        // The hot path encoder writes the same bytes as the generic one.
        for m in &msgs {
            if let IngestMessage::Publish { channel, event, data } = m {
                let mut a = Vec::new();
                encode(m, &mut a);
                let mut b = Vec::new();
                encode_publish(channel, event, data, &mut b, 0);
                prop_assert_eq!(a, b);
            }
        }
    }

    /// A whole frame cut anywhere is "need more bytes", and a cut body is Truncated:
    /// never a wrong message and never a panic.
    #[test]
    fn truncated_frames_wait_or_fail(m in any_message(), cut in any::<prop::sample::Index>()) {
        let mut buf = Vec::new();
        encode(&m, &mut buf);
        let at = cut.index(buf.len());
        prop_assert_eq!(frame_len(&buf[..at]).unwrap(), None);
        if at > 4 {
            // A strict prefix of a body always lacks bytes that decode needs.
            prop_assert_eq!(decode(&buf[4..at]), Err(DecodeError::Truncated));
        }
    }

    /// Flipping bytes of a valid frame never panics the decoder.
    #[test]
    fn mutated_frames_never_panic(m in any_message(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut buf = Vec::new();
        encode(&m, &mut buf);
        for (i, b) in flips {
            let at = i.index(buf.len());
            buf[at] ^= b | 1;
        }
        let _ = drain(&buf);
    }

    /// The tag of plain requests wraps only body reports, once: a tagged
    /// Hello, Publish, query or tagged message is an error, and an untagged body
    /// report never decodes as tagged (the hub tells the two apart).
    #[test]
    fn tags_wrap_only_body_reports(m in any_message()) {
        let mut buf = Vec::new();
        encode(&m, &mut buf);
        let mut body = vec![8u8];
        body.extend_from_slice(&buf[4..]);
        let wrapped = decode(&body);
        if is_body_report(&m) {
            prop_assert_eq!(wrapped.unwrap(), m.tagged_request());
            prop_assert!(!matches!(decode(&buf[4..]).unwrap(), IngestMessage::TaggedRequest(_)));
        } else {
            prop_assert!(wrapped.is_err());
        }
    }

    /// Query answers (raw frames) are framed like everything else.
    #[test]
    fn raw_frames_roundtrip(body in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut buf = Vec::new();
        encode_raw(&body, &mut buf);
        let (len, total) = frame_len(&buf).unwrap().unwrap();
        prop_assert_eq!(total, buf.len());
        prop_assert_eq!(&buf[4..4 + len], &body[..]);
    }

    /// Lengths over MAX_FRAME are refused before any allocation.
    #[test]
    fn oversized_lengths_are_refused(len in (MAX_FRAME as u32 + 1)..=u32::MAX) {
        let buf = len.to_le_bytes();
        prop_assert_eq!(frame_len(&buf), Err(DecodeError::TooLarge(len as usize)));
    }
}
