//! The hub's state under one mutex: its channels and its upload aggregator.
//! Reports become events here (single host) and events are delivered here.

use std::time::Duration;

use super::channels::{Channels, Ctx};
use super::event::{ChannelEvent, UploadReport};
use super::uploads::Uploads;
use super::Metrics;
use crate::protocol::pusher;

#[derive(Default)]
pub(crate) struct State {
    pub channels: Channels,
    pub uploads: Uploads,
}

impl State {
    /// Delivers `ev` to this hub's subscribers; a terminal upload event also
    /// ends the local aggregation of that upload. False when stale.
    pub fn deliver(&mut self, ctx: &Ctx<'_>, ev: &ChannelEvent) -> bool {
        if !self.channels.deliver(ctx, ev) {
            return false;
        }
        if ev.ends_upload() {
            if let Some(id) = ev.channel.strip_prefix(super::event::UPLOAD_CHANNEL_PREFIX) {
                self.uploads.finish(id);
            }
            self.channels.mark_finished(&ev.channel);
        }
        true
    }

    /// Folds a report into this host's aggregation and delivers the event it makes.
    pub fn report(&mut self, ctx: &Ctx<'_>, r: &UploadReport) {
        let channel = r.channel();
        let valid = pusher::validate_channel(&channel).is_ok()
            && match r {
                UploadReport::Terminal(t) => pusher::validate_event(&t.event).is_ok(),
                _ => !self.channels.is_finished(&channel),
            };
        if !valid {
            Metrics::add(&ctx.metrics.events_dropped, 1);
            return;
        }
        let seq = self.channels.next_seq(&channel);
        let ev = match r {
            UploadReport::Progress(p) => self.uploads.progress(p, seq),
            UploadReport::StreamEnd(e) => {
                let latest = self.channels.latest_data(&channel);
                self.uploads.stream_end(e, seq, latest)
            }
            UploadReport::Terminal(t) => Some(self.uploads.terminal(t, seq)),
        };
        match ev {
            Some(ev) => {
                self.deliver(ctx, &ev);
            }
            // Nothing known about its size (the hub restarted): nothing to report.
            None => Metrics::add(&ctx.metrics.events_dropped, 1),
        }
    }

    /// A latest event fetched from Redis: delivered when it is newer than
    /// what this hub has (by seq; without seq only when there is nothing).
    pub fn offer_latest(&mut self, ctx: &Ctx<'_>, ev: &ChannelEvent) -> bool {
        self.channels.wants_latest(&ev.channel, ev.seq) && self.deliver(ctx, ev)
    }

    /// Forgets idle uploads and latest events of channels without subscribers
    /// older than `retention`.
    pub fn sweep(&mut self, retention: Duration) {
        self.uploads.sweep(retention);
        self.channels.sweep(retention);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::hub::conn::{Conn, Pop};
    use crate::hub::event::{StreamEnd, Terminal};
    use crate::protocol::ingest::{ProgressReport, StreamOutcome};

    fn ctx(m: &Metrics) -> Ctx<'_> {
        Ctx { metrics: m, cap: 4 }
    }

    fn ev(channel: &str, data: &str, seq: Option<u64>) -> ChannelEvent {
        ChannelEvent {
            channel: channel.into(),
            event: "e".into(),
            data: data.into(),
            seq,
            exclude: None,
        }
    }

    #[test]
    fn stale_seq_is_dropped_and_latest_kept() {
        let m = Metrics::default();
        let mut state = State::default();
        let c = Arc::new(Conn::new(1, 7));
        state.channels.subscribe(&ctx(&m), &c, "ch", None);
        assert!(state.deliver(&ctx(&m), &ev("ch", r#"{"seq":5}"#, Some(5))));
        assert!(!state.deliver(&ctx(&m), &ev("ch", r#"{"seq":5}"#, Some(5))));
        assert!(!state.deliver(&ctx(&m), &ev("ch", r#"{"seq":4}"#, Some(4))));
        assert!(state.deliver(&ctx(&m), &ev("ch", r#"{"seq":6}"#, Some(6))));
        assert_eq!(Metrics::get(&m.events_dropped), 2);
        let mut got = vec![];
        while let Pop::Msg(x) = c.pop() {
            got.push(x.to_string());
        }
        assert_eq!(got.len(), 2);
        assert!(got[1].contains("\\\"seq\\\":6"));
    }

    #[test]
    fn full_queue_evicts() {
        let m = Metrics::default();
        let mut state = State::default();
        let c = Arc::new(Conn::new(1, 7));
        state.channels.subscribe(&ctx(&m), &c, "ch", None);
        for _ in 0..5 {
            state.deliver(&ctx(&m), &ev("ch", "x", None));
        }
        assert_eq!(Metrics::get(&m.evictions), 1);
        assert_eq!(state.channels.subscriptions, 0);
        assert!(matches!(c.pop(), Pop::Close(4100, _)));
    }

    #[test]
    fn aggregation_of_parallel_streams() {
        let m = Metrics::default();
        let mut state = State::default();
        let c = Arc::new(Conn::new(1, 7));
        state
            .channels
            .subscribe(&ctx(&m), &c, "private-upload.u1", None);
        let rep = |stream, inflight, stored, done| {
            UploadReport::Progress(ProgressReport {
                upload_id: "u1".into(),
                stream,
                bytes_total: 1000,
                chunk_count: 10,
                stored_bytes: stored,
                chunks_done: done,
                inflight,
            })
        };
        let end = |stream, outcome| {
            UploadReport::StreamEnd(StreamEnd {
                upload_id: "u1".into(),
                stream,
                outcome,
                stored_bytes: 100,
                chunks_done: 1,
            })
        };
        state.report(&ctx(&m), &rep(1, 50, 0, 0));
        state.report(&ctx(&m), &rep(2, 70, 0, 0));
        state.report(&ctx(&m), &end(1, StreamOutcome::Stored));
        state.report(&ctx(&m), &end(2, StreamOutcome::Failed));
        let data = state.channels.latest_upload_data("u1").unwrap();
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["bytes_done"], 100);
        assert_eq!(v["chunks_done"], 1);
        assert_eq!(v["state"], "uploading");
        let mut done = vec![];
        while let Pop::Msg(_) = c.pop() {
            done.push(());
        }
        // Queue cap 4 and 4 events: nothing evicted.
        assert_eq!(done.len(), 4);
        let terminal = UploadReport::Terminal(Terminal {
            upload_id: "u1".into(),
            event: "complete".into(),
            fields: r#"{"path":"/x","seq":1}"#.into(),
        });
        state.report(&ctx(&m), &terminal);
        let latest = state.channels.latest_upload_data("u1").unwrap();
        let v: serde_json::Value = serde_json::from_str(&latest).unwrap();
        assert_eq!(v["state"], "complete");
        assert_eq!(v["bytes_total"], 1000);
        assert_eq!(v["path"], "/x");
        assert!(v["seq"].as_u64().unwrap() > 1);
        // Late reports after the terminal event are dropped.
        state.report(&ctx(&m), &rep(3, 5, 0, 0));
        let latest = state.channels.latest_upload_data("u1").unwrap();
        let v: serde_json::Value = serde_json::from_str(&latest).unwrap();
        assert_eq!(v["state"], "complete");
    }

    #[test]
    fn sweep_forgets_idle_channels() {
        let m = Metrics::default();
        let mut state = State::default();
        state.deliver(&ctx(&m), &ev("a", "x", None));
        assert_eq!(state.channels.retained_count(), 1);
        state.sweep(Duration::from_secs(3600));
        assert_eq!(state.channels.retained_count(), 1);
        state.sweep(Duration::ZERO);
        assert_eq!(state.channels.retained_count(), 0);
        assert_eq!(state.channels.latest_bytes(), 0);
    }
}
