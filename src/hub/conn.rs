//! The part of a WebSocket connection that other tasks see: a small bounded
//! queue of serialized frames and a close request. Pushing never waits: a
//! full queue marks the connection as a slow consumer.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::event::SocketId;
use super::lock;

/// The part of a WebSocket connection that other tasks see: a small bounded
/// queue of serialized frames and a close request.
pub(crate) struct Conn {
    pub id: u64,
    pub rand: u32,
    q: Mutex<Queue>,
    pub notify: Notify,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Utf8Bytes>,
    close: Option<(u16, &'static str)>,
}

pub(crate) enum Push {
    Ok,
    /// The queue was full: the connection is now marked for eviction.
    Full,
    Closed,
}

pub(crate) enum Pop {
    Msg(Utf8Bytes),
    Close(u16, &'static str),
    Empty,
}

impl Conn {
    pub fn new(id: u64, rand: u32) -> Conn {
        Conn {
            id,
            rand,
            q: Mutex::new(Queue::default()),
            notify: Notify::new(),
        }
    }

    pub fn socket_id(&self) -> SocketId {
        SocketId {
            conn: self.id,
            rand: self.rand,
        }
    }

    /// Queues a frame; never blocks. A full queue marks the connection as a
    /// slow consumer (closed with 4100).
    pub fn push(&self, frame: Utf8Bytes, cap: usize) -> Push {
        let mut q = lock(&self.q);
        if q.close.is_some() {
            return Push::Closed;
        }
        if q.items.len() >= cap {
            q.items = VecDeque::new();
            q.close = Some((4100, "Slow consumer: too many undelivered messages"));
            drop(q);
            self.notify.notify_one();
            return Push::Full;
        }
        q.items.push_back(frame);
        drop(q);
        self.notify.notify_one();
        Push::Ok
    }

    /// Asks the connection's task to close with `code`; false when already closing.
    pub fn close(&self, code: u16, reason: &'static str) -> bool {
        let mut q = lock(&self.q);
        if q.close.is_some() {
            return false;
        }
        q.close = Some((code, reason));
        q.items = VecDeque::new();
        drop(q);
        self.notify.notify_one();
        true
    }

    /// Next thing the connection's task must do. A close request wins over
    /// queued frames.
    pub fn pop(&self) -> Pop {
        let mut q = lock(&self.q);
        if let Some((code, reason)) = q.close {
            return Pop::Close(code, reason);
        }
        match q.items.pop_front() {
            Some(m) => Pop::Msg(m),
            None => {
                if q.items.capacity() > 16 {
                    q.items = VecDeque::new();
                }
                Pop::Empty
            }
        }
    }
}
