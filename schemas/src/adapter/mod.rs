//! Per-version adapters from charger-initiated OCPP messages to
//! version-neutral [`CoreEvent`]s.
//!
//! Adapters assume nothing about the payload beyond JSON: ingest validates
//! against the schema first, but the pipeline replays bronze rows that may
//! predate a stricter schema, so a missing or mistyped field drops that field
//! (or, if the event cannot exist without it, the event) and never panics.
//!
//! Order of the returned events: the message's main event first (boot,
//! status, transaction, ...), then the meter samples it carried.

mod v16;
mod v2x;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::Value;

use crate::{
    OcppVersion,
    events::{CoreEvent, DEFAULT_MEASURAND, MeterSample},
};

/// Events carried by a charger-initiated CALL and (where the answer adds
/// facts, e.g. 1.6 StartTransaction's CSMS-assigned transactionId) its
/// CALLRESULT payload. Unknown or CSMS-initiated actions give no events.
pub fn events_from_call(
    version: OcppVersion,
    action: &str,
    request: &Value,
    response: Option<&Value>,
) -> Vec<CoreEvent> {
    match version {
        OcppVersion::V16 => v16::events(action, request, response),
        OcppVersion::V201 | OcppVersion::V21 => v2x::events(action, request),
    }
}

/// Parses an OCPP timestamp: RFC 3339, and also the common deviations of real
/// chargers: no offset (read as UTC), an offset without a colon, a space
/// instead of `T`, any number of fractional digits.
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc());
        }
    }
    None
}

// Field accessors that turn anything unexpected into `None`.

fn string(v: &Value, key: &str) -> Option<String> {
    v.get(key)?.as_str().map(str::to_owned)
}

fn int(v: &Value, key: &str) -> Option<i64> {
    let f = v.get(key)?;
    f.as_i64().or_else(|| {
        f.as_f64()
            .filter(|x| x.fract() == 0.0 && x.abs() < 9.0e15)
            .map(|x| x as i64)
    })
}

fn int32(v: &Value, key: &str) -> Option<i32> {
    int(v, key).and_then(|i| i32::try_from(i).ok())
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key)?.as_f64().filter(|x| x.is_finite())
}

fn boolean(v: &Value, key: &str) -> Option<bool> {
    v.get(key)?.as_bool()
}

fn time(v: &Value, key: &str) -> Option<DateTime<Utc>> {
    v.get(key)?.as_str().and_then(parse_timestamp)
}

/// An identifier sent as a number (1.6 transactionId) or a string (2.x).
fn id_string(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn array<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The transaction's energy register in Wh from the samples of one message:
/// an `Energy.Active.Import.Register` sample without a phase (per-phase
/// registers are not the total), preferring the one whose context is
/// `prefer_context` (`Transaction.Begin`/`Transaction.End`), else the last.
/// Returns the reading and its sample time.
fn register_wh(
    samples: &[MeterSample],
    prefer_context: Option<&str>,
) -> Option<(f64, Option<DateTime<Utc>>)> {
    let candidates: Vec<&MeterSample> = samples
        .iter()
        .filter(|s| {
            s.measurand == DEFAULT_MEASURAND && s.phase.is_none() && s.energy_wh().is_some()
        })
        .collect();
    let chosen = prefer_context
        .and_then(|c| {
            candidates
                .iter()
                .rev()
                .find(|s| s.context.as_deref() == Some(c))
        })
        .or_else(|| candidates.last())?;
    Some((chosen.energy_wh()?, chosen.sampled_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn timestamps_tolerate_common_deviations() {
        let t = Utc.with_ymd_and_hms(2025, 3, 1, 10, 0, 0).unwrap();
        assert_eq!(parse_timestamp("2025-03-01T10:00:00Z"), Some(t));
        assert_eq!(parse_timestamp("2025-03-01T11:00:00+01:00"), Some(t));
        assert_eq!(parse_timestamp("2025-03-01T11:00:00+0100"), Some(t));
        assert_eq!(parse_timestamp("2025-03-01T10:00:00"), Some(t));
        assert_eq!(parse_timestamp("2025-03-01 10:00:00"), Some(t));
        let ms = parse_timestamp("2025-03-01T10:00:00.123456Z").unwrap();
        assert_eq!(ms.timestamp_subsec_micros(), 123_456);
        assert_eq!(
            parse_timestamp("2025-03-01T10:00:00.5")
                .unwrap()
                .timestamp_subsec_millis(),
            500
        );
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp(""), None);
        assert_eq!(parse_timestamp("2025-13-01T10:00:00Z"), None);
    }

    #[test]
    fn unknown_actions_and_garbage_give_nothing() {
        for v in OcppVersion::ALL {
            assert!(events_from_call(v, "Bogus", &json!({}), None).is_empty());
            assert!(events_from_call(v, "Reset", &json!({"type": "Hard"}), None).is_empty());
            for action in [
                "BootNotification",
                "StatusNotification",
                "StartTransaction",
                "StopTransaction",
                "MeterValues",
                "TransactionEvent",
                "NotifyEvent",
                "NotifyReport",
                "SecurityEventNotification",
                "FirmwareStatusNotification",
                "Authorize",
            ] {
                for junk in [
                    json!(null),
                    json!([1, 2]),
                    json!("x"),
                    json!({"meterValue": 5, "eventData": {"a": 1}}),
                ] {
                    // Must not panic; whatever comes out must not invent ids.
                    for e in events_from_call(v, action, &junk, Some(&junk)) {
                        assert!(
                            !matches!(e, CoreEvent::TransactionStarted(_) | CoreEvent::Boot(_)),
                            "{v} {action} {e:?}"
                        );
                    }
                }
            }
        }
    }
}
