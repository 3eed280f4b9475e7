//! Wire formats: the ingest socket between PHP and the hub, the Pusher
//! protocol, and the JSON the hub sends (frames, event data, API answers).
pub mod api;
pub mod frames;
pub mod ingest;
pub mod pusher;
