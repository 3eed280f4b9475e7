//! The bridge's Lua scripts (`*.lua` next to this file) and their arguments,
//! by name: each script names its ARGV in its first lines, in the order the
//! `args` functions here pass them.

use redis::{Script, ScriptInvocation};

use super::wire::Keys;
use crate::hub::event::{StreamEnd, Terminal, UploadReport};
use crate::hub::uploads::terminal_data;
use crate::protocol::ingest::StreamOutcome;

/// Stream fields of an upload aggregation are dropped after this much silence.
const STREAM_STALE_MS: u64 = 120_000;

pub(super) struct Scripts {
    pub event: Script,
    pub upload: Script,
    pub reset: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            event: Script::new(include_str!("event.lua")),
            upload: Script::new(include_str!("upload.lua")),
            reset: Script::new(include_str!("reset.lua")),
        }
    }
}

/// What every script that publishes needs to know about this hub.
pub(super) struct Publisher<'a> {
    pub keys: &'a Keys,
    /// This hub's id (published with every event; its own echo is ignored).
    pub origin: &'a str,
    pub ttl_s: u64,
    /// Redis Cluster: SPUBLISH instead of PUBLISH.
    pub sharded: bool,
}

fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

/// `event.lua`: keep as latest (unless stale) and publish.
pub(super) struct EventArgs<'a> {
    pub channel: &'a str,
    pub event: &'a str,
    pub data: &'a str,
    pub seq: Option<u64>,
    /// A socket id, or empty.
    pub exclude: String,
    /// Published on an upload channel: delivered, never kept as latest.
    pub transient: bool,
}

impl EventArgs<'_> {
    pub fn invocation<'s>(&self, script: &'s Script, p: &Publisher<'_>) -> ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        inv.key(p.keys.latest(self.channel))
            .arg(p.keys.events(self.channel)) // events_channel
            .arg(p.origin) // origin
            .arg(self.event) // event
            .arg(self.data) // data
            .arg(self.seq.map_or(String::new(), |s| s.to_string())) // seq
            .arg(p.ttl_s) // ttl
            .arg(flag(p.sharded)) // sharded
            .arg(&self.exclude) // exclude
            .arg(flag(self.transient)); // transient
        inv
    }
}

/// `upload.lua`: fold one report into the cross-host aggregation.
pub(super) struct UploadArgs {
    pub channel: String,
    /// Lower bound of the seq: above everything this hub delivered.
    pub seq_floor: u64,
    pub now_ms: u64,
    /// A plain tagged request (refused on the channel of an Upload).
    pub tagged: bool,
}

impl UploadArgs {
    pub fn invocation<'s>(
        &self,
        script: &'s Script,
        p: &Publisher<'_>,
        report: &UploadReport,
    ) -> ScriptInvocation<'s> {
        let id = report.upload_id();
        let (mut kind, mut stream) = ("p", 0u64);
        let (mut total, mut count, mut stored, mut chunks, mut inflight) =
            (0u64, 0u32, 0u64, 0u32, 0u64);
        let (mut t_event, mut t_prefix, mut t_has_total) = ("", String::new(), false);
        match report {
            UploadReport::Progress(r) => {
                stream = r.stream;
                (total, count, stored, chunks, inflight) = (
                    r.bytes_total,
                    r.chunk_count,
                    r.stored_bytes,
                    r.chunks_done,
                    r.inflight,
                );
            }
            UploadReport::StreamEnd(StreamEnd {
                stream: s,
                outcome,
                stored_bytes,
                chunks_done,
                ..
            }) => {
                kind = if *outcome == StreamOutcome::Stored {
                    "s"
                } else {
                    "f"
                };
                stream = *s;
                (stored, chunks) = (*stored_bytes, *chunks_done);
            }
            UploadReport::Terminal(t) => {
                kind = "t";
                let (prefix, has_total) = terminal_prefix(t);
                t_event = &t.event;
                t_prefix = prefix;
                t_has_total = has_total;
            }
        }
        let ch = self.channel.as_str();
        let mut inv = script.prepare_invoke();
        inv.key(p.keys.agg(ch))
            .key(p.keys.latest(ch))
            .key(p.keys.upload_state(ch))
            .arg(p.keys.events(ch)) // events_channel
            .arg(p.origin) // origin
            .arg(p.ttl_s) // ttl_s
            .arg(flag(p.sharded)) // sharded
            .arg(self.seq_floor) // seq_floor
            .arg(self.now_ms) // now_ms
            .arg(kind) // kind
            .arg(serde_json::to_string(id).unwrap_or_default()) // upload_id_json
            .arg(format!("{}:{stream}", p.origin)) // stream
            .arg(total) // bytes_total
            .arg(count) // chunk_count
            .arg(stored) // stored_bytes
            .arg(chunks) // chunks_done
            .arg(inflight) // inflight
            .arg(t_event) // terminal_event
            .arg(t_prefix) // terminal_prefix
            .arg(flag(t_has_total)) // terminal_has_total
            .arg(STREAM_STALE_MS) // stream_stale_ms
            .arg(flag(self.tagged)); // tagged
        inv
    }
}

/// `reset.lua`: after an outage, drop this hub's stream fields of an upload.
pub(super) fn reset_invocation<'s>(
    script: &'s Script,
    p: &Publisher<'_>,
    channel: &str,
    finished: bool,
) -> ScriptInvocation<'s> {
    let mut inv = script.prepare_invoke();
    inv.key(p.keys.agg(channel))
        .arg(format!("s:{}:", p.origin)) // stream_prefix
        .arg(flag(finished)) // finished
        .arg(p.ttl_s); // ttl
    inv
}

/// The data of a terminal report without `seq` and the closing brace:
/// `{"k":v,...,` (the script appends `"seq":N}`); whether the fields carry
/// `bytes_total`. The same members as the local aggregator builds.
fn terminal_prefix(t: &Terminal) -> (String, bool) {
    let obj = terminal_data(&t.upload_id, &t.event, &t.fields);
    let has_total = obj.contains_key("bytes_total");
    let mut s = serde_json::Value::Object(obj).to_string();
    s.pop();
    s.push(',');
    (s, has_total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(event: &str, fields: &str) -> Terminal {
        Terminal {
            upload_id: "u1".into(),
            event: event.into(),
            fields: fields.into(),
        }
    }

    #[test]
    fn terminal_prefixes() {
        let (p, has_total) =
            terminal_prefix(&t("complete", r#"{"path":"/x","seq":4,"bytes_total":9}"#));
        assert!(has_total);
        let full = format!("{p}\"seq\":12}}");
        let v: serde_json::Value = serde_json::from_str(&full).unwrap();
        assert_eq!(v["seq"], 12);
        assert_eq!(v["state"], "complete");
        assert_eq!(v["upload_id"], "u1");
        assert_eq!(v["path"], "/x");
        let (p, has_total) = terminal_prefix(&t("aborted", "not json"));
        assert!(!has_total);
        let v: serde_json::Value = serde_json::from_str(&format!("{p}\"seq\":1}}")).unwrap();
        assert_eq!(v["state"], "aborted");
    }

    #[test]
    fn scripts_name_their_arguments() {
        // Every ARGV is bound to a name on the first lines; none is used by position.
        for src in [
            include_str!("event.lua"),
            include_str!("upload.lua"),
            include_str!("reset.lua"),
        ] {
            assert!(src.contains("= unpack(ARGV)"));
            assert!(!src.contains("ARGV["), "{src}");
        }
    }
}
