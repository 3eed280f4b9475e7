//! Wire formats: the ingest socket between PHP and the hub, and the Pusher protocol.
pub mod ingest;
pub mod pusher;
