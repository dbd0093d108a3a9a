//! The tables a query can name: the lake's Delta tables, found by listing
//! `{lake}/{bronze,silver,gold,ops}/` (so a table created after start is
//! queryable without a restart and the list never goes out of date with the
//! pipeline), and the live tables built from the status store per query.
//!
//! Loaded Delta tables are cached and refreshed incrementally (reading only
//! the new commits) once they are older than `max_staleness`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use deltalake::arrow::array::{
    ArrayRef, BooleanArray, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::datafusion::catalog::TableProvider;
use deltalake::datafusion::datasource::MemTable;
use deltalake::logstore::{ObjectStoreRef, store_for};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError, ObjectStore, Path};
use ingest::status::StatusStore;
use url::Url;

use crate::QueryError;

/// The schemas holding Delta tables, each a directory under the lake root.
pub(crate) const LAKE_SCHEMAS: [&str; 4] = ["bronze", "silver", "gold", "ops"];
/// The schema of the tables read from the status store.
pub(crate) const LIVE_SCHEMA: &str = "live";
/// `live.connector_status`.
pub const LIVE_CONNECTOR_STATUS: &str = "connector_status";
/// `live.stations`.
pub const LIVE_STATIONS: &str = "stations";

static REGISTER_S3: Once = Once::new();

/// A table directory name that can be a SQL identifier without quoting
/// (anything else under the lake is not one of our tables).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.starts_with('_')
}

/// The lake root as a URL ending in `/`, resolved as ingest's lake writer and
/// the pipeline do (`schemas::tables::lake_root`); registers the S3 object
/// store handlers first when the lake is on S3.
pub(crate) fn lake_root(lake_url: &str) -> Result<Url, String> {
    let url = schemas::tables::lake_root(lake_url).map_err(|e| e.to_string())?;
    if matches!(url.scheme(), "s3" | "s3a") {
        REGISTER_S3.call_once(|| deltalake::aws::register_handlers(None));
    }
    Ok(url)
}

struct Cached<T> {
    value: T,
    at: Instant,
}

/// The lake's Delta tables, loaded on demand and cached.
pub(crate) struct Lake {
    root: Result<Url, String>,
    storage_options: HashMap<String, String>,
    max_staleness: Duration,
    store: Mutex<Option<ObjectStoreRef>>,
    listings: Mutex<HashMap<String, Cached<Vec<String>>>>,
    tables: Mutex<HashMap<String, Cached<DeltaTable>>>,
}

fn lake_err(what: impl std::fmt::Display) -> QueryError {
    QueryError::Lake(what.to_string())
}

impl Lake {
    pub(crate) fn new(
        lake_url: &str,
        storage_options: HashMap<String, String>,
        max_staleness: Duration,
    ) -> Self {
        Self {
            root: lake_root(lake_url),
            storage_options,
            max_staleness,
            store: Mutex::new(None),
            listings: Mutex::default(),
            tables: Mutex::default(),
        }
    }

    fn root(&self) -> Result<&Url, QueryError> {
        self.root.as_ref().map_err(lake_err)
    }

    fn store(&self) -> Result<ObjectStoreRef, QueryError> {
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = store.as_ref() {
            return Ok(s.clone());
        }
        let s = store_for(self.root()?, self.storage_options.clone()).map_err(lake_err)?;
        *store = Some(s.clone());
        Ok(s)
    }

    /// The tables present in `schema` (directory names under the lake root),
    /// sorted. A missing schema directory is an empty schema.
    pub(crate) async fn table_names(&self, schema: &str) -> Result<Vec<String>, QueryError> {
        if let Some(c) = self
            .listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(schema)
            && c.at.elapsed() < self.max_staleness
        {
            return Ok(c.value.clone());
        }
        let store = self.store()?;
        let prefix = Path::from(schema);
        let mut names: Vec<String> = match store.list_with_delimiter(Some(&prefix)).await {
            Ok(listing) => listing
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(str::to_string))
                .filter(|n| valid_name(n))
                .collect(),
            Err(deltalake::ObjectStoreError::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(lake_err(format!("listing {schema}/: {e}"))),
        };
        names.sort();
        self.listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                schema.to_string(),
                Cached {
                    value: names.clone(),
                    at: Instant::now(),
                },
            );
        Ok(names)
    }

    /// `schema.name` at its latest version (at most `max_staleness` old), or
    /// `None` when no such Delta table exists.
    pub(crate) async fn table(
        &self,
        schema: &str,
        name: &str,
    ) -> Result<Option<DeltaTable>, QueryError> {
        if !valid_name(name) || !self.table_names(schema).await?.iter().any(|n| n == name) {
            return Ok(None);
        }
        let key = format!("{schema}/{name}");
        let cached = self
            .tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .map(|c| (c.value.clone(), c.at));
        let table = match cached {
            Some((table, at)) if at.elapsed() < self.max_staleness => return Ok(Some(table)),
            Some((mut table, _)) => match table.update_incremental(None).await {
                Ok(()) => table,
                Err(DeltaTableError::NotATable(_)) => {
                    self.forget(&key);
                    return Ok(None);
                }
                Err(e) => return Err(lake_err(format!("{schema}.{name}: {e}"))),
            },
            None => {
                let url = self.root()?.join(&key).map_err(lake_err)?;
                // The directory exists (it was listed), so this creates nothing.
                let url = deltalake::ensure_table_uri(url.as_str()).map_err(lake_err)?;
                let mut table = DeltaTableBuilder::from_url(url)
                    .and_then(|b| b.with_storage_options(self.storage_options.clone()).build())
                    .map_err(lake_err)?;
                match table.load().await {
                    Ok(()) => table,
                    // A directory without a Delta log (yet): not a table.
                    Err(DeltaTableError::NotATable(_)) => return Ok(None),
                    Err(e) => return Err(lake_err(format!("{schema}.{name}: {e}"))),
                }
            }
        };
        self.tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key,
                Cached {
                    value: table.clone(),
                    at: Instant::now(),
                },
            );
        Ok(Some(table))
    }

    fn forget(&self, key: &str) {
        self.tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// `live.connector_status`: the latest status per (station, evse, connector).
pub fn connector_status_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("station_id", DataType::Utf8, false),
        Field::new("evse_id", DataType::Int32, false),
        Field::new("connector_id", DataType::Int32, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("error_code", DataType::Utf8, true),
        Field::new("info", DataType::Utf8, true),
        Field::new("event_time", utc_micros(), false),
        Field::new("updated_at", utc_micros(), false),
    ]))
}

/// `live.stations`: each station's presence.
pub fn stations_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("station_id", DataType::Utf8, false),
        Field::new("connected", DataType::Boolean, false),
        Field::new("node", DataType::Utf8, true),
        Field::new("last_seen", utc_micros(), true),
        Field::new("ocpp_version", DataType::Utf8, true),
    ]))
}

fn micros(ts: Option<chrono::DateTime<chrono::Utc>>) -> Option<i64> {
    ts.map(|t| t.timestamp_micros())
}

fn mem_table(
    schema: SchemaRef,
    columns: Vec<ArrayRef>,
) -> Result<Arc<dyn TableProvider>, QueryError> {
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    Ok(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))
}

/// `live.connector_status` as of now (empty without a status store).
pub(crate) async fn connector_status_table(
    status: Option<&StatusStore>,
) -> Result<Arc<dyn TableProvider>, QueryError> {
    let rows = match status {
        Some(s) => s
            .connectors(None)
            .await
            .map_err(|e| QueryError::Status(e.to_string()))?,
        None => Vec::new(),
    };
    let utc = |a: TimestampMicrosecondArray| Arc::new(a.with_timezone("UTC")) as ArrayRef;
    mem_table(
        connector_status_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.station_id.as_str()),
            )),
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.evse_id))),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| r.connector_id),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.status.as_str()),
            )),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.error_code.as_deref()),
            )),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.info.as_deref()),
            )),
            utc(TimestampMicrosecondArray::from_iter_values(
                rows.iter().map(|r| r.event_time.timestamp_micros()),
            )),
            utc(TimestampMicrosecondArray::from_iter_values(
                rows.iter().map(|r| r.updated_at.timestamp_micros()),
            )),
        ],
    )
}

/// `live.stations` as of now (empty without a status store).
pub(crate) async fn stations_table(
    status: Option<&StatusStore>,
) -> Result<Arc<dyn TableProvider>, QueryError> {
    let rows = match status {
        Some(s) => s
            .stations()
            .await
            .map_err(|e| QueryError::Status(e.to_string()))?,
        None => Vec::new(),
    };
    mem_table(
        stations_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.station_id.as_str()),
            )),
            Arc::new(BooleanArray::from_iter(
                rows.iter().map(|r| Some(r.connected)),
            )),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.node.as_deref()),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter(rows.iter().map(|r| micros(r.last_seen)))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.ocpp_version.as_deref()),
            )),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lake_root_resolves_paths_and_urls_to_directories() {
        let r = lake_root("/data/lake").unwrap();
        assert_eq!(r.as_str(), "file:///data/lake/");
        assert_eq!(
            r.join("bronze/ocpp_messages").unwrap().as_str(),
            "file:///data/lake/bronze/ocpp_messages"
        );
        assert_eq!(
            lake_root("s3://bucket/prefix").unwrap().as_str(),
            "s3://bucket/prefix/"
        );
        assert!(
            lake_root("relative/lake")
                .unwrap()
                .path()
                .ends_with("/relative/lake/")
        );
    }

    #[test]
    fn only_plain_identifiers_are_table_names() {
        assert!(valid_name("ocpp_messages"));
        assert!(valid_name("daily_faults2"));
        assert!(!valid_name("_delta_log"));
        assert!(!valid_name("Mixed"));
        assert!(!valid_name("a-b"));
        assert!(!valid_name(""));
    }
}
