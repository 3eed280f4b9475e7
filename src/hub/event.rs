//! The hub's typed events: what the ingest socket, the HTTP API and the Redis
//! bridge hand to the router, and what the router delivers.

use std::fmt;

use crate::protocol::ingest::{IngestMessage, ProgressReport, StreamOutcome};

/// Prefix of the channel of an upload: `private-upload.<upload id>`.
pub(crate) const UPLOAD_CHANNEL_PREFIX: &str = "private-upload.";

pub(crate) fn upload_channel(upload_id: &str) -> String {
    format!("{UPLOAD_CHANNEL_PREFIX}{upload_id}")
}

pub(crate) fn is_upload_channel(channel: &str) -> bool {
    channel.starts_with(UPLOAD_CHANNEL_PREFIX)
}

/// A WebSocket connection as Pusher names it: `<connection id>.<random>`
/// (the `socket_id` of `connection_established` and of the events API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SocketId {
    pub conn: u64,
    pub rand: u32,
}

impl SocketId {
    pub fn parse(s: &str) -> Option<SocketId> {
        let (a, b) = s.split_once('.')?;
        Some(SocketId {
            conn: a.parse().ok()?,
            rand: b.parse().ok()?,
        })
    }
}

impl fmt::Display for SocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.conn, self.rand)
    }
}

/// How an upload ended; each has aliases PHP may send as the event name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TerminalKind {
    Complete,
    Aborted,
    Failed,
}

impl TerminalKind {
    /// Event names that end an upload, with their kind.
    const NAMES: [(&'static str, TerminalKind); 7] = [
        ("complete", TerminalKind::Complete),
        ("completed", TerminalKind::Complete),
        ("aborted", TerminalKind::Aborted),
        ("abort", TerminalKind::Aborted),
        ("failed", TerminalKind::Failed),
        ("fail", TerminalKind::Failed),
        ("error", TerminalKind::Failed),
    ];

    pub fn of(event: &str) -> Option<TerminalKind> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == event)
            .map(|(_, k)| *k)
    }

    /// The `state` member of the event's data.
    pub fn state(self) -> &'static str {
        match self {
            TerminalKind::Complete => "complete",
            TerminalKind::Aborted => "aborted",
            TerminalKind::Failed => "failed",
        }
    }

    /// True for the names the hub makes on upload channels (`progress` and
    /// the terminal names): published events may not use them there.
    pub fn is_upload_event(event: &str) -> bool {
        event == "progress" || Self::of(event).is_some()
    }
}

/// One event for the subscribers of one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChannelEvent {
    pub channel: String,
    pub event: String,
    /// The data as the client receives it (a JSON text, usually).
    pub data: String,
    /// Set on the hub's own upload events: a lower or equal seq is stale.
    pub seq: Option<u64>,
    /// The connection that must not receive it (`socket_id` of the events API).
    pub exclude: Option<SocketId>,
}

impl ChannelEvent {
    /// True for a terminal event of an upload (with a seq: made by a hub).
    pub fn ends_upload(&self) -> bool {
        self.seq.is_some()
            && is_upload_channel(&self.channel)
            && TerminalKind::of(&self.event).is_some()
    }
}

/// A body stream ended (see `IngestMessage::StreamEnd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StreamEnd {
    pub upload_id: String,
    pub stream: u64,
    pub outcome: StreamOutcome,
    pub stored_bytes: u64,
    pub chunks_done: u32,
}

/// A terminal report (see `IngestMessage::Terminal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Terminal {
    pub upload_id: String,
    /// The event name PHP sent (a `TerminalKind` name, or another valid name).
    pub event: String,
    /// A JSON object text with extra members of the data.
    pub fields: String,
}

/// What PHP workers report about an upload's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UploadReport {
    Progress(ProgressReport),
    StreamEnd(StreamEnd),
    Terminal(Terminal),
}

impl UploadReport {
    pub fn upload_id(&self) -> &str {
        match self {
            UploadReport::Progress(r) => &r.upload_id,
            UploadReport::StreamEnd(r) => &r.upload_id,
            UploadReport::Terminal(r) => &r.upload_id,
        }
    }

    pub fn channel(&self) -> String {
        upload_channel(self.upload_id())
    }
}

impl TryFrom<IngestMessage> for UploadReport {
    type Error = IngestMessage;

    /// The body reports of the ingest protocol; any other message is handed back.
    fn try_from(m: IngestMessage) -> Result<UploadReport, IngestMessage> {
        Ok(match m {
            IngestMessage::Progress(r) => UploadReport::Progress(r),
            IngestMessage::StreamEnd {
                upload_id,
                stream,
                outcome,
                stored_bytes,
                chunks_done,
            } => UploadReport::StreamEnd(StreamEnd {
                upload_id,
                stream,
                outcome,
                stored_bytes,
                chunks_done,
            }),
            IngestMessage::Terminal {
                upload_id,
                event,
                fields,
            } => UploadReport::Terminal(Terminal {
                upload_id,
                event,
                fields,
            }),
            other => return Err(other),
        })
    }
}

/// What the router routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A published event (PHP `publish()`, the HTTP events API).
    Channel(ChannelEvent),
    /// A report of an Upload's body.
    Upload(UploadReport),
    /// A report of a plain request tagged with an id: already checked against
    /// the Uploads this hub knows; the Redis script checks those of every host.
    Tagged(UploadReport),
}

impl Event {
    pub fn channel(&self) -> String {
        match self {
            Event::Channel(e) => e.channel.clone(),
            Event::Upload(r) | Event::Tagged(r) => r.channel(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids() {
        let s = SocketId::parse("12.345").unwrap();
        assert_eq!(
            s,
            SocketId {
                conn: 12,
                rand: 345
            }
        );
        assert_eq!(s.to_string(), "12.345");
        assert!(SocketId::parse("12").is_none());
        assert!(SocketId::parse("a.1").is_none());
        assert!(SocketId::parse("1.99999999999").is_none());
    }

    #[test]
    fn terminal_names() {
        assert_eq!(TerminalKind::of("completed"), Some(TerminalKind::Complete));
        assert_eq!(TerminalKind::of("error").map(|k| k.state()), Some("failed"));
        assert_eq!(TerminalKind::of("progress"), None);
        assert!(TerminalKind::is_upload_event("progress"));
        assert!(TerminalKind::is_upload_event("abort"));
        assert!(!TerminalKind::is_upload_event("custom"));
    }
}
