//! The JSON the hub sends, as serde types (docs/protocol.md describes each):
//! WebSocket frames, the `data` of the hub's own events, and the answers of
//! the HTTP API. Nothing the hub emits is written by hand.

use serde::Serialize;

/// A frame on the WebSocket: `{"event":E,"channel":C,"data":D}` (`channel`
/// only on channel frames). Events carry their data as a JSON *string*
/// (`Frame<&str>`); `pusher:error` and `pusher:subscription_error` carry an
/// object, as Pusher sends them.
#[derive(Serialize)]
pub struct Frame<'a, D: Serialize> {
    pub event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<&'a str>,
    pub data: D,
}

impl<D: Serialize> Frame<'_, D> {
    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `pusher:connection_established` data (sent as a string).
#[derive(Serialize)]
pub struct ConnectionEstablished<'a> {
    pub socket_id: &'a str,
    pub activity_timeout: u64,
}

/// `pusher:error` data.
#[derive(Serialize)]
pub struct PusherError<'a> {
    pub code: u16,
    pub message: &'a str,
}

/// `pusher:subscription_error` data.
#[derive(Serialize)]
pub struct SubscriptionError<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub error: &'a str,
    pub status: u16,
}

/// `pusher_internal:member_added` / `member_removed` data; `user_info` is
/// the JSON the member's `channel_data` carried (absent on removal).
#[derive(Serialize)]
pub struct Member<'a> {
    pub user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_info: Option<&'a serde_json::Value>,
}

/// The `presence` member of `subscription_succeeded` on a presence channel.
#[derive(Serialize)]
pub struct PresenceData<'a> {
    pub ids: Vec<&'a str>,
    pub hash: std::collections::BTreeMap<&'a str, &'a serde_json::Value>,
    pub count: usize,
}

#[derive(Serialize)]
pub struct PresenceSucceeded<'a> {
    pub presence: PresenceData<'a>,
}

/// The data of a `progress` event on `private-upload.<id>`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Progress<'a> {
    pub upload_id: &'a str,
    pub seq: u64,
    /// Always `"uploading"`.
    pub state: &'a str,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub chunks_done: u32,
    pub chunk_count: u32,
    pub rate_bps: u64,
    /// Seconds left; null while the rate is unknown.
    pub eta_s: Option<u64>,
    pub ts_ms: u64,
}

/// An HTTP API error body.
#[derive(Serialize)]
pub struct HttpError<'a> {
    pub error: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_data_as_a_string_and_escape_it() {
        let f = Frame {
            event: "e",
            channel: Some("c"),
            data: "{\"x\":\"a\\\"b\n\u{1}é\"}",
        };
        let text = f.to_json();
        assert_eq!(
            text,
            r#"{"event":"e","channel":"c","data":"{\"x\":\"a\\\"b\n\u0001é\"}"}"#
        );
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["data"], "{\"x\":\"a\\\"b\n\u{1}é\"}");
        let e = Frame {
            event: "pusher:error",
            channel: None,
            data: PusherError {
                code: 4000,
                message: "m",
            },
        };
        assert_eq!(
            e.to_json(),
            r#"{"event":"pusher:error","data":{"code":4000,"message":"m"}}"#
        );
    }

    #[test]
    fn progress_members_in_protocol_order() {
        let p = Progress {
            upload_id: "u",
            seq: 1,
            state: "uploading",
            bytes_done: 2,
            bytes_total: 3,
            chunks_done: 4,
            chunk_count: 5,
            rate_bps: 6,
            eta_s: None,
            ts_ms: 7,
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"upload_id":"u","seq":1,"state":"uploading","bytes_done":2,"bytes_total":3,"chunks_done":4,"chunk_count":5,"rate_bps":6,"eta_s":null,"ts_ms":7}"#
        );
    }
}
