//! The connection to Redis (one server, or a cluster with sharded pub/sub):
//! commands, scripts and RESP3 pushes share it.

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, RedisResult, Script,
};
use tokio::sync::mpsc;

use super::Bridge;

#[derive(Clone)]
pub(super) enum RedisConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            RedisConn::Single(c) => cmd.query_async(c).await,
            RedisConn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    pub async fn invoke<T: redis::FromRedisValue>(
        &mut self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self {
            RedisConn::Single(c) => inv.invoke_async(c).await,
            RedisConn::Cluster(c) => inv.invoke_async(c).await,
        }
    }

    pub async fn load(&mut self, s: &Script) -> RedisResult<()> {
        match self {
            RedisConn::Single(c) => s.load_async(c).await.map(|_| ()),
            RedisConn::Cluster(c) => s.load_async(c).await.map(|_| ()),
        }
    }

    pub async fn subscribe(&mut self, chans: &[String]) -> RedisResult<()> {
        match self {
            RedisConn::Single(c) => c.subscribe(chans).await,
            RedisConn::Cluster(c) => {
                // Sharded channels of different slots cannot share one command.
                for ch in chans {
                    c.ssubscribe(ch).await?;
                }
                Ok(())
            }
        }
    }

    pub async fn unsubscribe(&mut self, chans: &[String]) -> RedisResult<()> {
        match self {
            RedisConn::Single(c) => c.unsubscribe(chans).await,
            RedisConn::Cluster(c) => {
                for ch in chans {
                    c.sunsubscribe(ch).await?;
                }
                Ok(())
            }
        }
    }
}

pub(super) async fn connect(
    bridge: &Bridge,
) -> RedisResult<(RedisConn, mpsc::UnboundedReceiver<PushInfo>)> {
    let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
    let conn = if bridge.settings.cluster {
        let client = redis::cluster::ClusterClientBuilder::new(bridge.settings.urls.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(tx)
            .connection_timeout(bridge.timeout)
            .response_timeout(bridge.timeout)
            .retries(1)
            .build()?;
        RedisConn::Cluster(client.get_async_connection().await?)
    } else {
        let info = bridge.settings.urls[0].as_str().into_connection_info()?;
        let redis_settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let info = info.set_redis_settings(redis_settings);
        let client = redis::Client::open(info)?;
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(bridge.timeout))
            .set_response_timeout(Some(bridge.timeout))
            .set_push_sender(tx);
        RedisConn::Single(
            client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?,
        )
    };
    let mut conn = conn;
    conn.load(&bridge.scripts.event).await?;
    conn.load(&bridge.scripts.upload).await?;
    conn.load(&bridge.scripts.reset).await?;
    Ok((conn, rx))
}
