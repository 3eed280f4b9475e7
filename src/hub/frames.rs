//! Serialized WebSocket frames (built on `crate::protocol::frames`) and what
//! the hub reads back from them.

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::protocol::frames::{Frame, PusherError, SubscriptionError};

/// `{"event":E,"channel":C,"data":"<data as a JSON string>"}`. Runs once per
/// event: the buffer is sized for the escaped data up front.
pub(crate) fn frame(event: &str, channel: Option<&str>, data: &str) -> Utf8Bytes {
    let cap = 40 + event.len() + channel.map_or(0, str::len) + data.len() * 11 / 10;
    let mut out = Vec::with_capacity(cap);
    let f = Frame {
        event,
        channel,
        data,
    };
    // Writing strings to a Vec cannot fail, and serde_json writes UTF-8.
    let _ = serde_json::to_writer(&mut out, &f);
    Utf8Bytes::from(String::from_utf8(out).unwrap_or_default())
}

/// A `pusher:error` frame.
pub(crate) fn error_frame(code: u16, message: &str) -> Utf8Bytes {
    Utf8Bytes::from(
        Frame {
            event: "pusher:error",
            channel: None,
            data: PusherError { code, message },
        }
        .to_json(),
    )
}

/// A `pusher:subscription_error` frame.
pub(crate) fn subscription_error(channel: &str, kind: &str, error: &str, status: u16) -> Utf8Bytes {
    Utf8Bytes::from(
        Frame {
            event: "pusher:subscription_error",
            channel: Some(channel),
            data: SubscriptionError {
                kind,
                error,
                status,
            },
        }
        .to_json(),
    )
}

/// Event name and data string of a serialized frame.
pub(crate) fn frame_parts(frame: &str) -> Option<(String, String)> {
    #[derive(serde::Deserialize)]
    struct F {
        event: String,
        data: String,
    }
    serde_json::from_str::<F>(frame)
        .ok()
        .map(|f| (f.event, f.data))
}

/// The `data` string of a serialized frame.
pub(crate) fn frame_data(frame: &str) -> Option<String> {
    frame_parts(frame).map(|(_, d)| d)
}

/// `seq` of an event whose data is a JSON object with a numeric `seq`.
pub(crate) fn data_seq(data: &str) -> Option<u64> {
    if !data.contains("\"seq\"") {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct S {
        seq: Option<serde_json::Value>,
    }
    let s: S = serde_json::from_str(data).ok()?;
    match s.seq? {
        serde_json::Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = frame("e", Some("c"), "{\"x\":1}");
        assert_eq!(
            f.as_str(),
            r#"{"event":"e","channel":"c","data":"{\"x\":1}"}"#
        );
        assert_eq!(frame_data(f.as_str()).unwrap(), "{\"x\":1}");
        assert_eq!(
            error_frame(4001, "no").as_str(),
            r#"{"event":"pusher:error","data":{"code":4001,"message":"no"}}"#
        );
    }

    /// Not run by default: `cargo test --release --lib frame_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn frame_speed() {
        let data = r#"{"upload_id":"0123456789abcdef0123456789abcdef","seq":1795000000123456,"state":"uploading","bytes_done":123456789,"bytes_total":987654321,"chunks_done":12,"chunk_count":100,"rate_bps":5000000,"eta_s":12,"ts_ms":1795000000123}"#;
        let t = std::time::Instant::now();
        let mut n = 0;
        for _ in 0..1_000_000 {
            n += frame("progress", Some("private-upload.0123456789abcdef"), data).len();
        }
        println!("frame: {:?} per frame ({n})", t.elapsed() / 1_000_000);
    }

    #[test]
    fn seq_is_read_from_objects_only() {
        assert_eq!(data_seq(r#"{"seq":5,"a":1}"#), Some(5));
        assert_eq!(data_seq(r#"{"a":"seq"}"#), None);
        assert_eq!(data_seq(r#"{"seq":"5"}"#), None);
        assert_eq!(data_seq(r#"["seq"]"#), None);
        assert_eq!(data_seq("plain"), None);
    }
}
