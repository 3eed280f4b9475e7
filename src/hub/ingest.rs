//! The ingest socket: PHP processes of the same user send length-prefixed
//! frames (`crate::protocol::ingest`), one connection per process, kept open.
//! A malformed frame closes that connection only.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::event::{ChannelEvent, Event, UploadReport};
use super::frames::data_seq;
use super::http::MAX_EVENT_DATA;
use super::router::route;
use super::uploads::refuse_published;
use super::{lock, log, Hub, Metrics};
use crate::protocol::ingest::{self, IngestMessage};
use crate::protocol::pusher;

pub(crate) async fn accept_loop(
    hub: Arc<Hub>,
    listener: UnixListener,
    down: watch::Receiver<bool>,
) {
    let d = down.clone();
    super::accept::accept_loop("ingest accept", listener, down, |(s, _)| {
        tokio::spawn(connection(hub.clone(), s, d.clone()));
        std::future::ready(())
    })
    .await;
}

struct Gauge<'a>(&'a Hub);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0
            .metrics
            .ingest_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connections from another uid arrive at flood speed: one line per 10 s.
static REFUSED_LOG: super::RateLog = super::RateLog::new();
static BAD_FRAME_LOG: super::RateLog = super::RateLog::new();

async fn connection(hub: Arc<Hub>, mut s: UnixStream, mut down: watch::Receiver<bool>) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    match s.peer_cred() {
        Ok(c) if c.uid() == euid => {}
        Ok(c) => {
            REFUSED_LOG.log(format_args!(
                "ingest connection from uid {} refused (the hub runs as uid {euid})",
                c.uid()
            ));
            Metrics::add(&hub.metrics.ingest_errors, 1);
            return;
        }
        Err(e) => {
            REFUSED_LOG.log(format_args!("ingest connection without credentials: {e}"));
            Metrics::add(&hub.metrics.ingest_errors, 1);
            return;
        }
    }
    Metrics::add(&hub.metrics.ingest_connections, 1);
    let _gauge = Gauge(&hub);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut reply: Vec<u8> = Vec::new();
    loop {
        let mut off = 0;
        loop {
            match ingest::frame_len(&buf[off..]) {
                Ok(Some((len, total))) => {
                    let body = &buf[off + 4..off + 4 + len];
                    match ingest::decode(body) {
                        Ok(msg) => handle(&hub, msg, &mut reply).await,
                        Err(e) => {
                            BAD_FRAME_LOG.log(format_args!("ingest connection closed: {e}"));
                            Metrics::add(&hub.metrics.ingest_errors, 1);
                            return;
                        }
                    }
                    off += total;
                }
                Ok(None) => break,
                Err(e) => {
                    BAD_FRAME_LOG.log(format_args!("ingest connection closed: {e}"));
                    Metrics::add(&hub.metrics.ingest_errors, 1);
                    return;
                }
            }
        }
        buf.drain(..off);
        if !reply.is_empty() {
            let w = tokio::time::timeout(Duration::from_secs(5), s.write_all(&reply)).await;
            if !matches!(w, Ok(Ok(()))) {
                return;
            }
            reply.clear();
            if reply.capacity() > 64 * 1024 {
                reply = Vec::new();
            }
        }
        if buf.is_empty() && buf.capacity() > 256 * 1024 {
            buf = Vec::with_capacity(64 * 1024);
        }
        // Large reads: a busy PHP process queues hundreds of small frames, and
        // one read per few frames would cost a syscall each.
        buf.reserve(64 * 1024);
        let r = tokio::select! {
            _ = down.changed() => return,
            r = s.read_buf(&mut buf) => r,
        };
        match r {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn handle(hub: &Hub, msg: IngestMessage, reply: &mut Vec<u8>) {
    match msg {
        IngestMessage::Hello { version, dropped } => {
            Metrics::add(&hub.metrics.events_dropped, dropped);
            // Only a newer extension takes over: while old and new workers
            // overlap (rolling reload), an older one must not restart the hub.
            if version_newer(&version, &hub.version) {
                log(format_args!(
                    "a PHP process runs version {version:?} (this hub: {:?}): handing over",
                    hub.version
                ));
                hub.request_stop(format!("hand-over to version {version:?}"));
            }
        }
        IngestMessage::Publish {
            channel,
            event,
            data,
        } => {
            if pusher::validate_channel(&channel).is_err()
                || pusher::validate_event(&event).is_err()
                || data.len() > MAX_EVENT_DATA
            {
                Metrics::add(&hub.metrics.events_in, 1);
                Metrics::add(&hub.metrics.events_dropped, 1);
                return;
            }
            if refuse_published(&channel, &event, &data).is_some() {
                Metrics::add(&hub.metrics.events_in, 1);
                Metrics::add(&hub.metrics.events_dropped, 1);
                Metrics::add(&hub.metrics.published_refused, 1);
                return;
            }
            // A seq in published data orders nothing: it is the upload's own
            // (a publish() with "seq" => 1e300 silenced a channel).
            route(
                hub,
                Event::Channel(ChannelEvent {
                    channel,
                    event,
                    data,
                    seq: None,
                    exclude: None,
                }),
            );
        }
        IngestMessage::TaggedRequest(inner) => {
            let Ok(report) = UploadReport::try_from(*inner) else {
                return;
            };
            if hub.is_upload(report.upload_id()) {
                // A plain request tagged with the id of an Upload (anyone
                // can send one): it never speaks on that Upload's channel.
                Metrics::add(&hub.metrics.events_in, 1);
                Metrics::add(&hub.metrics.events_dropped, 1);
                Metrics::add(&hub.metrics.tagged_refused, 1);
                return;
            }
            route(hub, Event::Tagged(report));
        }
        m @ (IngestMessage::Progress(_)
        | IngestMessage::StreamEnd { .. }
        | IngestMessage::Terminal { .. }) => {
            let Ok(report) = UploadReport::try_from(m) else {
                return;
            };
            hub.note_upload(report.upload_id());
            route(hub, Event::Upload(report));
        }
        IngestMessage::QueryProgress { upload_id } => {
            let mut data = lock(&hub.state).channels.latest_upload_data(&upload_id);
            if let Some(b) = &hub.redis {
                // Other hosts may know newer events (this hub sees them only
                // while it has subscribers): the higher seq wins.
                if let Some(remote) = b.latest_upload_data(&upload_id).await {
                    let local_seq = data.as_deref().and_then(data_seq).unwrap_or(0);
                    if data.is_none() || data_seq(&remote).unwrap_or(0) > local_seq {
                        data = Some(remote);
                    }
                }
            }
            ingest::encode_raw(data.as_deref().unwrap_or("").as_bytes(), reply);
        }
        IngestMessage::QueryStatus => {
            ingest::encode_raw(hub.status_json().as_bytes(), reply);
        }
    }
}

/// True when semver `a` is newer than `b` (pre-release tags sort before the
/// release, `rc.10` after `rc.9`); a version that does not parse never takes over.
fn version_newer(a: &str, b: &str) -> bool {
    match (
        semver::Version::parse(a.trim()),
        semver::Version::parse(b.trim()),
    ) {
        (Ok(a), Ok(b)) => a.cmp_precedence(&b) == std::cmp::Ordering::Greater,
        _ => false,
    }
}

#[cfg(test)]
mod version_tests {
    use super::version_newer;

    #[test]
    fn only_newer_versions_take_over() {
        assert!(version_newer("0.2.0", "0.1.9"));
        assert!(version_newer("0.10.0", "0.9.0"));
        assert!(version_newer("1.0.0", "1.0.0-rc.1"));
        assert!(!version_newer("0.1.0", "0.1.0"));
        assert!(!version_newer("0.1.0", "0.2.0"));
        assert!(!version_newer("1.0.0-rc.1", "1.0.0"));
        // Before: pre-release tags were compared as strings.
        assert!(version_newer("1.0.0-rc.10", "1.0.0-rc.9"));
        assert!(!version_newer("1.0.0-rc.9", "1.0.0-rc.10"));
        assert!(!version_newer("garbage", "1.0.0"));
    }
}
