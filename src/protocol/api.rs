//! The answers of the hub's HTTP API channel queries (Pusher HTTP API;
//! docs/protocol.md shows each).

use std::collections::BTreeMap;

use serde::Serialize;

/// `GET /apps/{id}/channels`: the occupied channels.
#[derive(Serialize, Debug)]
pub struct ChannelsAnswer {
    pub channels: BTreeMap<String, ChannelSummary>,
}

/// One channel of `ChannelsAnswer`: `{}` unless `info=user_count` was asked.
#[derive(Serialize, Debug, Default)]
pub struct ChannelSummary {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_count: Option<usize>,
}

/// `GET /apps/{id}/channels/{name}`.
#[derive(Serialize, Debug)]
pub struct ChannelAnswer {
    pub occupied: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_count: Option<usize>,
}

/// `GET /apps/{id}/channels/{name}/users`.
#[derive(Serialize, Debug)]
pub struct UsersAnswer {
    pub users: Vec<User>,
}

#[derive(Serialize, Debug)]
pub struct User {
    pub id: String,
}

/// `POST /apps/{id}/batch_events`: one empty object per event.
#[derive(Serialize, Debug)]
pub struct BatchAnswer {
    pub batch: Vec<BTreeMap<String, String>>,
}

/// What an app's auth endpoint answers (`UploadProgress\auth()`):
/// `{"auth":"<key>:<hex hmac>"}`, plus `channel_data` on presence channels.
#[derive(Serialize, Debug)]
pub struct ChannelAuth<'a> {
    pub auth: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_data: Option<&'a str>,
}
