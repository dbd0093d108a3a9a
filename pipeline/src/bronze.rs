//! The silver stage's one pass over bronze: every new bronze row is read
//! once, its payload parsed once and handed to the version adapters once,
//! and the decoded message is routed to each silver table that selects it.
//!
//! A table declares which rows it wants as [`Select`]s (direction, message
//! type, actions); the scan pushes their union down to DataFusion as one
//! filter and routes each row in Rust by the same declarations, so the SQL
//! filter and the routing cannot disagree.

use std::cell::OnceCell;
use std::time::{Duration, Instant};

use deltalake::DeltaTable;
use deltalake::arrow::array::{Array, AsArray, RecordBatch, StringArray, StringViewArray};
use deltalake::datafusion::prelude::SessionContext;
use schemas::{CoreEvent, OcppVersion, events_from_call};

use crate::incremental::{Source, ints, scan_bronze, strings, timestamps};
use crate::{PipelineError, RunOptions};

/// The bronze columns the scan reads.
pub(crate) const COLUMNS: &str =
    "station_id, ocpp_version, direction, message_type, message_id, action, payload, received_at";

/// Charger to CSMS.
pub(crate) const FROM_CHARGER: &str = "cs_to_csms";
/// CSMS to charger.
pub(crate) const TO_CHARGER: &str = "csms_to_cs";
/// OCPP-J message types.
pub(crate) const CALL: i64 = 2;
pub(crate) const CALLRESULT: i64 = 3;

/// A set of bronze rows a silver table reads: one direction and message type,
/// any of `actions`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Select {
    pub direction: &'static str,
    pub message_type: i64,
    pub actions: &'static [&'static str],
}

impl Select {
    /// Charger CALLs of `actions`.
    pub(crate) const fn calls(actions: &'static [&'static str]) -> Select {
        Select {
            direction: FROM_CHARGER,
            message_type: CALL,
            actions,
        }
    }

    fn matches(&self, m: &Message<'_>) -> bool {
        m.direction == self.direction
            && m.message_type == self.message_type
            && self.actions.contains(&m.action)
    }

    fn sql(&self) -> String {
        let actions: Vec<String> = self.actions.iter().map(|a| format!("'{a}'")).collect();
        format!(
            "(direction = '{}' AND message_type = {} AND action IN ({}))",
            self.direction,
            self.message_type,
            actions.join(", ")
        )
    }
}

/// Whether any of `selects` takes `m`.
pub(crate) fn selected(selects: &[Select], m: &Message<'_>) -> bool {
    selects.iter().any(|s| s.matches(m))
}

/// The SQL filter reading the union of `selects`.
pub(crate) fn filter_sql(selects: &[Select]) -> String {
    if selects.is_empty() {
        return "FALSE".into();
    }
    let parts: Vec<String> = selects.iter().map(Select::sql).collect();
    format!("({})", parts.join(" OR "))
}

/// One bronze row, with its payload parsed and decoded on first use (so by
/// at most one of the tables it is routed to).
pub(crate) struct Message<'a> {
    pub station: &'a str,
    pub version: OcppVersion,
    pub direction: &'a str,
    pub message_type: i64,
    pub message_id: &'a str,
    pub action: &'a str,
    pub payload: &'a str,
    pub received_us: i64,
    body: OnceCell<Option<serde_json::Value>>,
    events: OnceCell<Vec<CoreEvent>>,
}

impl<'a> Message<'a> {
    /// The parsed payload; `None` if it is not JSON (ingest validated it, so
    /// such a row has nothing to contribute).
    pub(crate) fn body(&self) -> Option<&serde_json::Value> {
        self.body
            .get_or_init(|| serde_json::from_str(self.payload).ok())
            .as_ref()
    }

    /// The version adapter's core events for this message as a CALL without
    /// its answer (1.6 StartTransaction needs the answer: see
    /// [`crate::meter`]).
    pub(crate) fn events(&self) -> &[CoreEvent] {
        self.events.get_or_init(|| match self.body() {
            Some(body) => events_from_call(self.version, self.action, body, None),
            None => Vec::new(),
        })
    }

    /// A message for tests.
    #[cfg(test)]
    // One argument per bronze column.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        station: &'a str,
        version: OcppVersion,
        direction: &'a str,
        message_type: i64,
        message_id: &'a str,
        action: &'a str,
        payload: &'a str,
        received_us: i64,
    ) -> Message<'a> {
        Message {
            station,
            version,
            direction,
            message_type,
            message_id,
            action,
            payload,
            received_us,
            body: OnceCell::new(),
            events: OnceCell::new(),
        }
    }
}

/// A text column read without copying: DataFusion hands strings as views;
/// anything else is cast to plain UTF-8 once per batch.
pub(crate) enum Text {
    Plain(StringArray),
    View(StringViewArray),
}

impl Text {
    pub(crate) fn of(batch: &RecordBatch, name: &str) -> Result<Text, PipelineError> {
        let column = batch
            .column_by_name(name)
            .ok_or_else(|| PipelineError::Arrow(format!("scan lacks {name}")))?;
        Ok(match column.as_string_view_opt() {
            Some(v) => Text::View(v.clone()),
            None => Text::Plain(strings(batch, name)?),
        })
    }

    pub(crate) fn get(&self, i: usize) -> Option<&str> {
        match self {
            Text::Plain(a) => a.is_valid(i).then(|| a.value(i)),
            Text::View(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

/// Reads a bronze batch (the scan's columns) and calls `f` with each usable
/// row; rows lacking a payload, action, time or known version are skipped.
pub(crate) fn for_each_message(
    batch: &RecordBatch,
    f: &mut dyn FnMut(&Message<'_>),
) -> Result<(), PipelineError> {
    let station = Text::of(batch, "station_id")?;
    let version = Text::of(batch, "ocpp_version")?;
    let direction = Text::of(batch, "direction")?;
    let message_type = ints(batch, "message_type")?;
    let message_id = Text::of(batch, "message_id")?;
    let action = Text::of(batch, "action")?;
    let payload = Text::of(batch, "payload")?;
    let received = timestamps(batch, "received_at")?;
    for i in 0..batch.num_rows() {
        let (Some(action), Some(payload)) = (action.get(i), payload.get(i)) else {
            continue;
        };
        if received.is_null(i) || message_type.is_null(i) {
            continue;
        }
        let Some(version) = version.get(i).and_then(OcppVersion::parse) else {
            continue;
        };
        f(&Message {
            station: station.get(i).unwrap_or(""),
            version,
            direction: direction.get(i).unwrap_or(""),
            message_type: message_type.value(i),
            message_id: message_id.get(i).unwrap_or(""),
            action,
            payload,
            received_us: received.value(i),
            body: OnceCell::new(),
            events: OnceCell::new(),
        });
    }
    Ok(())
}

/// Something fed by the bronze scan: a silver table's decoder.
pub(crate) trait BronzeSink: Send {
    /// The rows it reads.
    fn selects(&self) -> &'static [Select];
    /// Takes one selected row.
    fn accept(&mut self, m: &Message<'_>);
}

/// What one scan read.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// Bronze rows read (the union of every sink's selection).
    pub rows: u64,
    /// Per sink, in order, the rows it selected.
    pub selected: Vec<u64>,
    /// Per sink, the time spent in it: parsing and decoding the payloads it
    /// was the first to read, and building its rows.
    pub decode: Vec<Duration>,
    /// The whole scan.
    pub seconds: f64,
}

/// Reads the bronze rows `source` selects, once, and routes each to every
/// sink selecting it.
pub(crate) async fn scan(
    ctx: &SessionContext,
    bronze: &DeltaTable,
    bronze_loc: &str,
    source: Source,
    opts: &RunOptions,
    sinks: &mut [&mut dyn BronzeSink],
) -> Result<Scanned, PipelineError> {
    let selects: Vec<Select> = sinks
        .iter()
        .flat_map(|s| s.selects().iter().copied())
        .collect();
    let filter = filter_sql(&selects);
    let mut selected = vec![0u64; sinks.len()];
    let mut decode = vec![Duration::ZERO; sinks.len()];
    let started = Instant::now();
    let mut decoding = Duration::ZERO;
    let rows = scan_bronze(
        ctx,
        bronze,
        bronze_loc,
        source,
        opts,
        COLUMNS,
        &filter,
        &mut |batch| {
            let t = Instant::now();
            let r = for_each_message(batch, &mut |m| {
                for ((sink, n), spent) in sinks
                    .iter_mut()
                    .zip(selected.iter_mut())
                    .zip(decode.iter_mut())
                {
                    if selected_by(&**sink, m) {
                        *n += 1;
                        let t = Instant::now();
                        sink.accept(m);
                        *spent += t.elapsed();
                    }
                }
            });
            decoding += t.elapsed();
            r
        },
    )
    .await?;
    let total = started.elapsed();
    tracing::debug!(
        rows,
        read_s = total.saturating_sub(decoding).as_secs_f64(),
        decode_s = decoding.as_secs_f64(),
        "bronze scan"
    );
    metrics::histogram!("csms_pipeline_bronze_decode_seconds").record(decoding.as_secs_f64());
    Ok(Scanned {
        rows,
        selected,
        decode,
        seconds: total.as_secs_f64(),
    })
}

fn selected_by(sink: &dyn BronzeSink, m: &Message<'_>) -> bool {
    selected(sink.selects(), m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_route_like_their_sql() {
        let s = [
            Select::calls(&["StatusNotification", "NotifyEvent"]),
            Select {
                direction: TO_CHARGER,
                message_type: CALLRESULT,
                actions: &["StartTransaction"],
            },
        ];
        assert_eq!(
            filter_sql(&s),
            "((direction = 'cs_to_csms' AND message_type = 2 \
             AND action IN ('StatusNotification', 'NotifyEvent')) \
             OR (direction = 'csms_to_cs' AND message_type = 3 \
             AND action IN ('StartTransaction')))"
        );
        let m = |dir, t, action| Message::new("A", OcppVersion::V16, dir, t, "1", action, "{}", 0);
        assert!(selected(&s, &m(FROM_CHARGER, CALL, "NotifyEvent")));
        assert!(selected(&s, &m(TO_CHARGER, CALLRESULT, "StartTransaction")));
        assert!(!selected(
            &s,
            &m(TO_CHARGER, CALLRESULT, "StatusNotification")
        ));
        assert!(!selected(&s, &m(FROM_CHARGER, CALL, "Heartbeat")));
        assert_eq!(filter_sql(&[]), "FALSE");
    }

    #[test]
    fn payload_is_parsed_once_and_bad_json_gives_nothing() {
        let m = Message::new(
            "A",
            OcppVersion::V16,
            FROM_CHARGER,
            CALL,
            "1",
            "StatusNotification",
            r#"{"connectorId":1,"errorCode":"NoError","status":"Available"}"#,
            0,
        );
        assert_eq!(m.events().len(), 1);
        assert!(std::ptr::eq(m.body().unwrap(), m.body().unwrap()));
        let bad = Message::new(
            "A",
            OcppVersion::V16,
            FROM_CHARGER,
            CALL,
            "1",
            "Heartbeat",
            "{",
            0,
        );
        assert!(bad.body().is_none() && bad.events().is_empty());
    }
}
