//! The monthly fault-ranking report: loaded from `gold.fault_ranking` and
//! `gold.daily_faults`, rendered as a mail (HTML, text, CSV, PNG) and
//! written to a folder when not sent.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{Datelike, NaiveDate};
use deltalake::arrow::array::{Array, Date32Array, Int64Array, RecordBatch, StringArray};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::DataType;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use schemas::tables::{GOLD_DAILY_FAULTS as DAILY, GOLD_FAULT_RANKING as RANKING};

use crate::ReportError;

/// Stations charted in the PNG (the top of the ranking).
pub const CHART_STATIONS: usize = 5;

/// One station of a month's ranking (a `gold.fault_ranking` row).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankingRow {
    pub rank: u64,
    pub station_id: String,
    /// All its faults that month.
    pub total_faults: u64,
    /// Days with at least the threshold of faults.
    pub days_at_threshold: u64,
    pub worst_day: NaiveDate,
    pub worst_day_faults: u64,
}

/// A month's ranking and the daily fault counts of the ranked stations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRankingReport {
    /// `YYYY-MM`.
    pub month: String,
    /// Faults within one day that put a station on the list.
    pub threshold: u32,
    /// In rank order.
    pub rows: Vec<RankingRow>,
    /// (date, station, faults) of the ranked stations, by date then station.
    pub daily: Vec<(NaiveDate, String, u64)>,
}

/// A rendered report, ready to be written to files or mailed.
#[derive(Clone, Debug)]
pub struct RenderedReport {
    /// `YYYY-MM`, for file names.
    pub month: String,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub csv: Vec<u8>,
    /// The daily chart; `None` for a month without ranked stations.
    pub png: Option<Vec<u8>>,
    /// Whether any station is listed (an empty month gets a short mail
    /// without attachments).
    pub has_rows: bool,
}

impl RenderedReport {
    /// File name of the CSV attachment.
    pub fn csv_name(&self) -> String {
        format!("fault-ranking-{}.csv", self.month)
    }

    /// File name of the PNG attachment.
    pub fn png_name(&self) -> String {
        format!("daily-faults-{}.png", self.month)
    }
}

/// Parses `YYYY-MM` into the first day of the month and the first of the next.
pub fn month_bounds(month: &str) -> Result<(NaiveDate, NaiveDate), ReportError> {
    let bad = || ReportError::Month(month.to_string());
    let (y, m) = month.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let y: i32 = y.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    let first = NaiveDate::from_ymd_opt(y, m, 1).ok_or_else(bad)?;
    let next = if m == 12 {
        NaiveDate::from_ymd_opt(y + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(y, m + 1, 1)
    }
    .ok_or_else(bad)?;
    Ok((first, next))
}

/// The location of `table` under the lake root, by the rule of the pipeline
/// and the lake writer (`schemas::tables::table_location`); registers the S3
/// object store handlers first when the lake is on S3.
pub(crate) fn table_location(lake_url: &str, table: &str) -> Result<String, ReportError> {
    let location =
        schemas::tables::table_location(lake_url, table).map_err(|e| ReportError::LakeUrl {
            url: e.url,
            reason: e.reason,
        })?;
    if location.starts_with("s3://") || location.starts_with("s3a://") {
        static REGISTER_S3: std::sync::Once = std::sync::Once::new();
        REGISTER_S3.call_once(|| deltalake::aws::register_handlers(None));
    }
    Ok(location)
}

pub(crate) fn lake_err(table: &str) -> impl Fn(String) -> ReportError + '_ {
    move |reason| ReportError::Lake {
        table: table.replace('/', "."),
        reason,
    }
}

/// Loads a table; `None` when it does not exist (the pipeline has not run).
pub(crate) async fn load(
    location: &str,
    table: &str,
    storage_options: &HashMap<String, String>,
) -> Result<Option<DeltaTable>, ReportError> {
    let err = lake_err(table);
    let url = deltalake::ensure_table_uri(location).map_err(|e| err(e.to_string()))?;
    let mut t = DeltaTableBuilder::from_url(url)
        .map_err(|e| err(e.to_string()))?
        .with_storage_options(storage_options.clone())
        .build()
        .map_err(|e| err(e.to_string()))?;
    match t.load().await {
        Ok(()) => Ok(Some(t)),
        Err(DeltaTableError::NotATable(_)) => Ok(None),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Runs `sql` over `table` registered as `t`.
pub(crate) async fn query(
    table: &DeltaTable,
    name: &str,
    sql: &str,
) -> Result<Vec<RecordBatch>, ReportError> {
    let err = lake_err(name);
    let ctx = SessionContext::new();
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|e| err(e.to_string()))?;
    let provider = table
        .table_provider()
        .with_session(Arc::new(ctx.state()))
        .build()
        .await
        .map_err(|e| err(e.to_string()))?;
    ctx.register_table("t", Arc::new(provider))
        .map_err(|e| err(e.to_string()))?;
    ctx.sql(sql)
        .await
        .map_err(|e| err(e.to_string()))?
        .collect()
        .await
        .map_err(|e| err(e.to_string()))
}

/// A column cast to `ty` (DataFusion may hand back views or other widths).
pub(crate) fn column<T: Clone + 'static>(
    batch: &RecordBatch,
    name: &str,
    ty: &DataType,
    table: &str,
) -> Result<T, ReportError> {
    let c = batch
        .column_by_name(name)
        .ok_or_else(|| lake_err(table)(format!("missing column {name}")))?;
    let c = cast(c, ty).map_err(|e| lake_err(table)(e.to_string()))?;
    c.as_any()
        .downcast_ref::<T>()
        .cloned()
        .ok_or_else(|| lake_err(table)(format!("column {name} has an unexpected type")))
}

pub(crate) fn date_of(days: i32) -> NaiveDate {
    NaiveDate::from_num_days_from_ce_opt(days + 719_163).unwrap_or_default()
}

fn count(v: i64) -> u64 {
    v.max(0) as u64
}

/// Reads `month` (`YYYY-MM`) of `gold.fault_ranking` and the daily fault
/// counts of its stations from the lake at `lake_url`. Missing tables (the
/// pipeline has not run yet) give an empty report, not an error: the mail
/// then says that no station reached the threshold. The threshold is the
/// pipeline's (`pipeline::PipelineConfig::fault_threshold`), the one the
/// table was built with; `storage_options` as for the pipeline.
pub async fn load_fault_ranking(
    lake_url: &str,
    storage_options: &HashMap<String, String>,
    month: &str,
    threshold: u32,
) -> Result<FaultRankingReport, ReportError> {
    let (first, next) = month_bounds(month)?;
    let mut report = FaultRankingReport {
        month: month.to_string(),
        threshold: threshold.max(1),
        rows: Vec::new(),
        daily: Vec::new(),
    };
    let opts = storage_options;
    let ranking_loc = table_location(lake_url, RANKING)?;
    let Some(ranking) = load(&ranking_loc, RANKING, opts).await? else {
        tracing::info!(month, "gold.fault_ranking does not exist yet: empty report");
        return Ok(report);
    };
    let batches = query(
        &ranking,
        RANKING,
        &format!(
            "SELECT \"rank\", station_id, total_faults, days_with_5_or_more, worst_day, \
             worst_day_faults FROM t WHERE month = '{month}' ORDER BY \"rank\", station_id"
        ),
    )
    .await?;
    for b in &batches {
        let rank: Int64Array = column(b, "rank", &DataType::Int64, RANKING)?;
        let station: StringArray = column(b, "station_id", &DataType::Utf8, RANKING)?;
        let total: Int64Array = column(b, "total_faults", &DataType::Int64, RANKING)?;
        let days: Int64Array = column(b, "days_with_5_or_more", &DataType::Int64, RANKING)?;
        let worst: Date32Array = column(b, "worst_day", &DataType::Date32, RANKING)?;
        let worst_n: Int64Array = column(b, "worst_day_faults", &DataType::Int64, RANKING)?;
        for i in 0..b.num_rows() {
            report.rows.push(RankingRow {
                rank: count(rank.value(i)),
                station_id: station.value(i).to_string(),
                total_faults: count(total.value(i)),
                days_at_threshold: count(days.value(i)),
                worst_day: date_of(worst.value(i)),
                worst_day_faults: count(worst_n.value(i)),
            });
        }
    }
    if report.rows.is_empty() {
        return Ok(report);
    }
    let daily_loc = table_location(lake_url, DAILY)?;
    let Some(daily) = load(&daily_loc, DAILY, opts).await? else {
        return Ok(report);
    };
    let ranked: std::collections::HashSet<&str> =
        report.rows.iter().map(|r| r.station_id.as_str()).collect();
    let batches = query(
        &daily,
        DAILY,
        &format!(
            "SELECT date, station_id, fault_count FROM t \
             WHERE date >= DATE '{first}' AND date < DATE '{next}' ORDER BY date, station_id"
        ),
    )
    .await?;
    let mut daily_rows = Vec::new();
    for b in &batches {
        let date: Date32Array = column(b, "date", &DataType::Date32, DAILY)?;
        let station: StringArray = column(b, "station_id", &DataType::Utf8, DAILY)?;
        let n: Int64Array = column(b, "fault_count", &DataType::Int64, DAILY)?;
        for i in 0..b.num_rows() {
            if ranked.contains(station.value(i)) {
                daily_rows.push((
                    date_of(date.value(i)),
                    station.value(i).to_string(),
                    count(n.value(i)),
                ));
            }
        }
    }
    report.daily = daily_rows;
    Ok(report)
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One CSV field (RFC 4180): quoted when it holds a separator, quote or
/// line break. A leading `=`, `+`, `-` or `@` is prefixed with `'` so a
/// spreadsheet does not run a station id as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// CSV header of the attachment.
pub const CSV_HEADER: &str =
    "rank,station_id,total_faults,days_at_threshold,worst_day,worst_day_faults";

fn no_station_sentence(r: &FaultRankingReport) -> String {
    format!(
        "No station reached the threshold of {} faults in a single day in {}.",
        r.threshold, r.month
    )
}

/// Renders the mail: subject, plain text, HTML table, CSV of the same rows
/// and (when a station is listed) the PNG chart of the top stations' daily
/// faults. Station ids come from chargers, so they are escaped everywhere.
pub fn render_fault_ranking(r: &FaultRankingReport) -> Result<RenderedReport, ReportError> {
    month_bounds(&r.month)?;
    let n = r.rows.len();
    let subject = if n == 0 {
        format!(
            "Fault ranking {}: no station reached the threshold",
            r.month
        )
    } else {
        format!(
            "Fault ranking {}: {n} station{} with {}+ faults in a day",
            r.month,
            if n == 1 { "" } else { "s" },
            r.threshold
        )
    };

    let mut csv = String::new();
    csv.push_str(CSV_HEADER);
    csv.push_str("\r\n");
    for row in &r.rows {
        let _ = write!(
            csv,
            "{},{},{},{},{},{}\r\n",
            row.rank,
            csv_field(&row.station_id),
            row.total_faults,
            row.days_at_threshold,
            row.worst_day,
            row.worst_day_faults
        );
    }

    let mut text = String::new();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head>\n\
         <body style=\"font-family: sans-serif\">\n<h2>{}</h2>\n",
        html_escape(&subject),
        html_escape(&subject)
    );
    if n == 0 {
        let sentence = no_station_sentence(r);
        let _ = writeln!(text, "{sentence}");
        let _ = writeln!(html, "<p>{}</p>", html_escape(&sentence));
    } else {
        let _ = writeln!(
            text,
            "Stations that faulted at least {} times in a single day in {}, \
             ranked by total faults that month.\n",
            r.threshold, r.month
        );
        let width = r
            .rows
            .iter()
            .map(|x| x.station_id.chars().count())
            .max()
            .unwrap_or(0)
            .max("station".len());
        let _ = writeln!(
            text,
            "{:>4}  {:<width$}  {:>12}  {:<10}  {:>10}",
            "rank", "station", "total faults", "worst day", "worst-day faults"
        );
        for row in &r.rows {
            let _ = writeln!(
                text,
                "{:>4}  {:<width$}  {:>12}  {:<10}  {:>10}",
                row.rank, row.station_id, row.total_faults, row.worst_day, row.worst_day_faults
            );
        }
        let _ = writeln!(
            html,
            "<p>Stations that faulted at least {} times in a single day in {}, \
             ranked by total faults that month.</p>",
            r.threshold,
            html_escape(&r.month)
        );
        html.push_str(
            "<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\" \
             style=\"border-collapse: collapse\">\n<thead><tr><th>Rank</th><th>Station</th>\
             <th>Total faults</th><th>Worst day</th><th>Faults on worst day</th></tr></thead>\n\
             <tbody>\n",
        );
        for (i, row) in r.rows.iter().enumerate() {
            let swatch = if i < CHART_STATIONS {
                format!(
                    "<span style=\"color: {}\">&#9632;</span> ",
                    crate::chart::css_color(i)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{swatch}{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                row.rank,
                html_escape(&row.station_id),
                row.total_faults,
                row.worst_day,
                row.worst_day_faults
            );
        }
        html.push_str("</tbody>\n</table>\n");
        let _ = writeln!(
            html,
            "<p>Attached: the table as CSV, and a chart of daily faults of the top {} \
             station(s) (colours as marked above).</p>",
            n.min(CHART_STATIONS)
        );
        let _ = writeln!(
            text,
            "\nAttached: the table as CSV, and a chart of daily faults of the top {} station(s).",
            n.min(CHART_STATIONS)
        );
    }
    html.push_str("</body></html>\n");

    let png = if n == 0 {
        None
    } else {
        Some(crate::chart::daily_faults_png(r)?)
    };
    Ok(RenderedReport {
        month: r.month.clone(),
        subject,
        text,
        html,
        csv: csv.into_bytes(),
        png,
        has_rows: n > 0,
    })
}

/// The daily counts of `stations` for every day of the month (missing days
/// are zero), in station order.
pub(crate) fn daily_series(r: &FaultRankingReport, stations: &[&str]) -> Vec<Vec<u64>> {
    let Ok((first, next)) = month_bounds(&r.month) else {
        return Vec::new();
    };
    let days = (next - first).num_days() as usize;
    let index: BTreeMap<&str, usize> = stations.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    let mut series = vec![vec![0u64; days]; stations.len()];
    for (date, station, n) in &r.daily {
        if let Some(&i) = index.get(station.as_str())
            && *date >= first
            && *date < next
        {
            series[i][date.day0() as usize] += n;
        }
    }
    series
}

fn write_file(path: PathBuf, bytes: &[u8]) -> Result<PathBuf, ReportError> {
    std::fs::write(&path, bytes).map_err(|source| ReportError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Writes the report for a person to look at, instead of sending it:
/// `report.html`, `report.txt`, `fault-ranking-YYYY-MM.csv`,
/// `daily-faults-YYYY-MM.png` (when there is a chart) and the complete
/// message as `report.eml` (From `smtp.from`, To `recipients`, or the sender
/// itself when none are given). Returns the paths written.
pub fn write_to_dir(
    r: &RenderedReport,
    dir: &Path,
    smtp: &crate::SmtpConfig,
    recipients: &[String],
) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = vec![
        write_file(dir.join("report.html"), r.html.as_bytes())?,
        write_file(dir.join("report.txt"), r.text.as_bytes())?,
        write_file(dir.join(r.csv_name()), &r.csv)?,
    ];
    if let Some(png) = &r.png {
        written.push(write_file(dir.join(r.png_name()), png)?);
    }
    let to: Vec<String> = if recipients.is_empty() {
        vec![smtp.from.clone()]
    } else {
        recipients.to_vec()
    };
    let message = crate::email::build_message(r, &smtp.from, &to)?;
    written.push(write_file(dir.join("report.eml"), &message.formatted())?);
    Ok(written)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    /// A hand-made month: three ranked stations, one with markup in its id.
    pub(crate) fn sample() -> FaultRankingReport {
        let rows = vec![
            RankingRow {
                rank: 1,
                station_id: "CP-<&>\"x\"".into(),
                total_faults: 21,
                days_at_threshold: 2,
                worst_day: d("2025-03-14"),
                worst_day_faults: 12,
            },
            RankingRow {
                rank: 2,
                station_id: "CP,2".into(),
                total_faults: 9,
                days_at_threshold: 1,
                worst_day: d("2025-03-02"),
                worst_day_faults: 7,
            },
            RankingRow {
                rank: 3,
                station_id: "CP3".into(),
                total_faults: 5,
                days_at_threshold: 1,
                worst_day: d("2025-03-31"),
                worst_day_faults: 5,
            },
        ];
        let daily = vec![
            (d("2025-03-02"), "CP,2".into(), 7),
            (d("2025-03-05"), "CP,2".into(), 2),
            (d("2025-03-10"), "CP-<&>\"x\"".into(), 9),
            (d("2025-03-14"), "CP-<&>\"x\"".into(), 12),
            (d("2025-03-31"), "CP3".into(), 5),
        ];
        FaultRankingReport {
            month: "2025-03".into(),
            threshold: 5,
            rows,
            daily,
        }
    }

    pub(crate) fn empty() -> FaultRankingReport {
        FaultRankingReport {
            month: "2025-02".into(),
            threshold: 5,
            rows: vec![],
            daily: vec![],
        }
    }

    /// Minimal RFC 4180 reader for the round trip.
    fn parse_csv(text: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut row = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    field.push('"');
                    chars.next();
                }
                (true, '"') => quoted = false,
                (true, c) => field.push(c),
                (false, '"') => quoted = true,
                (false, ',') => row.push(std::mem::take(&mut field)),
                (false, '\r') => {}
                (false, '\n') => {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                (false, c) => field.push(c),
            }
        }
        rows
    }

    #[test]
    fn months_parse_strictly() {
        assert_eq!(
            month_bounds("2024-02").unwrap(),
            (d("2024-02-01"), d("2024-03-01"))
        );
        assert_eq!(
            month_bounds("2024-12").unwrap(),
            (d("2024-12-01"), d("2025-01-01"))
        );
        for bad in ["2024-13", "2024-2", "24-02", "2024/02", "", "2024-02-01"] {
            assert!(month_bounds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn html_lists_rows_in_rank_order_escaped() {
        let out = render_fault_ranking(&sample()).unwrap();
        let body = &out.html;
        assert!(!body.contains("CP-<&>"), "unescaped id in {body}");
        let first = body
            .find("CP-&lt;&amp;&gt;&quot;x&quot;")
            .expect("escaped id");
        let second = body.find("CP,2").expect("second row");
        let third = body.find("CP3").expect("third row");
        assert!(first < second && second < third);
        assert_eq!(body.matches("<tr>").count(), 4, "header + 3 rows: {body}");
        assert!(body.contains("<td>2025-03-14</td><td>12</td>"));
        assert!(out.subject.contains("2025-03") && out.subject.contains("3 stations"));
        assert!(out.text.contains("CP-<&>\"x\""), "{}", out.text);
        let text_rows: Vec<&str> = out
            .text
            .lines()
            .filter(|l| l.contains("2025-03-"))
            .collect();
        assert_eq!(text_rows.len(), 3, "{}", out.text);
        assert!(text_rows[0].trim_start().starts_with('1'));
    }

    #[test]
    fn csv_round_trips() {
        let r = sample();
        let out = render_fault_ranking(&r).unwrap();
        let rows = parse_csv(std::str::from_utf8(&out.csv).unwrap());
        assert_eq!(rows[0].join(","), CSV_HEADER);
        assert_eq!(rows.len(), 1 + r.rows.len());
        for (got, want) in rows[1..].iter().zip(&r.rows) {
            assert_eq!(
                got,
                &vec![
                    want.rank.to_string(),
                    want.station_id.clone(),
                    want.total_faults.to_string(),
                    want.days_at_threshold.to_string(),
                    want.worst_day.to_string(),
                    want.worst_day_faults.to_string(),
                ]
            );
        }
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
    }

    #[test]
    fn empty_month_is_a_short_note_without_chart() {
        let out = render_fault_ranking(&empty()).unwrap();
        assert!(out.png.is_none());
        assert!(!out.has_rows);
        let sentence = "No station reached the threshold of 5 faults in a single day in 2025-02.";
        assert!(out.text.contains(sentence), "{}", out.text);
        assert!(out.html.contains(sentence));
        assert!(!out.html.contains("<table"));
        assert_eq!(std::str::from_utf8(&out.csv).unwrap().trim(), CSV_HEADER);
    }

    #[test]
    fn series_fill_missing_days_with_zero() {
        let r = sample();
        let s = daily_series(&r, &["CP-<&>\"x\"", "CP3"]);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].len(), 31);
        assert_eq!(s[0][9], 9);
        assert_eq!(s[0][13], 12);
        assert_eq!(s[0].iter().sum::<u64>(), 21);
        assert_eq!(s[1][30], 5);
    }

    #[test]
    fn writes_the_files_for_a_person() {
        let dir = tempfile::tempdir().unwrap();
        let out = render_fault_ranking(&sample()).unwrap();
        let smtp = crate::SmtpConfig::default();
        let files = write_to_dir(&out, dir.path(), &smtp, &[]).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "report.html",
                "report.txt",
                "fault-ranking-2025-03.csv",
                "daily-faults-2025-03.png",
                "report.eml"
            ]
        );
        let eml = std::fs::read_to_string(dir.path().join("report.eml")).unwrap();
        assert!(eml.contains("multipart/mixed"), "{eml}");
        assert!(eml.contains("fault-ranking-2025-03.csv"));
        assert!(eml.contains("To: csms@localhost"));
        let png = std::fs::read(dir.path().join("daily-faults-2025-03.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }

    /// Writes `batch` as a new Delta table `table` (schema of `batch`).
    async fn write_table(lake: &Path, table: &str, partition: &str, batch: RecordBatch) {
        use deltalake::kernel::StructType;
        use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
        let loc = table_location(lake.to_str().unwrap(), table).unwrap();
        let url = deltalake::ensure_table_uri(&loc).unwrap();
        let columns: StructType = batch.schema().as_ref().try_into_kernel().unwrap();
        let created = DeltaTableBuilder::from_url(url)
            .unwrap()
            .build()
            .unwrap()
            .create()
            .with_columns(columns.fields().cloned())
            .with_partition_columns([partition])
            .await
            .unwrap();
        created.write(vec![batch]).await.unwrap();
    }

    fn days(s: &str) -> i32 {
        (d(s) - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as i32
    }

    #[tokio::test]
    async fn loads_the_month_from_gold_tables() {
        let dir = tempfile::tempdir().unwrap();
        let strs = |v: &[&str]| Arc::new(StringArray::from(v.to_vec())) as Arc<dyn Array>;
        let ints = |v: &[i64]| Arc::new(Int64Array::from(v.to_vec())) as Arc<dyn Array>;
        let dates = |v: &[&str]| {
            Arc::new(Date32Array::from(
                v.iter().map(|s| days(s)).collect::<Vec<_>>(),
            )) as Arc<dyn Array>
        };
        let ranking = RecordBatch::try_new(
            schemas::tables::fault_ranking_schema(),
            vec![
                strs(&["2025-03", "2025-03", "2025-04"]),
                strs(&["B", "A", "A"]),
                ints(&[6, 9, 7]),
                ints(&[1, 1, 1]),
                dates(&["2025-03-02", "2025-03-09", "2025-04-01"]),
                ints(&[6, 7, 7]),
                ints(&[2, 1, 1]),
            ],
        )
        .unwrap();
        write_table(dir.path(), RANKING, "month", ranking).await;
        let daily = RecordBatch::try_new(
            schemas::tables::daily_faults_schema(),
            vec![
                dates(&[
                    "2025-03-02",
                    "2025-03-09",
                    "2025-03-10",
                    "2025-03-11",
                    "2025-04-01",
                ]),
                strs(&["B", "A", "A", "C", "A"]),
                ints(&[6, 7, 2, 1, 7]),
            ],
        )
        .unwrap();
        write_table(dir.path(), DAILY, "date", daily).await;

        let lake = dir.path().to_str().unwrap();
        let r = load_fault_ranking(lake, &HashMap::new(), "2025-03", 5)
            .await
            .unwrap();
        let ids: Vec<(u64, &str)> = r
            .rows
            .iter()
            .map(|x| (x.rank, x.station_id.as_str()))
            .collect();
        assert_eq!(ids, [(1, "A"), (2, "B")]);
        assert_eq!(r.rows[0].total_faults, 9);
        assert_eq!(r.rows[0].worst_day, d("2025-03-09"));
        assert_eq!(r.rows[0].worst_day_faults, 7);
        // Only ranked stations, only this month.
        assert_eq!(
            r.daily,
            vec![
                (d("2025-03-02"), "B".to_string(), 6),
                (d("2025-03-09"), "A".to_string(), 7),
                (d("2025-03-10"), "A".to_string(), 2),
            ]
        );
        let may = load_fault_ranking(lake, &HashMap::new(), "2025-05", 5)
            .await
            .unwrap();
        assert!(may.rows.is_empty() && may.daily.is_empty());
    }

    #[tokio::test]
    async fn missing_tables_give_an_empty_report() {
        let dir = tempfile::tempdir().unwrap();
        let opts = HashMap::new();
        let r = load_fault_ranking(dir.path().to_str().unwrap(), &opts, "2025-03", 5)
            .await
            .unwrap();
        assert!(r.rows.is_empty() && r.daily.is_empty());
        assert_eq!(r.threshold, 5);
        assert!(matches!(
            load_fault_ranking(dir.path().to_str().unwrap(), &opts, "2025-3", 5).await,
            Err(ReportError::Month(_))
        ));
    }
}
