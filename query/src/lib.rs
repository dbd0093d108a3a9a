//! SQL for analysts over the lake (`bronze.*`, `silver.*`, `gold.*`, plain
//! Delta tables) and the live status store (`live.connector_status`,
//! `live.stations`), read-only, with a timeout and a memory limit.
//!
//! # Layout
//! - [`QueryEngine`] (`engine`): one read-only statement at a time, planned in
//!   a fresh DataFusion session per query over a shared, bounded memory pool,
//!   executed on the engine's own Tokio runtime so analytics never starve the
//!   runtime that answers chargers.
//! - `catalog`: finds the lake's tables (directory listing, so a table that
//!   appears later is queryable without a restart), caches and refreshes
//!   them, and builds the live tables from the status store.
//! - `readonly`: the statement allow-list and the plan check behind it.
//! - [`render`]: terminal table, CSV, JSON rows, Arrow IPC stream, Parquet.
//! - [`api_router`] (`http`): `POST /sql`, mounted under `/api` by ingest.
//! - [`serve_pg`] (`pg`): the PostgreSQL wire protocol on `CSMS_PG_ADDR`.

mod catalog;
mod engine;
mod http;
mod pg;
mod readonly;
pub mod render;

use std::time::Duration;

use deltalake::datafusion::error::DataFusionError;
use serde::{Deserialize, Serialize};

pub use catalog::{LIVE_CONNECTOR_STATUS, LIVE_STATIONS, connector_status_schema, stations_schema};
pub use engine::{QueryEngine, QueryResult};
pub use http::api_router;
pub use pg::{ANALYST_USER, PgAuth, serve as serve_pg};
pub use render::{render_csv, render_json, render_table};

/// Limits of the query engine (a `[query]`-style TOML table or defaults).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct QueryConfig {
    /// A statement (planning and execution) taking longer fails.
    pub timeout_secs: u64,
    /// Memory shared by all running queries of the engine; operators that
    /// can spill to disk do so, others fail with "resources exhausted".
    pub memory_limit_bytes: usize,
    /// Results larger than this are refused (use LIMIT or an aggregate).
    pub max_rows: usize,
    /// A lake table's snapshot is reused for this long before it is
    /// refreshed to the latest Delta version (0: refresh on every query).
    pub max_staleness_ms: u64,
    /// Worker threads of the query runtime and DataFusion's partitions
    /// (0: the number of CPUs).
    pub threads: usize,
    /// PostgreSQL wire logins besides `analyst` (whose password is the
    /// admin token): user name → password.
    pub pg_users: std::collections::HashMap<String, String>,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            timeout_secs: 30,
            memory_limit_bytes: 1 << 30,
            max_rows: 1_000_000,
            max_staleness_ms: 1000,
            threads: 0,
            pg_users: Default::default(),
        }
    }
}

/// Where in the SQL text an error is (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Parse, planning or execution error reported by DataFusion (the
    /// analyst's SQL is wrong or does not fit the data).
    #[error("{message}")]
    Sql {
        message: String,
        position: Option<Position>,
    },
    /// The statement would write or change state; only queries are allowed.
    #[error("read-only: {0} is not allowed; only SELECT, EXPLAIN, SHOW and DESCRIBE are")]
    ReadOnly(String),
    #[error("query timed out after {0:?}")]
    Timeout(Duration),
    #[error("query exceeded the memory limit: {0}")]
    Memory(String),
    #[error("result has more than {0} rows; add a LIMIT or aggregate")]
    TooManyRows(usize),
    /// Reading the lake (object store, Delta log) failed.
    #[error("lake: {0}")]
    Lake(String),
    /// Reading the live status store failed (Redis unreachable).
    #[error("status store: {0}")]
    Status(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl QueryError {
    /// The position of the error in the SQL text, where DataFusion gives one.
    pub fn position(&self) -> Option<Position> {
        match self {
            QueryError::Sql { position, .. } => *position,
            _ => None,
        }
    }
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        let position = e
            .diagnostic()
            .and_then(|d| d.span)
            .filter(|s| s.start.line > 0)
            .map(|s| Position {
                line: s.start.line,
                column: s.start.column,
            });
        let root = e.find_root();
        match root {
            DataFusionError::ResourcesExhausted(m) => QueryError::Memory(m.clone()),
            DataFusionError::ObjectStore(_) | DataFusionError::IoError(_) => {
                QueryError::Lake(e.to_string())
            }
            DataFusionError::Internal(_) => QueryError::Internal(e.to_string()),
            _ => {
                let message = e.to_string();
                let position = position.or_else(|| position_in_message(&message));
                QueryError::Sql { message, position }
            }
        }
    }
}

/// sqlparser's errors end with "at Line: L, Column: C".
fn position_in_message(message: &str) -> Option<Position> {
    let at = message.rfind("Line: ")?;
    let rest = &message[at + "Line: ".len()..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some(Position {
        line: line.trim().parse().ok()?,
        column: column.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_is_read_from_parser_messages() {
        assert_eq!(
            position_in_message(
                "SQL error: ParserError(\"Expected: end of statement, found: x at Line: 2, Column: 17\")"
            ),
            Some(Position {
                line: 2,
                column: 17
            })
        );
        assert_eq!(position_in_message("table 'x' not found"), None);
    }

    #[test]
    fn config_defaults_fill_missing_fields() {
        let c: QueryConfig = serde_json::from_str(r#"{"timeout_secs": 5}"#).unwrap();
        assert_eq!(c.timeout_secs, 5);
        assert_eq!(c.memory_limit_bytes, 1 << 30);
        assert_eq!(c.max_rows, 1_000_000);
    }
}
