//! The accept loops of the hub's listeners (TCP and the ingest socket).

use std::future::Future;
use std::time::Instant;

use tokio::sync::watch;

use super::log;

/// A listener the hub accepts connections from.
pub(crate) trait Acceptor {
    type Conn;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Acceptor for tokio::net::TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send {
        self.accept()
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Conn = (tokio::net::UnixStream, tokio::net::unix::SocketAddr);
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send {
        self.accept()
    }
}

/// Accepts connections until `down` changes and hands each to `accepted`;
/// after a failed accept it pauses (see `accept_failed`).
pub(crate) async fn accept_loop<A, F, Fut>(
    what: &str,
    listener: A,
    mut down: watch::Receiver<bool>,
    mut accepted: F,
) where
    A: Acceptor,
    F: FnMut(A::Conn) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut last_log: Option<Instant> = None;
    loop {
        let r = tokio::select! {
            _ = down.changed() => return,
            r = listener.accept_one() => r,
        };
        match r {
            Ok(c) => accepted(c).await,
            Err(e) => {
                let pause = accept_failed(what, &e, &mut last_log);
                tokio::select! {
                    _ = down.changed() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// After a failed accept(): logs at most every 10 s and says how long to
/// pause. EMFILE/ENFILE/ENOBUFS/ENOMEM leave the connection in the backlog,
/// so retrying at once would spin.
fn accept_failed(
    what: &str,
    e: &std::io::Error,
    last_log: &mut Option<std::time::Instant>,
) -> std::time::Duration {
    if last_log.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(10)) {
        log(format_args!("{what} failed: {e}"));
        *last_log = Some(std::time::Instant::now());
    }
    let resource = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    std::time::Duration::from_millis(if resource { 100 } else { 5 })
}
