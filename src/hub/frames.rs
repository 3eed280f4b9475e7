//! Serialized WebSocket frames (built on `crate::protocol::frames`) and what
//! the hub reads back from them.

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::protocol::frames::{Frame, PusherError, SubscriptionError};

/// `{"event":E,"channel":C,"data":"<data as a JSON string>"}`.
pub(crate) fn frame(event: &str, channel: Option<&str>, data: &str) -> Utf8Bytes {
    Utf8Bytes::from(
        Frame {
            event,
            channel,
            data,
        }
        .to_json(),
    )
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

    #[test]
    fn seq_is_read_from_objects_only() {
        assert_eq!(data_seq(r#"{"seq":5,"a":1}"#), Some(5));
        assert_eq!(data_seq(r#"{"a":"seq"}"#), None);
        assert_eq!(data_seq(r#"{"seq":"5"}"#), None);
        assert_eq!(data_seq(r#"["seq"]"#), None);
        assert_eq!(data_seq("plain"), None);
    }
}
