//! The daily digest: stations that went Faulted or offline over a day.
//!
//! For one UTC day it lists, per station, the Faulted status reports of
//! `silver.status_events` (count, first and last time, error codes; counted
//! as `gold.daily_faults` counts them: every `is_fault` row), the offline
//! alerts raised and cleared that day from `ops.alert_events`, and, where
//! the live status is at hand, what is wrong right now. An empty day still
//! gets a short digest saying so, so silence is never ambiguous.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use chrono::{DateTime, Days, NaiveDate, SecondsFormat, Utc};
use deltalake::arrow::array::{Array, StringArray, TimestampMicrosecondArray};
use deltalake::arrow::datatypes::{DataType, TimeUnit};
use schemas::tables::{OPS_ALERT_EVENTS, SILVER_STATUS_EVENTS};

use crate::alerts::{Alert, AlertsConfig, current_alerts};
use crate::report::{column, html_escape, load, query, table_location};
use crate::{JobContext, JobError, ReportError};

/// `[job] kind = "digest"` parameters.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestJob {
    /// Addresses mailed the digest (none: written to the report folder).
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Which day, relative to the scheduled time: 1 = the day before.
    #[serde(default = "one")]
    pub days_back: u32,
    /// For the "active now" section: a station without a socket counts as
    /// offline after this long without a message (as `[alerts]`).
    #[serde(default = "five_minutes")]
    pub offline_after_secs: u64,
}

fn one() -> u32 {
    1
}

fn five_minutes() -> u64 {
    300
}

/// One station's Faulted reports over the day.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultedStation {
    pub station_id: String,
    pub faults: u64,
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    /// Distinct error codes, sorted (`NoError` left out).
    pub error_codes: Vec<String>,
}

/// An offline alert raised or cleared that day (`ops.alert_events`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfflineEvent {
    pub station_id: String,
    /// `raised` (went offline) or `cleared` (came back).
    pub event: String,
    pub at: DateTime<Utc>,
    pub detail: Option<String>,
}

/// What the digest says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub date: NaiveDate,
    /// By station id.
    pub faulted: Vec<FaultedStation>,
    /// In time order.
    pub offline: Vec<OfflineEvent>,
    /// Alerts active at the time of the run; `None` without a live status.
    pub active: Option<Vec<Alert>>,
}

impl Digest {
    /// Stations that went offline that day (an offline alert was raised).
    pub fn went_offline(&self) -> usize {
        self.offline
            .iter()
            .filter(|e| e.event == "raised")
            .map(|e| e.station_id.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    }

    pub fn is_quiet(&self) -> bool {
        self.faulted.is_empty()
            && self.offline.is_empty()
            && self.active.as_ref().is_none_or(Vec::is_empty)
    }
}

/// The digest as mail parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedDigest {
    pub subject: String,
    pub text: String,
    pub html: String,
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn timestamps() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn micros(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t).unwrap_or_default()
}

/// The Faulted reports of `day`, per station. A missing table (the
/// pipeline has not run) is an empty day.
pub async fn load_faults(
    ctx: &JobContext,
    day: NaiveDate,
) -> Result<Vec<FaultedStation>, JobError> {
    let location = table_location(&ctx.lake_url, SILVER_STATUS_EVENTS)?;
    let Some(table) = load(&location, SILVER_STATUS_EVENTS, &ctx.storage_options).await? else {
        return Ok(Vec::new());
    };
    let batches = query(
        &table,
        SILVER_STATUS_EVENTS,
        &format!(
            "SELECT station_id, event_time, error_code FROM t \
             WHERE is_fault AND date = CAST('{day}' AS DATE)"
        ),
    )
    .await?;
    let mut by_station: BTreeMap<String, FaultedStation> = BTreeMap::new();
    let mut codes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for b in &batches {
        let ids: StringArray = column(b, "station_id", &DataType::Utf8, SILVER_STATUS_EVENTS)?;
        let times: TimestampMicrosecondArray =
            column(b, "event_time", &timestamps(), SILVER_STATUS_EVENTS)?;
        let errs: StringArray = column(b, "error_code", &DataType::Utf8, SILVER_STATUS_EVENTS)?;
        for i in 0..b.num_rows() {
            let station = ids.value(i).to_string();
            let at = micros(times.value(i));
            let s = by_station
                .entry(station.clone())
                .or_insert_with(|| FaultedStation {
                    station_id: station.clone(),
                    faults: 0,
                    first: at,
                    last: at,
                    error_codes: Vec::new(),
                });
            s.faults += 1;
            s.first = s.first.min(at);
            s.last = s.last.max(at);
            if !errs.is_null(i) && !errs.value(i).is_empty() && errs.value(i) != "NoError" {
                codes
                    .entry(station)
                    .or_default()
                    .insert(errs.value(i).to_string());
            }
        }
    }
    Ok(by_station
        .into_values()
        .map(|mut s| {
            s.error_codes = codes
                .remove(&s.station_id)
                .unwrap_or_default()
                .into_iter()
                .collect();
            s
        })
        .collect())
}

/// The offline alerts raised or cleared during `day`, in time order.
pub async fn load_offline_events(
    ctx: &JobContext,
    day: NaiveDate,
) -> Result<Vec<OfflineEvent>, JobError> {
    let location = table_location(&ctx.lake_url, OPS_ALERT_EVENTS)?;
    let Some(table) = load(&location, OPS_ALERT_EVENTS, &ctx.storage_options).await? else {
        return Ok(Vec::new());
    };
    let next = day + Days::new(1);
    let batches = query(
        &table,
        OPS_ALERT_EVENTS,
        &format!(
            "SELECT station_id, event, at, detail FROM t \
             WHERE kind = 'offline' \
             AND at >= CAST('{day}T00:00:00Z' AS TIMESTAMP) \
             AND at < CAST('{next}T00:00:00Z' AS TIMESTAMP) \
             ORDER BY at, station_id, event"
        ),
    )
    .await?;
    let mut out = Vec::new();
    for b in &batches {
        let ids: StringArray = column(b, "station_id", &DataType::Utf8, OPS_ALERT_EVENTS)?;
        let events: StringArray = column(b, "event", &DataType::Utf8, OPS_ALERT_EVENTS)?;
        let at: TimestampMicrosecondArray = column(b, "at", &timestamps(), OPS_ALERT_EVENTS)?;
        let detail: StringArray = column(b, "detail", &DataType::Utf8, OPS_ALERT_EVENTS)?;
        for i in 0..b.num_rows() {
            out.push(OfflineEvent {
                station_id: ids.value(i).to_string(),
                event: events.value(i).to_string(),
                at: micros(at.value(i)),
                detail: (!detail.is_null(i)).then(|| detail.value(i).to_string()),
            });
        }
    }
    Ok(out)
}

/// Gathers the digest of `day`; `active` from the live status when the
/// context has one (its read failing is logged, not fatal: the day's
/// history is still worth sending).
pub async fn load_digest(
    ctx: &JobContext,
    job: &DigestJob,
    day: NaiveDate,
) -> Result<Digest, JobError> {
    let faulted = load_faults(ctx, day).await?;
    let offline = load_offline_events(ctx, day).await?;
    let active = match &ctx.status {
        None => None,
        Some(status) => {
            let config = AlertsConfig {
                offline_after_secs: job.offline_after_secs,
                ..AlertsConfig::default()
            };
            match current_alerts(&config, status, ctx.clock.now()).await {
                Ok(a) => Some(a.into_values().collect()),
                Err(e) => {
                    tracing::warn!(error = %e, "digest: live status unreadable; leaving out the active alerts");
                    None
                }
            }
        }
    };
    Ok(Digest {
        date: day,
        faulted,
        offline,
        active,
    })
}

/// Renders the digest: a subject with the counts, text, and HTML tables
/// (faulted stations: 5 columns; offline events: 4; active alerts: 3).
pub fn render_digest(d: &Digest) -> RenderedDigest {
    let subject = format!(
        "CSMS daily digest {}: {} stations faulted, {} went offline",
        d.date,
        d.faulted.len(),
        d.went_offline()
    );
    let mut text = format!("{subject}\n\n");
    let mut html = format!(
        "<html><body>\n<h1>{}</h1>\n",
        html_escape(&format!("CSMS daily digest {}", d.date))
    );
    let table = |html: &mut String, headers: &[&str]| {
        html.push_str("<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\">\n<thead><tr>");
        for h in headers {
            let _ = write!(html, "<th>{h}</th>");
        }
        html.push_str("</tr></thead>\n<tbody>\n");
    };
    let row = |html: &mut String, cells: &[String]| {
        html.push_str("<tr>");
        for c in cells {
            let _ = write!(html, "<td>{}</td>", html_escape(c));
        }
        html.push_str("</tr>\n");
    };
    const END: &str = "</tbody>\n</table>\n";

    if d.faulted.is_empty() && d.offline.is_empty() {
        let line = format!(
            "Nothing happened on {}: no station faulted or went offline.",
            d.date
        );
        let _ = writeln!(text, "{line}");
        let _ = writeln!(html, "<p>{}</p>", html_escape(&line));
    }
    if !d.faulted.is_empty() {
        let _ = writeln!(text, "Faulted ({} stations):", d.faulted.len());
        html.push_str("<h2>Faulted</h2>\n");
        table(
            &mut html,
            &["Station", "Faults", "First", "Last", "Error codes"],
        );
        for s in &d.faulted {
            let codes = s.error_codes.join(", ");
            let _ = writeln!(
                text,
                "  {}  {} fault(s), first {}, last {}{}",
                s.station_id,
                s.faults,
                time(s.first),
                time(s.last),
                if codes.is_empty() {
                    String::new()
                } else {
                    format!(", {codes}")
                }
            );
            row(
                &mut html,
                &[
                    s.station_id.clone(),
                    s.faults.to_string(),
                    time(s.first),
                    time(s.last),
                    codes,
                ],
            );
        }
        html.push_str(END);
        text.push('\n');
    }
    if !d.offline.is_empty() {
        let _ = writeln!(text, "Offline:");
        html.push_str("<h2>Offline</h2>\n");
        table(&mut html, &["Station", "Event", "At", "Detail"]);
        for e in &d.offline {
            let what = if e.event == "raised" {
                "went offline"
            } else {
                "back online"
            };
            let detail = e.detail.clone().unwrap_or_default();
            let _ = writeln!(
                text,
                "  {}  {what} at {}{}",
                e.station_id,
                time(e.at),
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({detail})")
                }
            );
            row(
                &mut html,
                &[e.station_id.clone(), what.into(), time(e.at), detail],
            );
        }
        html.push_str(END);
        text.push('\n');
    }
    match &d.active {
        Some(active) if !active.is_empty() => {
            let _ = writeln!(text, "Active now ({}):", active.len());
            html.push_str("<h2>Active now</h2>\n");
            table(&mut html, &["Alert", "Detail", "Since"]);
            for a in active {
                let detail = a.detail.clone().unwrap_or_default();
                let _ = writeln!(
                    text,
                    "  {}  {}  since {}",
                    a.alert_id,
                    detail,
                    time(a.since)
                );
                row(&mut html, &[a.alert_id.clone(), detail, time(a.since)]);
            }
            html.push_str(END);
        }
        Some(_) => {
            let _ = writeln!(text, "No alert is active now.");
            html.push_str("<p>No alert is active now.</p>\n");
        }
        None => {}
    }
    html.push_str("</body></html>\n");
    RenderedDigest {
        subject,
        text,
        html,
    }
}

fn write_files(
    r: &RenderedDigest,
    ctx: &JobContext,
    day: NaiveDate,
) -> Result<Vec<PathBuf>, JobError> {
    let dir = &ctx.report_dir;
    let io = |path: &PathBuf| {
        let path = path.clone();
        move |source| {
            JobError::Report(ReportError::Io {
                path: path.clone(),
                source,
            })
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    for (ext, body) in [("html", &r.html), ("txt", &r.text)] {
        let path = dir.join(format!("digest-{day}.{ext}"));
        std::fs::write(&path, body).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}

/// Builds and delivers the digest for `scheduled_for`'s date minus
/// `days_back`: mailed to `job.recipients` when SMTP is configured, else
/// written to `ctx.report_dir` as `digest-YYYY-MM-DD.html` / `.txt`.
/// Returns a one-line summary.
pub async fn run_digest(
    ctx: &JobContext,
    job: &DigestJob,
    scheduled_for: DateTime<Utc>,
) -> Result<String, JobError> {
    let day = scheduled_for.date_naive() - Days::new(u64::from(job.days_back));
    let digest = load_digest(ctx, job, day).await?;
    let rendered = render_digest(&digest);
    let head = format!(
        "digest {day}: {} stations faulted, {} went offline{}",
        digest.faulted.len(),
        digest.went_offline(),
        match &digest.active {
            Some(a) => format!(", {} alerts active", a.len()),
            None => String::new(),
        }
    );
    if !job.recipients.is_empty() && ctx.smtp.url.is_some() {
        crate::email::send_simple(
            &ctx.smtp,
            &job.recipients,
            &rendered.subject,
            &rendered.text,
            &rendered.html,
        )
        .await?;
        Ok(format!(
            "{head}; mailed to {} recipient(s)",
            job.recipients.len()
        ))
    } else {
        if !job.recipients.is_empty() {
            tracing::warn!(
                "digest has recipients but SMTP is not configured: writing it to the report folder"
            );
        }
        let written = write_files(&rendered, ctx, day)?;
        Ok(format!(
            "{head}; written to {}",
            written
                .first()
                .and_then(|p| p.parent())
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use deltalake::DeltaTableBuilder;
    use deltalake::arrow::array::{ArrayRef, BooleanArray, Date32Array, Int32Array, RecordBatch};
    use deltalake::kernel::StructType;
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
    use ingest::status::{ConnectorStatus, StatusStore};
    use serde_json::json;

    use super::*;
    use crate::SmtpConfig;
    use crate::alerts::{AlertEvent, AlertKind, EventKind, append_events};
    use crate::clock::ManualClock;
    use crate::smtp_tests::Sink;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn ctx(lake: &Path, status: Option<StatusStore>, smtp: SmtpConfig) -> JobContext {
        JobContext {
            node_id: "n1".into(),
            lake_url: lake.join("lake").to_str().unwrap().into(),
            storage_options: Default::default(),
            pipeline: pipeline::PipelineConfig::default(),
            smtp,
            status,
            commands: None,
            report_dir: lake.join("reports"),
            clock: Arc::new(ManualClock::new(t("2027-03-02T06:00:00Z"))),
        }
    }

    /// (station, status, error_code, event_time) rows into
    /// silver.status_events, partitioned by date as the pipeline writes it.
    async fn write_status_events(ctx: &JobContext, rows: &[(&str, &str, Option<&str>, &str)]) {
        let schema = schemas::tables::status_events_schema();
        let times: Vec<DateTime<Utc>> = rows.iter().map(|r| t(r.3)).collect();
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        let strs = |f: &dyn Fn(usize) -> String| -> ArrayRef {
            Arc::new(StringArray::from(
                (0..rows.len()).map(f).collect::<Vec<_>>(),
            ))
        };
        let ts = || -> ArrayRef {
            Arc::new(
                TimestampMicrosecondArray::from(
                    times
                        .iter()
                        .map(|t| t.timestamp_micros())
                        .collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            )
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Date32Array::from(
                times
                    .iter()
                    .map(|t| (t.date_naive() - epoch).num_days() as i32)
                    .collect::<Vec<_>>(),
            )),
            strs(&|i| rows[i].0.into()),
            Arc::new(Int32Array::from(vec![Some(1); rows.len()])),
            Arc::new(Int32Array::from(vec![1; rows.len()])),
            strs(&|i| rows[i].1.into()),
            Arc::new(BooleanArray::from(
                rows.iter().map(|r| r.1 == "Faulted").collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(vec![None::<&str>; rows.len()])),
            Arc::new(StringArray::from(vec![None::<&str>; rows.len()])),
            ts(),
            ts(),
            strs(&|_| "1.6".into()),
            strs(&|i| format!("m{i}")),
            strs(&|_| "StatusNotification".into()),
            Arc::new(Int32Array::from(vec![0; rows.len()])),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
        let loc = table_location(&ctx.lake_url, SILVER_STATUS_EVENTS).unwrap();
        let url = deltalake::ensure_table_uri(&loc).unwrap();
        let fields: StructType = schema.as_ref().try_into_kernel().unwrap();
        let table = DeltaTableBuilder::from_url(url)
            .unwrap()
            .build()
            .unwrap()
            .create()
            .with_columns(fields.fields().cloned())
            .with_partition_columns(["date"])
            .await
            .unwrap();
        table.write(vec![batch]).await.unwrap();
    }

    fn offline(station: &str, event: EventKind, at: &str) -> AlertEvent {
        AlertEvent {
            event,
            alert: Alert {
                alert_id: format!("offline:{station}"),
                kind: AlertKind::Offline,
                station_id: station.into(),
                evse_id: None,
                connector_id: None,
                detail: Some("last seen 2027-03-01T09:55:00Z".into()),
                since: t("2027-03-01T09:55:00Z"),
            },
            at: t(at),
        }
    }

    async fn sample_lake(ctx: &JobContext) {
        write_status_events(
            ctx,
            &[
                (
                    "CP-B",
                    "Faulted",
                    Some("GroundFailure"),
                    "2027-03-01T08:00:00Z",
                ),
                ("CP-B", "Available", Some("NoError"), "2027-03-01T08:05:00Z"),
                (
                    "CP-B",
                    "Faulted",
                    Some("OverCurrentFailure"),
                    "2027-03-01T17:30:00Z",
                ),
                (
                    "CP-B",
                    "Faulted",
                    Some("GroundFailure"),
                    "2027-03-01T12:00:00Z",
                ),
                ("CP-<A>", "Faulted", None, "2027-03-01T23:59:59Z"),
                // Other days: not in the digest of 2027-03-01.
                (
                    "CP-C",
                    "Faulted",
                    Some("GroundFailure"),
                    "2027-02-28T23:59:59Z",
                ),
                (
                    "CP-C",
                    "Faulted",
                    Some("GroundFailure"),
                    "2027-03-02T00:00:00Z",
                ),
            ],
        )
        .await;
        let events = [
            offline("CP-D", EventKind::Raised, "2027-03-01T10:00:10Z"),
            offline("CP-D", EventKind::Cleared, "2027-03-01T11:30:00Z"),
            offline("CP-E", EventKind::Raised, "2027-03-02T00:00:00Z"),
        ];
        append_events(ctx, &events.iter().collect::<Vec<_>>())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn digest_of_a_day_from_the_lake() {
        let dir = tempfile::tempdir().unwrap();
        let status = StatusStore::embedded();
        status.put_connector(ConnectorStatus {
            station_id: "CP-B".into(),
            evse_id: 1,
            connector_id: 2,
            status: "Faulted".into(),
            error_code: Some("GroundFailure".into()),
            info: None,
            event_time: t("2027-03-02T05:00:00Z"),
            updated_at: t("2027-03-02T05:00:00Z"),
        });
        let ctx = ctx(dir.path(), Some(status), SmtpConfig::default());
        sample_lake(&ctx).await;
        let job: DigestJob = toml::from_str("").unwrap();
        assert_eq!(job.days_back, 1);

        let d = load_digest(&ctx, &job, NaiveDate::from_ymd_opt(2027, 3, 1).unwrap())
            .await
            .unwrap();
        assert_eq!(
            d.faulted,
            vec![
                FaultedStation {
                    station_id: "CP-<A>".into(),
                    faults: 1,
                    first: t("2027-03-01T23:59:59Z"),
                    last: t("2027-03-01T23:59:59Z"),
                    error_codes: vec![],
                },
                FaultedStation {
                    station_id: "CP-B".into(),
                    faults: 3,
                    first: t("2027-03-01T08:00:00Z"),
                    last: t("2027-03-01T17:30:00Z"),
                    error_codes: vec!["GroundFailure".into(), "OverCurrentFailure".into()],
                },
            ]
        );
        assert_eq!(
            d.offline
                .iter()
                .map(|e| (e.station_id.as_str(), e.event.as_str()))
                .collect::<Vec<_>>(),
            [("CP-D", "raised"), ("CP-D", "cleared")]
        );
        assert_eq!(d.went_offline(), 1);
        assert_eq!(d.active.as_ref().unwrap()[0].alert_id, "faulted:CP-B:1:2");

        // No SMTP: written to the report folder.
        let summary = run_digest(&ctx, &job, t("2027-03-02T06:00:00Z"))
            .await
            .unwrap();
        assert!(
            summary.starts_with(
                "digest 2027-03-01: 2 stations faulted, 1 went offline, 1 alerts active; written to"
            ),
            "{summary}"
        );
        let html =
            std::fs::read_to_string(dir.path().join("reports/digest-2027-03-01.html")).unwrap();
        assert!(html.contains(
            "<tr><td>CP-B</td><td>3</td><td>2027-03-01T08:00:00Z</td><td>2027-03-01T17:30:00Z</td><td>GroundFailure, OverCurrentFailure</td></tr>"
        ), "{html}");
        assert!(html.contains("<td>CP-&lt;A&gt;</td>"));
        assert!(
            html.contains("<tr><td>CP-D</td><td>went offline</td><td>2027-03-01T10:00:10Z</td>")
        );
        assert!(
            html.contains("<tr><td>CP-D</td><td>back online</td><td>2027-03-01T11:30:00Z</td>")
        );
        let text =
            std::fs::read_to_string(dir.path().join("reports/digest-2027-03-01.txt")).unwrap();
        assert!(
            text.starts_with("CSMS daily digest 2027-03-01: 2 stations faulted, 1 went offline")
        );
    }

    #[tokio::test]
    async fn digest_is_mailed_and_an_empty_day_says_so() {
        let sink = Sink::start(&[]).await;
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path(), None, sink.config());
        sample_lake(&ctx).await;
        let job = DigestJob {
            recipients: vec!["maint@example.com".into()],
            days_back: 1,
            offline_after_secs: 300,
        };
        let summary = run_digest(&ctx, &job, t("2027-03-02T06:00:00Z"))
            .await
            .unwrap();
        assert_eq!(
            summary,
            "digest 2027-03-01: 2 stations faulted, 1 went offline; mailed to 1 recipient(s)"
        );
        let m = sink.message(1).await;
        assert_eq!(
            m["subject"],
            "CSMS daily digest 2027-03-01: 2 stations faulted, 1 went offline"
        );
        assert_eq!(m["to"], json!(["maint@example.com"]));
        assert_eq!(
            m["html_rows"],
            json!([
                [
                    "CP-<A>",
                    "1",
                    "2027-03-01T23:59:59Z",
                    "2027-03-01T23:59:59Z",
                    ""
                ],
                [
                    "CP-B",
                    "3",
                    "2027-03-01T08:00:00Z",
                    "2027-03-01T17:30:00Z",
                    "GroundFailure, OverCurrentFailure"
                ],
                [
                    "CP-D",
                    "went offline",
                    "2027-03-01T10:00:10Z",
                    "last seen 2027-03-01T09:55:00Z"
                ],
                [
                    "CP-D",
                    "back online",
                    "2027-03-01T11:30:00Z",
                    "last seen 2027-03-01T09:55:00Z"
                ],
            ])
        );

        // A quiet day (and a lake without the tables at all) still mails.
        let quiet = tempfile::tempdir().unwrap();
        let ctx = super::tests::ctx(quiet.path(), None, sink.config());
        let summary = run_digest(&ctx, &job, t("2027-03-10T06:00:00Z"))
            .await
            .unwrap();
        assert!(summary.starts_with("digest 2027-03-09: 0 stations faulted, 0 went offline"));
        let m = sink.message(2).await;
        assert_eq!(
            m["subject"],
            "CSMS daily digest 2027-03-09: 0 stations faulted, 0 went offline"
        );
        assert_eq!(m["html_rows"], json!([]));
        assert!(
            m["text"]
                .as_str()
                .unwrap()
                .contains("Nothing happened on 2027-03-09: no station faulted or went offline.")
        );
    }
}
