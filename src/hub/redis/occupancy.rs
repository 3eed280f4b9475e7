//! Channel queries across hosts. Each hub keeps its own occupancy (channels
//! with local subscribers: subscriber count, presence user ids) in Redis
//! under `occ:<hub id>`, rewritten when it changes and at every PING tick,
//! with a TTL of a few ticks; the live hubs are listed in the sorted set
//! `hubs` (score: when the entry expires). A query reads the snapshots of
//! the other live hubs and adds this hub's live state. A termination is
//! published on the `ctl` channel every hub subscribes to.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::connection::RedisConn;
use super::Bridge;
use crate::hub::channels::Occupancy;
use crate::hub::{lock, now_ms, Hub};

impl Bridge {
    /// How long a hub's snapshot lives without being refreshed.
    fn occupancy_ttl(&self) -> Duration {
        (self.ping_every * 5).max(Duration::from_secs(3))
    }

    /// Local subscriptions or presence members changed: rewrite this hub's
    /// snapshot soon.
    pub fn occupancy_changed(&self) {
        self.occupancy_dirty.store(true, Ordering::SeqCst);
        self.occupancy_wake.notify_one();
    }

    fn unusable(&self) -> Result<RedisConn, String> {
        if !self.connected.load(Ordering::SeqCst) {
            return Err("Redis is unreachable: the other hosts cannot be asked".into());
        }
        self.current()
            .ok_or_else(|| "Redis is unreachable: the other hosts cannot be asked".into())
    }

    /// The occupancy of the other live hubs, channels starting with `prefix`.
    pub async fn remote_occupancy(&self, prefix: &str) -> Result<Occupancy, String> {
        let mut c = self.unusable()?;
        let work = async {
            let mut cmd = redis::cmd("ZRANGEBYSCORE");
            cmd.arg(self.keys.hubs()).arg(now_ms()).arg("+inf");
            let ids: Vec<String> = c.query(&cmd).await.map_err(|e| e.to_string())?;
            let mut all = Occupancy::default();
            for id in ids.iter().filter(|id| **id != self.id) {
                let mut get = redis::cmd("GET");
                get.arg(self.keys.occupancy(id));
                let snap: Option<String> = c.query(&get).await.map_err(|e| e.to_string())?;
                let Some(snap) = snap else { continue };
                if let Ok(mut o) = serde_json::from_str::<Occupancy>(&snap) {
                    o.channels.retain(|name, _| name.starts_with(prefix));
                    all.merge(o);
                }
            }
            Ok::<Occupancy, String>(all)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(e)) => {
                self.failed("reading the other hosts' channels", &e);
                Err(format!("Redis failed: {e}"))
            }
            Err(_) => {
                self.failed("reading the other hosts' channels", &"timed out");
                Err("Redis did not answer in time".into())
            }
        }
    }

    /// Asks the other hubs to close the connections of presence member `user_id`.
    pub async fn publish_terminate(&self, user_id: &str) -> Result<(), String> {
        let mut c = self.unusable()?;
        let mut cmd = redis::cmd(if self.settings.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        });
        cmd.arg(self.keys.control())
            .arg(format!("terminate\n{}\n{user_id}", self.id));
        match tokio::time::timeout(self.timeout, c.query::<i64>(&cmd)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                self.failed("publishing a termination", &e);
                Err(format!("Redis failed: {e}"))
            }
            Err(_) => {
                self.failed("publishing a termination", &"timed out");
                Err("Redis did not answer in time".into())
            }
        }
    }
}

/// Writes this hub's snapshot and its entry in the list of live hubs.
pub(super) async fn write_occupancy(
    hub: &Hub,
    bridge: &Bridge,
    conn: &mut RedisConn,
) -> Result<(), String> {
    let snap = lock(&hub.state).channels.occupancy("");
    let text = serde_json::to_string(&snap).unwrap_or_default();
    let ttl = bridge.occupancy_ttl();
    let now = now_ms();
    let mut set = redis::cmd("SET");
    set.arg(bridge.keys.occupancy(&bridge.id))
        .arg(text)
        .arg("PX")
        .arg(ttl.as_millis() as u64);
    let mut add = redis::cmd("ZADD");
    add.arg(bridge.keys.hubs())
        .arg(now + ttl.as_millis() as u64)
        .arg(&bridge.id);
    let mut prune = redis::cmd("ZREMRANGEBYSCORE");
    prune.arg(bridge.keys.hubs()).arg("-inf").arg(now);
    let work = async {
        conn.query::<()>(&set).await?;
        conn.query::<()>(&add).await?;
        conn.query::<()>(&prune).await
    };
    match tokio::time::timeout(bridge.timeout, work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("writing the channel occupancy: {e}")),
        Err(_) => Err("writing the channel occupancy: timed out".into()),
    }
}

/// A message on the `ctl` channel: `terminate \n origin \n user id`; the user
/// id when it asks this hub (not the origin) to terminate connections.
pub(super) fn parse_terminate<'a>(msg: &'a str, own_id: &str) -> Option<&'a str> {
    let mut it = msg.splitn(3, '\n');
    if it.next()? != "terminate" || it.next()? == own_id {
        return None;
    }
    it.next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminate_messages() {
        assert_eq!(parse_terminate("terminate\nh1\nu\n1", "h2"), Some("u\n1"));
        assert_eq!(parse_terminate("terminate\nh1\nu", "h1"), None);
        assert_eq!(parse_terminate("other\nh1\nu", "h2"), None);
        assert_eq!(parse_terminate("terminate\nh1", "h2"), None);
    }
}
