//! Pusher Channels protocol helpers shared by the PHP functions and the hub:
//! name validation, HMAC signatures and channel authorization.
//!
//! Signatures are hex HMAC-SHA256; verification goes through
//! `Mac::verify_slice`, which compares in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Longest channel name Pusher accepts.
pub const MAX_CHANNEL_LEN: usize = 164;
/// Longest event name Pusher accepts.
pub const MAX_EVENT_LEN: usize = 200;

fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=' | '@' | ',' | '.' | ';')
}

/// Pusher rules: 1 to 164 characters of `[A-Za-z0-9_\-=@,.;]`.
pub fn validate_channel(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("invalid channel name \"\": it must not be empty".into());
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(format!(
            "invalid channel name {:?}: {} characters, at most {MAX_CHANNEL_LEN} are allowed",
            truncate(name, 40),
            name.chars().count()
        ));
    }
    if let Some(c) = name.chars().find(|c| !is_channel_char(*c)) {
        return Err(format!(
            "invalid channel name {name:?}: character {c:?} is not allowed (only A-Z a-z 0-9 _ - = @ , . ;)"
        ));
    }
    Ok(())
}

/// 1 to 200 bytes, no control characters (they would reach every client's
/// event dispatch and every log line), not starting with `pusher:` or
/// `pusher_internal:`.
pub fn validate_event(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("invalid event name \"\": it must not be empty".into());
    }
    if name.len() > MAX_EVENT_LEN {
        return Err(format!(
            "invalid event name {:?}: {} bytes, at most {MAX_EVENT_LEN} are allowed",
            truncate(name, 40),
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "invalid event name {name:?}: control character {c:?} is not allowed"
        ));
    }
    if name.starts_with("pusher:") || name.starts_with("pusher_internal:") {
        return Err(format!(
            "invalid event name {name:?}: the prefixes \"pusher:\" and \"pusher_internal:\" are reserved"
        ));
    }
    Ok(())
}

/// `^\d+\.\d+$`.
pub fn validate_socket_id(id: &str) -> Result<(), String> {
    let ok = id.len() <= 64
        && id.split_once('.').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid socket id {:?}: expected digits, a dot, digits (like \"1234.5678\")",
            truncate(id, 40)
        ))
    }
}

/// Hex HMAC-SHA256 of `payload` keyed by `secret`.
pub fn sign(secret: &str, payload: &str) -> String {
    hex::encode(mac(secret, payload).finalize().into_bytes())
}

/// Constant-time check of a hex HMAC-SHA256 signature.
pub fn verify(secret: &str, payload: &str, signature_hex: &str) -> bool {
    // Only the length of a well-formed signature leaks; the bytes do not.
    match hex::decode(signature_hex.trim()) {
        Ok(sig) => mac(secret, payload).verify_slice(&sig).is_ok(),
        Err(_) => false,
    }
}

fn mac(secret: &str, payload: &str) -> HmacSha256 {
    // HMAC takes keys of any length: this error case cannot happen.
    let mut m = HmacSha256::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    m.update(payload.as_bytes());
    m
}

/// Validates the `channel_data` of a presence channel and returns its user id.
pub fn presence_user_id(channel_data: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(channel_data).map_err(|e| {
        format!(
            "invalid channel_data {:?}: not JSON ({e})",
            truncate(channel_data, 60)
        )
    })?;
    let id = match v.get("user_id") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => {
            return Err(format!(
                "invalid channel_data {:?}: it must be a JSON object with a non-empty \"user_id\"",
                truncate(channel_data, 60)
            ))
        }
    };
    if id.len() > 128 {
        return Err(format!(
            "invalid channel_data: user_id {:?} is longer than 128 bytes",
            truncate(&id, 40)
        ));
    }
    Ok(id)
}

/// The string signed for a private or presence subscription.
pub fn auth_payload(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    match channel_data {
        Some(d) => format!("{socket_id}:{channel}:{d}"),
        None => format!("{socket_id}:{channel}"),
    }
}

fn check_auth_inputs(
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> Result<(), String> {
    validate_socket_id(socket_id)?;
    validate_channel(channel)?;
    if channel.starts_with("presence-") {
        match channel_data {
            Some(d) => {
                presence_user_id(d)?;
            }
            None => {
                return Err(format!(
                    "channel {channel:?} is a presence channel: channel_data with a user_id is required"
                ))
            }
        }
    } else if !channel.starts_with("private-") {
        return Err(format!(
            "channel {channel:?} needs no authorization: only private- and presence- channels are authorized"
        ));
    }
    Ok(())
}

/// The JSON body a Pusher auth endpoint returns: `{"auth":"<key>:<hex hmac>"}`
/// plus `channel_data` when given (presence channels require it).
pub fn channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> Result<String, String> {
    check_auth_inputs(socket_id, channel, channel_data)?;
    let sig = sign(secret, &auth_payload(socket_id, channel, channel_data));
    let body = crate::protocol::api::ChannelAuth {
        auth: &format!("{key}:{sig}"),
        channel_data,
    };
    serde_json::to_string(&body).map_err(|e| e.to_string())
}

/// Checks the `auth` field of a `pusher:subscribe` (`"<key>:<hex hmac>"`) in constant time.
pub fn verify_channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> Result<(), String> {
    check_auth_inputs(socket_id, channel, channel_data)?;
    let Some((k, sig)) = auth.split_once(':') else {
        return Err("invalid auth: expected \"<key>:<signature>\"".into());
    };
    if k != key {
        return Err(format!(
            "invalid auth: key {:?} is not this app's key",
            truncate(k, 40)
        ));
    }
    if verify(secret, &auth_payload(socket_id, channel, channel_data), sig) {
        Ok(())
    } else {
        Err(format!("invalid signature for channel {channel:?}"))
    }
}

/// At most `max` bytes of `s`, cut on a character boundary (for error messages).
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "278d425bdf160c739803";
    const SECRET: &str = "7ad3773142a6692b25b8";

    #[test]
    fn known_auth_vector() {
        let body = channel_auth(KEY, SECRET, "1234.1234", "private-foobar", None).unwrap();
        assert_eq!(
            body,
            "{\"auth\":\"278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4\"}"
        );
        verify_channel_auth(
            KEY,
            SECRET,
            "1234.1234",
            "private-foobar",
            None,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4",
        )
        .unwrap();
        assert!(verify_channel_auth(
            KEY,
            SECRET,
            "1234.1234",
            "private-foobar",
            None,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a5",
        )
        .is_err());
        assert!(verify_channel_auth(
            "other",
            SECRET,
            "1234.1234",
            "private-foobar",
            None,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4",
        )
        .is_err());
        assert!(
            verify_channel_auth(KEY, SECRET, "1234.1234", "private-foobar", None, "zz").is_err()
        );
    }

    #[test]
    fn presence_auth() {
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let body = channel_auth(KEY, SECRET, "1234.1234", "presence-foobar", Some(data)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["channel_data"], data);
        let auth = v["auth"].as_str().unwrap();
        verify_channel_auth(
            KEY,
            SECRET,
            "1234.1234",
            "presence-foobar",
            Some(data),
            auth,
        )
        .unwrap();
        assert!(channel_auth(KEY, SECRET, "1234.1234", "presence-foobar", None).is_err());
        assert!(channel_auth(KEY, SECRET, "1234.1234", "presence-x", Some("{}")).is_err());
        assert!(channel_auth(KEY, SECRET, "1234.1234", "presence-x", Some("nope")).is_err());
        assert_eq!(presence_user_id(r#"{"user_id":"u1"}"#).unwrap(), "u1");
    }

    #[test]
    fn auth_input_errors_name_the_value() {
        let e = channel_auth(KEY, SECRET, "12x.4", "private-a", None).unwrap_err();
        assert!(e.contains("12x.4"), "{e}");
        let e = channel_auth(KEY, SECRET, "1.4", "public-a", None).unwrap_err();
        assert!(e.contains("public-a"), "{e}");
        let e = channel_auth(KEY, SECRET, "1.4", "private-a b", None).unwrap_err();
        assert!(e.contains("private-a b"), "{e}");
    }

    #[test]
    fn channel_names() {
        validate_channel("private-upload.abc123").unwrap();
        validate_channel("a-b_c=d@e,f.g;h").unwrap();
        validate_channel(&"x".repeat(164)).unwrap();
        assert!(validate_channel(&"x".repeat(165)).is_err());
        assert!(validate_channel("").is_err());
        assert!(validate_channel("a b").is_err());
        assert!(validate_channel("a/b").is_err());
        assert!(validate_channel("é").is_err());
        assert!(validate_channel("a:b").unwrap_err().contains("a:b"));
    }

    #[test]
    fn event_names() {
        validate_event("progress").unwrap();
        validate_event("client-typing").unwrap();
        validate_event(&"e".repeat(200)).unwrap();
        assert!(validate_event(&"e".repeat(201)).is_err());
        assert!(validate_event("").is_err());
        assert!(validate_event("pusher:subscribe").is_err());
        assert!(validate_event("pusher_internal:x").is_err());
        // Control characters (C0, DEL, C1) are refused and named in the message.
        for bad in [
            "a\nb",
            "a\rb",
            "\u{0}",
            "tab\t",
            "del\u{7f}",
            "c1\u{85}",
            "\u{1b}[31m",
        ] {
            let e = validate_event(bad).unwrap_err();
            assert!(e.contains("control character"), "{bad:?}: {e}");
        }
        validate_event("événement ünïcode").unwrap();
    }

    #[test]
    fn socket_ids() {
        validate_socket_id("1234.5678").unwrap();
        validate_socket_id("0.0").unwrap();
        for bad in ["", ".", "1.", ".1", "1.2.3", "a.1", "1.1a", " 1.1", "-1.1"] {
            assert!(validate_socket_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sign_and_verify() {
        let s = sign("secret", "payload");
        assert_eq!(s.len(), 64);
        assert!(verify("secret", "payload", &s));
        assert!(!verify("secret", "payload2", &s));
        assert!(!verify("secret", "payload", "not hex"));
        assert!(!verify("secret", "payload", &s[..62]));
    }
}
