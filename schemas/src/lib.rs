//! Pure data and pure functions shared by every part of the CSMS: no I/O.
//!
//! # Layout
//! - [`version`]: the OCPP versions and their subprotocol and lake names.
//! - [`frame`]: OCPP-J framing (CALL, CALLRESULT, CALLERROR, 2.1 SEND and
//!   CALLRESULTERROR), decoding that never panics.
//! - [`error_code`]: version-neutral error kinds and each version's wire codes.
//! - [`catalog`]: every action of every version with its initiator and its
//!   request/response validators, compiled once from the embedded OCA schemas
//!   (the files under `schemas/ocpp/`).
//! - [`events`] and [`adapter`]: per-version adapters from OCPP messages to
//!   version-neutral core events, used by ingest to act and by the pipeline to
//!   build silver.
//! - [`tables`]: the Arrow schemas of the lake tables.
//! - [`sample`]: minimal valid instances of a schema, for tests and the load
//!   generator.

pub mod adapter;
pub mod catalog;
pub mod error_code;
pub mod events;
pub mod frame;
pub mod sample;
pub mod tables;
pub mod version;

pub use adapter::{events_from_call, parse_timestamp};
pub use catalog::{ActionSpec, Catalog, Initiator, Violation};
pub use error_code::ErrorKind;
pub use events::CoreEvent;
pub use frame::{Frame, FrameError, MessageType};
pub use version::OcppVersion;
