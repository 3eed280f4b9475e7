//! The channel queries of the HTTP API (`GET channels`, `GET channels/{name}`,
//! `GET channels/{name}/users`) and `POST users/{id}/terminate_connections`.
//! With Redis they answer for every host: the occupancy of the other hubs is
//! read from Redis and a termination is published to them (docs/scaling.md).

use crate::hub::channels::Occupancy;
use crate::hub::{lock, router, Hub};
use crate::protocol::api::{ChannelAnswer, ChannelSummary, ChannelsAnswer, User, UsersAnswer};
use crate::protocol::pusher;

use super::{error_body, query_param};

fn json<T: serde::Serialize>(v: &T) -> (u16, String) {
    (200, serde_json::to_string(v).unwrap_or_default())
}

/// The occupancy of every host (only this one without Redis) of the channels
/// whose name starts with `prefix`.
async fn occupancy(hub: &Hub, prefix: &str) -> Result<Occupancy, (u16, String)> {
    let mut all = lock(&hub.state).channels.occupancy(prefix);
    if let Some(bridge) = &hub.redis {
        match bridge.remote_occupancy(prefix).await {
            Ok(other) => all.merge(other),
            Err(e) => return Err((503, error_body(&e))),
        }
    }
    Ok(all)
}

/// The `info` attributes asked for.
fn info(query: &str) -> Vec<String> {
    query_param(query, "info")
        .map(|i| {
            i.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn bad_info(attr: &str) -> (u16, String) {
    (
        400,
        error_body(&format!(
            "info={attr} is only available for presence channels"
        )),
    )
}

pub(super) async fn channels(hub: &Hub, query: &str) -> (u16, String) {
    let prefix = query_param(query, "filter_by_prefix").unwrap_or_default();
    let info = info(query);
    let user_count = info.iter().any(|i| i == "user_count");
    if user_count && !prefix.starts_with("presence-") {
        return (
            400,
            error_body("info=user_count needs filter_by_prefix=presence-"),
        );
    }
    let occ = match occupancy(hub, &prefix).await {
        Ok(o) => o,
        Err(e) => return e,
    };
    let channels = occ
        .channels
        .into_iter()
        .map(|(name, c)| {
            let s = ChannelSummary {
                user_count: user_count.then_some(c.users.len()),
            };
            (name, s)
        })
        .collect();
    json(&ChannelsAnswer { channels })
}

pub(super) async fn channel(hub: &Hub, name: &str, query: &str) -> (u16, String) {
    if let Err(e) = pusher::validate_channel(name) {
        return (400, error_body(&e));
    }
    let info = info(query);
    let presence = name.starts_with("presence-");
    let user_count = info.iter().any(|i| i == "user_count");
    if user_count && !presence {
        return bad_info("user_count");
    }
    let occ = match occupancy(hub, name).await {
        Ok(o) => o,
        Err(e) => return e,
    };
    let c = occ.channels.get(name).cloned().unwrap_or_default();
    json(&ChannelAnswer {
        occupied: c.subscriptions > 0,
        subscription_count: info
            .iter()
            .any(|i| i == "subscription_count")
            .then_some(c.subscriptions),
        user_count: user_count.then_some(c.users.len()),
    })
}

pub(super) async fn users(hub: &Hub, name: &str) -> (u16, String) {
    if let Err(e) = pusher::validate_channel(name) {
        return (400, error_body(&e));
    }
    if !name.starts_with("presence-") {
        return (
            400,
            error_body("users are only available for presence channels"),
        );
    }
    let occ = match occupancy(hub, name).await {
        Ok(o) => o,
        Err(e) => return e,
    };
    let users = occ
        .channels
        .get(name)
        .map(|c| c.users.iter().map(|id| User { id: id.clone() }).collect())
        .unwrap_or_default();
    json(&UsersAnswer { users })
}

pub(super) async fn terminate(hub: &Hub, user_id: &str) -> (u16, String) {
    if user_id.is_empty() || user_id.len() > 128 {
        return (400, error_body("invalid user id"));
    }
    router::terminate_local(hub, user_id);
    if let Some(bridge) = &hub.redis {
        if let Err(e) = bridge.publish_terminate(user_id).await {
            return (503, error_body(&e));
        }
    }
    (200, "{}".to_string())
}
