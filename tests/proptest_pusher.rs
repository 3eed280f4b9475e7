//! Property tests of the hub's Pusher client-message handling.
//!
//! The parser itself (`hub::ws::handle_text`) is private to the crate, so it is driven
//! the way a browser drives it: a real hub (`hub::run`) in a thread of this test
//! process, and a WebSocket client sending arbitrary and mutated Pusher messages. Every
//! message of at most 10 KiB must be answered without closing the connection (the
//! contract: malformed input is a `pusher:error` 4000/4301 or a
//! `pusher:subscription_error`, and the connection stays open), and a `pusher:ping`
//! right after it must get its `pusher:pong`. The public helpers the parser uses
//! (`protocol::pusher`) are fuzzed directly too.
//!
//! Bounded: `PROPTEST_CASES` (default 2000 here; the hub property runs an eighth).

mod common;

use common::config;
use std::net::{TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};
use upload_progress::config::{Config, HubMode};
use upload_progress::hub::{self, HubOptions};
use upload_progress::protocol::pusher;

const KEY: &str = "prop-key";
const SECRET: &str = "prop-secret";

/// Port of the in-process hub, started once.
fn hub_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let name = format!("upload-progress-proptest-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let ingest = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        let cfg = Config {
            enabled: true,
            storage_dir: std::env::temp_dir(),
            hub: HubMode::External,
            listen: format!("127.0.0.1:{port}"),
            hub_socket: format!("@{name}"),
            app_id: "prop".into(),
            app_key: KEY.into(),
            app_secret: SECRET.into(),
            allowed_origins: vec!["*".into()],
            progress_param: "X-Progress-ID".into(),
            min_interval_ms: 100,
            chunk_size: 1 << 20,
            max_upload_size: 0,
            expire_seconds: 3600,
            activity_timeout: 120,
            max_connections: 0,
            max_pending_handshakes: 0,
            max_connections_per_ip: 0,
            handshake_timeout: 0,
            redis_url: String::new(),
            php_binary: String::new(),
        };
        std::thread::spawn(move || {
            let _ = hub::run(HubOptions {
                config: cfg,
                version: "proptest".into(),
                ingest,
                watch_pid: None,
            });
        });
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        port
    })
}

type Ws = tungstenite::WebSocket<TcpStream>;

fn connect() -> (Ws, String) {
    let port = hub_port();
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (mut ws, _) = tungstenite::client::client(
        format!("ws://127.0.0.1:{port}/app/{KEY}?protocol=7"),
        stream,
    )
    .unwrap();
    let hello: Value = match ws.read().unwrap() {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(hello["event"], "pusher:connection_established");
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    (ws, data["socket_id"].as_str().unwrap().to_string())
}

/// Sends `text`, then a ping; returns the replies before the pong, or an error when the
/// connection closed or no pong came.
fn exchange(ws: &mut Ws, text: &str) -> Result<Vec<Value>, String> {
    ws.send(Message::text(text.to_string()))
        .map_err(|e| format!("send: {e}"))?;
    ws.send(Message::text(r#"{"event":"pusher:ping","data":{}}"#))
        .map_err(|e| format!("send ping: {e}"))?;
    let mut out = Vec::new();
    loop {
        match ws.read().map_err(|e| format!("read: {e}"))? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str())
                    .map_err(|e| format!("hub sent invalid JSON {t:?}: {e}"))?;
                if v["event"] == "pusher:pong" {
                    return Ok(out);
                }
                out.push(v);
            }
            Message::Close(c) => return Err(format!("closed: {c:?}")),
            _ => {}
        }
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::from),
        "(private-|presence-|private-upload\\.)?[a-zA-Z0-9_\\-=@,.;]{0,30}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("channel".to_string()),
                    Just("auth".to_string()),
                    Just("channel_data".to_string()),
                    Just("user_id".to_string()),
                    ".{0,8}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn event_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::from("pusher:subscribe")),
        Just(Value::from("pusher:unsubscribe")),
        Just(Value::from("pusher:pong")),
        Just(Value::from("pusher:signin")),
        Just(Value::from("client-event")),
        "(pusher:|pusher_internal:|client-)?.{0,20}".prop_map(Value::from),
        json_value(),
    ]
}

/// A Pusher-shaped message, sometimes with data as a JSON string (some clients do that).
fn message() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            event_name(),
            json_value(),
            any::<bool>(),
            proptest::option::of(json_value())
        )
            .prop_map(|(event, data, stringify, channel)| {
                let mut m = json!({ "event": event });
                m["data"] = if stringify {
                    Value::from(data.to_string())
                } else {
                    data
                };
                if let Some(c) = channel {
                    m["channel"] = c;
                }
                m.to_string()
            }),
        ".{0,200}",
        json_value().prop_map(|v| v.to_string()),
    ]
}

fn check_reply(v: &Value) -> Result<(), TestCaseError> {
    let ev = v["event"].as_str().unwrap_or("");
    match ev {
        "pusher:error" => {
            let code = v["data"]["code"].as_u64().unwrap_or(0);
            prop_assert!(code == 4000 || code == 4301, "error code {} in {}", code, v);
        }
        "pusher:subscription_error" => {
            let status = v["data"]["status"].as_u64().unwrap_or(0);
            prop_assert!(
                [400, 401, 429].contains(&status),
                "status {} in {}",
                status,
                v
            );
        }
        "pusher_internal:subscription_succeeded" => {
            let ch = v["channel"].as_str().unwrap_or("");
            // never a private or presence channel without a valid signature
            prop_assert!(
                !ch.starts_with("private-") && !ch.starts_with("presence-"),
                "subscribed to {} without auth",
                ch
            );
        }
        other => prop_assert!(false, "unexpected reply {} ({})", other, v),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(8))]

    /// Arbitrary Pusher-shaped messages: answered, never a closed connection.
    #[test]
    fn hub_answers_every_message_and_stays_open(msgs in proptest::collection::vec(message(), 1..8)) {
        thread_local! {
            static WS: std::cell::RefCell<Option<Ws>> = const { std::cell::RefCell::new(None) };
        }
        WS.with(|cell| -> Result<(), TestCaseError> {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(connect().0);
            }
            let ws = slot.as_mut().unwrap();
            let mut failed = None;
            for m in &msgs {
                match exchange(ws, m) {
                    Ok(replies) => {
                        for r in &replies {
                            check_reply(r)?;
                        }
                        // unsubscribe from public channels again, so the 100-channel
                        // limit is not what every later case meets
                        for r in replies.iter().filter(|r| r["event"] == "pusher_internal:subscription_succeeded") {
                            let un = json!({"event": "pusher:unsubscribe", "data": {"channel": r["channel"]}});
                            ws.send(Message::text(un.to_string())).unwrap();
                        }
                    }
                    Err(e) => {
                        failed = Some(format!("message {m:?}: {e}"));
                        break;
                    }
                }
            }
            if let Some(f) = failed {
                *slot = None;
                prop_assert!(false, "{}", f);
            }
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(config(1))]

    /// The helpers never panic on arbitrary input.
    #[test]
    fn helpers_never_panic(a in ".{0,200}", b in ".{0,200}", c in proptest::option::of(".{0,100}"), d in ".{0,200}") {
        let _ = pusher::validate_channel(&a);
        let _ = pusher::validate_event(&a);
        let _ = pusher::validate_socket_id(&a);
        let _ = pusher::presence_user_id(&a);
        let _ = pusher::verify(&a, &b, &d);
        let _ = pusher::verify_channel_auth(KEY, SECRET, &a, &b, c.as_deref(), &d);
        let _ = pusher::channel_auth(KEY, SECRET, &a, &b, c.as_deref());
    }

    /// A signature verifies for exactly the socket, channel and channel_data it was made
    /// for; any other socket (a replayed auth), channel, or a flipped digit fails.
    #[test]
    fn auth_binds_socket_and_channel(s1 in (0u64..u64::MAX, 0u32..1_000_000_000), s2 in (0u64..u64::MAX, 0u32..1_000_000_000),
                                     ch in "private-[a-zA-Z0-9_\\-=@,.;]{1,50}", flip in any::<prop::sample::Index>()) {
        let sid1 = format!("{}.{}", s1.0, s1.1);
        let sid2 = format!("{}.{}", s2.0, s2.1);
        let body: Value = serde_json::from_str(&pusher::channel_auth(KEY, SECRET, &sid1, &ch, None).unwrap()).unwrap();
        let auth = body["auth"].as_str().unwrap().to_string();
        prop_assert!(pusher::verify_channel_auth(KEY, SECRET, &sid1, &ch, None, &auth).is_ok());
        if sid1 != sid2 {
            prop_assert!(pusher::verify_channel_auth(KEY, SECRET, &sid2, &ch, None, &auth).is_err());
        }
        let other_channel = format!("{}x", ch);
        prop_assert!(pusher::verify_channel_auth(KEY, SECRET, &sid1, &other_channel, None, &auth).is_err());
        prop_assert!(pusher::verify_channel_auth(KEY, "other", &sid1, &ch, None, &auth).is_err());
        prop_assert!(pusher::verify_channel_auth("other", SECRET, &sid1, &ch, None, &auth).is_err());
        let mut bytes = auth.into_bytes();
        let at = KEY.len() + 1 + flip.index(64);
        bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(bytes).unwrap();
        prop_assert!(pusher::verify_channel_auth(KEY, SECRET, &sid1, &ch, None, &flipped).is_err());
    }

    /// An event name with any control character is refused (it would reach every
    /// client's event dispatch and the logs); the same name without it is accepted.
    #[test]
    fn event_names_with_control_characters_are_refused(
        pre in "[a-z][a-z0-9_.-]{0,40}",
        post in "[a-z0-9_.-]{0,40}",
        c in prop_oneof![0u32..0x20, Just(0x7f), 0x80u32..0xa0],
    ) {
        let c = char::from_u32(c).unwrap();
        let bad = format!("{pre}{c}{post}");
        let e = pusher::validate_event(&bad);
        prop_assert!(e.is_err(), "{:?} accepted", bad);
        prop_assert!(e.unwrap_err().contains("control character"));
        let good = format!("{pre}{post}");
        prop_assert!(pusher::validate_event(&good).is_ok());
    }
}
