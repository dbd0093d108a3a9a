//! The ingest tier: chargers connect here over OCPP-J WebSockets.
//!
//! # Layout
//! - [`admission`]: admission control under saturation (a bounded number of
//!   connections in admission; accept pacing and Pending boots driven by the
//!   runtime's scheduling lag).
//! - [`bench`]: the WAL benchmark behind `csms bench wal`.
//! - [`closer`]: the thread that closes finished connections' sockets, off
//!   the session runtime.
//! - [`config`]: the one configuration struct (defaults, TOML, environment).
//! - [`server`]: TCP/TLS accept loop and the WebSocket upgrade (subprotocol,
//!   station id, Basic auth, mTLS, abuse limits).
//! - [`session`]: one task per connection: read frame → validate → WAL →
//!   answer; CSMS-initiated CALLs with timeouts; ping/pong liveness.
//! - [`handlers`]: the CSMS's answer to every charger-initiated action.
//! - [`registry`]: stations (argon2id password hashes) and id tokens.
//! - [`shared_auth`]: password verifications shared by the nodes through
//!   Redis, so a reconnect to another node costs no argon2 run.
//! - [`tls`]: rustls server configuration and station identity from client
//!   certificates (security profile 3).
//! - [`limits`]: per-address and per-station rate limits and auth slow-down.
//! - [`wal`]: the node's group-committed write-ahead log of every frame.
//! - [`lake`]: moves WAL segments into `bronze.ocpp_messages` (Delta), exactly
//!   once; optimize, vacuum and retention.
//! - [`status`]: the live status store (embedded; Redis when configured).
//! - [`txid`]: unique OCPP 1.6 transaction ids (Redis, or a block-reserving file).
//! - [`metrics`]: Prometheus metric names and the recorder.
//! - [`http`]: the back-office HTTP API.
//! - [`openapi`]: the OpenAPI document of the HTTP API.
//! - [`runtime`]: starting a node: WAL, lake writer, registries, listeners.

pub mod admission;
pub mod bench;
pub mod closer;
pub mod config;
pub mod handlers;
pub mod http;
pub mod lake;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod registry;
pub mod router;
pub mod runtime;
pub mod server;
pub mod session;
pub mod shared_auth;
pub mod status;
/// Test support for this and other crates: a throwaway redis-server.
#[doc(hidden)]
pub mod test_redis;
pub mod tls;
pub mod txid;
pub mod wal;
pub mod ws;
