//! What the bridge writes to Redis: key names and the pub/sub message format.

use crate::hub::event::SocketId;
use crate::redis_url::key_prefix;

pub(crate) struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn new(app_id: &str) -> Keys {
        Keys {
            prefix: key_prefix(app_id),
        }
    }
    pub fn latest(&self, ch: &str) -> String {
        format!("{}latest:{{{ch}}}", self.prefix)
    }
    pub fn agg(&self, ch: &str) -> String {
        format!("{}agg:{{{ch}}}", self.prefix)
    }
    /// The Upload state of the storage layer (`storage::redis_state`).
    pub fn upload_state(&self, ch: &str) -> String {
        format!("{}upload:{{{ch}}}", self.prefix)
    }
    pub fn events(&self, ch: &str) -> String {
        format!("{}ev:{{{ch}}}", self.prefix)
    }
    /// The channel occupancy of hub `id` (`occupancy.rs`).
    pub fn occupancy(&self, id: &str) -> String {
        format!("{}occ:{id}", self.prefix)
    }
    /// The live hubs (a sorted set: score is when the entry expires, unix ms).
    pub fn hubs(&self) -> String {
        format!("{}hubs", self.prefix)
    }
    /// The pub/sub channel of commands to every hub (terminate connections).
    pub fn control(&self) -> String {
        format!("{}ctl", self.prefix)
    }
    /// The hub channel of a Redis pub/sub channel name.
    pub fn channel_of<'a>(&self, redis_channel: &'a str) -> Option<&'a str> {
        redis_channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("ev:{")?
            .strip_suffix('}')
    }
}

/// Message on the pub/sub channel: `origin \n seq \n exclude \n event \n data`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Wire<'a> {
    pub origin: &'a str,
    pub seq: Option<u64>,
    pub exclude: Option<SocketId>,
    pub event: &'a str,
    pub data: &'a str,
}

pub(crate) fn parse_wire(msg: &str) -> Option<Wire<'_>> {
    let mut it = msg.splitn(5, '\n');
    let origin = it.next()?;
    let seq = it.next()?;
    let exclude = it.next()?;
    let event = it.next()?;
    let data = it.next()?;
    let seq = if seq.is_empty() {
        None
    } else {
        Some(seq.parse().ok()?)
    };
    let exclude = SocketId::parse(exclude);
    Some(Wire {
        origin,
        seq,
        exclude,
        event,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("app{1}");
        let ch = "private-upload.abc";
        assert_eq!(k.latest(ch), "up:app_1_:latest:{private-upload.abc}");
        assert_eq!(k.agg(ch), "up:app_1_:agg:{private-upload.abc}");
        assert_eq!(k.events(ch), "up:app_1_:ev:{private-upload.abc}");
        assert_eq!(k.channel_of(&k.events(ch)), Some(ch));
        assert_eq!(k.channel_of("up:other:ev:{x}"), None);
    }

    #[test]
    fn wire_messages() {
        let w = parse_wire("hub1\n17\n3.99\nprogress\n{\"a\":\n1}").unwrap();
        assert_eq!(
            w,
            Wire {
                origin: "hub1",
                seq: Some(17),
                exclude: Some(SocketId { conn: 3, rand: 99 }),
                event: "progress",
                data: "{\"a\":\n1}"
            }
        );
        let w = parse_wire("h\n\n\ne\n").unwrap();
        assert_eq!((w.seq, w.exclude, w.data), (None, None, ""));
        assert!(parse_wire("h\nx\n\ne\nd").is_none());
        assert!(parse_wire("h\n1").is_none());
    }
}
