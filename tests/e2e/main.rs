//! End-to-end tests of the OCPP ingest tier: each test starts its own real
//! `csms serve` (see `tests::TestServer`) and talks to it over sockets, with
//! the raw client or the Python `ocpp` charge points.
//!
//! One test binary, so the heavy dependency graph links once.

mod bronze;
mod callerror;
mod commands;
mod durability;
mod limits;
mod liveness;
mod notebooks;
mod pgwire;
mod policies;
mod python_clients;
mod report;
mod routing;
mod sql;
mod tls;
mod upgrade;
mod workers;
mod workflows;
