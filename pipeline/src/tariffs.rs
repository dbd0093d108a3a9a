//! Versioned tariffs (`workflows/tariffs.toml`) and the pricing of one
//! transaction: which tariff is in force, how its energy splits across
//! time-of-use windows, and what it costs.
//!
//! # File format
//! ```toml
//! [[tariff]]
//! id = "standard-2025-01"          # unique across the file
//! currency = "EUR"                 # ISO 4217 code, three letters
//! valid_from = "2025-01-01"        # UTC date; quoted
//! energy_price_per_kwh = 0.30
//! per_minute_fee = 0.02            # optional, default 0
//! decimals = 2                     # optional, minor-unit digits costs round to
//! stations = ["CS-1"]              # optional override scope
//! id_tokens = ["TAG1"]             # optional override scope
//!
//! [[tariff.windows]]               # optional time-of-use windows
//! start = "22:00"                  # HH:MM, UTC
//! end = "06:00"                    # may wrap midnight; "24:00" = midnight
//! energy_price_per_kwh = 0.20
//! timezone = "UTC"                 # optional; only UTC is supported
//! ```
//!
//! # Which tariff applies
//! The one in force at the transaction's start (UTC date): among the tariffs
//! whose scope matches (an empty `stations` / `id_tokens` list matches every
//! station / token) and whose `valid_from` is on or before that date, the
//! most specific scope wins (id tokens over stations over the default), then
//! the latest `valid_from`. So a new version of a tariff applies from its
//! start date, and an override stays in force until a newer version of that
//! override. The whole session is priced with that one tariff.
//!
//! # Energy split
//! The energy register readings (meter start/stop and
//! `Energy.Active.Import.Register` samples) define a piecewise-linear
//! cumulative curve; the energy of each stretch between window boundaries
//! is read off it (negative steps count as zero) and scaled so the parts add
//! up to the transaction's energy. The split is *metered* when every window
//! boundary inside the session lies on a reading or between two readings at
//! most [`MAX_INTERPOLATION_GAP_US`] apart; otherwise (only start and stop
//! readings on a long session, a gap in the samples) it is *estimated*, and
//! without a usable curve the energy is split in proportion to time.
//!
//! # Parsing
//! The file is TOML (the `toml` crate); syntax errors name the line, and
//! every semantic error names the tariff and the field. Dates are quoted
//! strings (`valid_from = "2025-01-01"`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde_json::{Map, Value};

const MICROS_PER_DAY: i64 = 86_400_000_000;
const MICROS_PER_MINUTE: i64 = 60_000_000;

/// Readings further apart than this around a window boundary make the split
/// an estimate (two 15-minute sampling intervals).
pub const MAX_INTERPOLATION_GAP_US: i64 = 30 * MICROS_PER_MINUTE;

/// Why a tariff file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum TariffError {
    #[error("tariff file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tariff file {path}, line {line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("tariff file {path}, tariff {tariff:?}, field {field:?}: {message}")]
    Invalid {
        path: PathBuf,
        tariff: String,
        field: String,
        message: String,
    },
}

/// A daily time-of-use window with its own energy price (UTC).
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// Minutes after midnight UTC at which the window opens.
    pub start_min: u32,
    /// Minutes after midnight UTC at which it closes (before `start_min` when
    /// it wraps midnight).
    pub end_min: u32,
    pub energy_price_per_kwh: f64,
}

impl Window {
    /// Whether the minute-of-day `m` (fractional) is inside the window.
    fn contains(&self, m: f64) -> bool {
        let (s, e) = (f64::from(self.start_min), f64::from(self.end_min));
        if s < e {
            m >= s && m < e
        } else {
            m >= s || m < e
        }
    }
}

/// One tariff version.
#[derive(Clone, Debug, PartialEq)]
pub struct Tariff {
    pub id: String,
    pub currency: String,
    pub valid_from: NaiveDate,
    pub energy_price_per_kwh: f64,
    pub per_minute_fee: f64,
    /// Digits after the decimal point costs are rounded to.
    pub decimals: u32,
    pub windows: Vec<Window>,
    /// Stations it is restricted to (empty: all).
    pub stations: BTreeSet<String>,
    /// Id tokens it is restricted to (empty: all).
    pub id_tokens: BTreeSet<String>,
}

impl Tariff {
    fn specificity(&self) -> u8 {
        2 * u8::from(!self.id_tokens.is_empty()) + u8::from(!self.stations.is_empty())
    }

    fn matches(&self, station: &str, id_token: Option<&str>) -> bool {
        (self.stations.is_empty() || self.stations.contains(station))
            && (self.id_tokens.is_empty() || id_token.is_some_and(|t| self.id_tokens.contains(t)))
    }
}

/// The validated tariffs of one file.
#[derive(Clone, Debug)]
pub struct TariffBook {
    pub tariffs: Vec<Tariff>,
    /// FNV-1a hash of the file's bytes (63 bits): gold.billing records it and
    /// reprices everything when it changes.
    pub hash: i64,
}

impl TariffBook {
    /// Reads and validates the tariff file at `path`.
    pub fn load(path: &Path) -> Result<TariffBook, TariffError> {
        let text = std::fs::read_to_string(path).map_err(|source| TariffError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates tariff file text (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<TariffBook, TariffError> {
        let root = parse_toml(text).map_err(|(line, message)| TariffError::Syntax {
            path: path.to_path_buf(),
            line,
            message,
        })?;
        let invalid = |tariff: &str, field: &str, message: String| TariffError::Invalid {
            path: path.to_path_buf(),
            tariff: tariff.to_string(),
            field: field.to_string(),
            message,
        };
        if let Some(k) = root.keys().find(|k| *k != "tariff") {
            return Err(invalid(
                "-",
                k,
                "unknown top-level key (expected [[tariff]])".into(),
            ));
        }
        let list = match root.get("tariff") {
            Some(Value::Array(a)) if !a.is_empty() => a,
            _ => return Err(invalid("-", "tariff", "no [[tariff]] entries".into())),
        };
        let mut tariffs = Vec::new();
        for (i, v) in list.iter().enumerate() {
            let t = tariff_of(v, i).map_err(|(id, field, m)| invalid(&id, &field, m))?;
            if tariffs.iter().any(|o: &Tariff| o.id == t.id) {
                return Err(invalid(&t.id, "id", "duplicate tariff id".into()));
            }
            tariffs.push(t);
        }
        for (i, a) in tariffs.iter().enumerate() {
            for b in &tariffs[i + 1..] {
                let overlap = |x: &BTreeSet<String>, y: &BTreeSet<String>| {
                    x.is_empty() && y.is_empty() || x.intersection(y).next().is_some()
                };
                if a.valid_from == b.valid_from
                    && a.specificity() == b.specificity()
                    && overlap(&a.stations, &b.stations)
                    && overlap(&a.id_tokens, &b.id_tokens)
                {
                    return Err(invalid(
                        &b.id,
                        "valid_from",
                        format!(
                            "tariff {:?} has the same start date and an overlapping scope: \
                             which applies would be ambiguous",
                            a.id
                        ),
                    ));
                }
            }
        }
        Ok(TariffBook {
            tariffs,
            hash: fnv1a(text.as_bytes()),
        })
    }

    /// The tariff in force for a transaction of `station` / `id_token`
    /// started at `started_at` (UTC µs); `None` before any tariff's start.
    pub fn in_force(
        &self,
        station: &str,
        id_token: Option<&str>,
        started_at: i64,
    ) -> Option<&Tariff> {
        let day = NaiveDate::from_num_days_from_ce_opt(
            started_at.div_euclid(MICROS_PER_DAY) as i32 + 719_163,
        )?;
        self.tariffs
            .iter()
            .filter(|t| t.valid_from <= day && t.matches(station, id_token))
            .max_by_key(|t| (t.specificity(), t.valid_from))
    }
}

fn fnv1a(bytes: &[u8]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h & (i64::MAX as u64)) as i64
}

type FieldError = (String, String, String);

fn tariff_of(v: &Value, index: usize) -> Result<Tariff, FieldError> {
    let Value::Object(o) = v else {
        return Err((format!("#{}", index + 1), "-".into(), "not a table".into()));
    };
    let id = match o.get("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(_) => {
            return Err((
                format!("#{}", index + 1),
                "id".into(),
                "must be a non-empty string".into(),
            ));
        }
        None => return Err((format!("#{}", index + 1), "id".into(), "missing".into())),
    };
    let err = |field: &str, m: &str| (id.clone(), field.to_string(), m.to_string());
    const KNOWN: [&str; 9] = [
        "id",
        "currency",
        "valid_from",
        "energy_price_per_kwh",
        "per_minute_fee",
        "decimals",
        "windows",
        "stations",
        "id_tokens",
    ];
    if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(err(k, "unknown field"));
    }
    let currency = match o.get("currency") {
        Some(Value::String(s)) if s.len() == 3 && s.chars().all(|c| c.is_ascii_uppercase()) => {
            s.clone()
        }
        Some(_) => {
            return Err(err(
                "currency",
                "must be a three-letter code such as \"EUR\"",
            ));
        }
        None => return Err(err("currency", "missing")),
    };
    let valid_from = match o.get("valid_from") {
        Some(Value::String(s)) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| err("valid_from", "must be a date \"YYYY-MM-DD\""))?,
        Some(_) => return Err(err("valid_from", "must be a quoted date \"YYYY-MM-DD\"")),
        None => return Err(err("valid_from", "missing")),
    };
    let price = |o: &Map<String, Value>, field: &str, required: bool| match o.get(field) {
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x >= 0.0 => Ok(x),
            _ => Err(err(field, "must be a number >= 0")),
        },
        None if required => Err(err(field, "missing")),
        None => Ok(0.0),
    };
    let energy_price_per_kwh = price(o, "energy_price_per_kwh", true)?;
    let per_minute_fee = price(o, "per_minute_fee", false)?;
    let decimals = match o.get("decimals") {
        None => 2,
        Some(v) => match v.as_u64() {
            Some(d) if d <= 6 => d as u32,
            _ => return Err(err("decimals", "must be an integer from 0 to 6")),
        },
    };
    let names = |field: &str| -> Result<BTreeSet<String>, FieldError> {
        match o.get(field) {
            None => Ok(BTreeSet::new()),
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|x| match x {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    _ => Err(err(field, "must list non-empty strings")),
                })
                .collect(),
            Some(_) => Err(err(field, "must be a non-empty array of strings")),
        }
    };
    let stations = names("stations")?;
    let id_tokens = names("id_tokens")?;
    let mut windows = Vec::new();
    let mut covered = [false; 1440];
    match o.get("windows") {
        None => {}
        Some(Value::Array(a)) => {
            for (i, w) in a.iter().enumerate() {
                let field = |f: &str| format!("windows[{i}].{f}");
                let Value::Object(w) = w else {
                    return Err(err(&format!("windows[{i}]"), "not a table"));
                };
                if let Some(k) = w.keys().find(|k| {
                    !["start", "end", "energy_price_per_kwh", "timezone"].contains(&k.as_str())
                }) {
                    return Err(err(&field(k), "unknown field"));
                }
                match w.get("timezone") {
                    None => {}
                    Some(Value::String(z)) if z == "UTC" => {}
                    Some(_) => {
                        return Err(err(
                            &field("timezone"),
                            "only \"UTC\" is supported: give the window in UTC",
                        ));
                    }
                }
                let time = |f: &str| -> Result<u32, FieldError> {
                    match w.get(f) {
                        Some(Value::String(s)) => parse_hhmm(s)
                            .ok_or_else(|| err(&field(f), "must be a time \"HH:MM\" (UTC)")),
                        Some(_) => Err(err(&field(f), "must be a quoted time \"HH:MM\"")),
                        None => Err(err(&field(f), "missing")),
                    }
                };
                let (start_min, end_min) = (time("start")?, time("end")?);
                if start_min == end_min {
                    return Err(err(
                        &field("end"),
                        "equals start: an empty or whole-day window (use the tariff's price)",
                    ));
                }
                let p = match w.get("energy_price_per_kwh").and_then(Value::as_f64) {
                    Some(x) if x.is_finite() && x >= 0.0 => x,
                    Some(_) => {
                        return Err(err(&field("energy_price_per_kwh"), "must be >= 0"));
                    }
                    None => {
                        return Err(err(
                            &field("energy_price_per_kwh"),
                            "missing or not a number",
                        ));
                    }
                };
                let window = Window {
                    start_min,
                    end_min,
                    energy_price_per_kwh: p,
                };
                for (m, c) in covered.iter_mut().enumerate() {
                    if window.contains(m as f64) {
                        if *c {
                            return Err(err(&field("start"), "overlaps another window"));
                        }
                        *c = true;
                    }
                }
                windows.push(window);
            }
        }
        Some(_) => return Err(err("windows", "must be [[tariff.windows]] tables")),
    }
    Ok(Tariff {
        id,
        currency,
        valid_from,
        energy_price_per_kwh,
        per_minute_fee,
        decimals,
        windows,
        stations,
        id_tokens,
    })
}

/// `HH:MM` as minutes after midnight; `24:00` is midnight.
fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) => Some(0),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Pricing.

/// How a transaction's energy was split across the tariff's rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Interpolated between close register readings (or no boundary crossed).
    Metered,
    /// A boundary fell in a long stretch without readings.
    Estimated,
    /// The energy itself is flagged: nothing to split.
    Unavailable,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Metered => "metered",
            Split::Estimated => "estimated",
            Split::Unavailable => "unavailable",
        }
    }
}

/// A priced transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct Priced {
    /// Energy at the tariff's base price (outside every window), kWh.
    pub energy_kwh_peak: Option<f64>,
    /// Energy inside the tariff's windows, kWh.
    pub energy_kwh_offpeak: Option<f64>,
    pub energy_cost: f64,
    pub time_cost: f64,
    pub total_cost: f64,
    pub split: Split,
}

/// `x` rounded to `decimals` digits; never `-0.0` (an empty float sum is
/// `-0.0`, which would render as such).
fn round_to(x: f64, decimals: u32) -> f64 {
    let f = 10f64.powi(decimals as i32);
    (x * f).round() / f + 0.0
}

/// Prices a transaction from `started_at` to `stopped_at` (UTC µs) with
/// `tariff`. `energy_kwh` is `None` when the energy is flagged: it is then
/// priced 0 (not billed blindly) while the per-minute fee, which depends on
/// the clock only, still applies. `readings` are register readings
/// `(µs, Wh)`, any order.
pub fn price(
    tariff: &Tariff,
    started_at: i64,
    stopped_at: i64,
    energy_kwh: Option<f64>,
    readings: &[(i64, f64)],
) -> Priced {
    let minutes = (stopped_at - started_at).max(0) as f64 / MICROS_PER_MINUTE as f64;
    let time_cost = round_to(minutes * tariff.per_minute_fee, tariff.decimals);
    let Some(kwh) = energy_kwh else {
        return Priced {
            energy_kwh_peak: None,
            energy_kwh_offpeak: None,
            energy_cost: 0.0,
            time_cost,
            total_cost: time_cost,
            split: Split::Unavailable,
        };
    };
    let (parts, split) = split_energy(&tariff.windows, started_at, stopped_at, kwh, readings);
    let mut cost = parts[0] * tariff.energy_price_per_kwh;
    for (w, k) in tariff.windows.iter().zip(&parts[1..]) {
        cost += k * w.energy_price_per_kwh;
    }
    let energy_cost = round_to(cost, tariff.decimals);
    Priced {
        energy_kwh_peak: Some(round_to(parts[0], 6)),
        energy_kwh_offpeak: Some(round_to(parts[1..].iter().sum(), 6)),
        energy_cost,
        time_cost,
        total_cost: round_to(energy_cost + time_cost, tariff.decimals),
        split,
    }
}

/// The instants in `(a, b)` where a window opens or closes.
fn boundaries(windows: &[Window], a: i64, b: i64) -> Vec<i64> {
    let mut cuts = BTreeSet::new();
    let (first, last) = (a.div_euclid(MICROS_PER_DAY), b.div_euclid(MICROS_PER_DAY));
    for day in first..=last {
        for w in windows {
            for m in [w.start_min, w.end_min] {
                let t = day * MICROS_PER_DAY + i64::from(m) * MICROS_PER_MINUTE;
                if t > a && t < b {
                    cuts.insert(t);
                }
            }
        }
    }
    cuts.into_iter().collect()
}

/// Which rate applies at `t`: 0 for the base price, `i + 1` for window `i`.
fn rate_at(windows: &[Window], t: i64) -> usize {
    let minute = t.rem_euclid(MICROS_PER_DAY) as f64 / MICROS_PER_MINUTE as f64;
    windows
        .iter()
        .position(|w| w.contains(minute))
        .map_or(0, |i| i + 1)
}

/// The piecewise-linear cumulative register curve through `points` (sorted,
/// distinct times), flat outside them.
fn curve(points: &[(i64, f64)], t: i64) -> f64 {
    let i = points.partition_point(|p| p.0 <= t);
    if i == 0 {
        return points[0].1;
    }
    if i == points.len() {
        return points[i - 1].1;
    }
    let ((t0, v0), (t1, v1)) = (points[i - 1], points[i]);
    v0 + (v1 - v0) * ((t - t0) as f64 / (t1 - t0) as f64)
}

/// Splits `kwh` over the rates of `windows` (index 0 base, `i + 1` window
/// `i`) for a session from `a` to `b`.
fn split_energy(
    windows: &[Window],
    a: i64,
    b: i64,
    kwh: f64,
    readings: &[(i64, f64)],
) -> (Vec<f64>, Split) {
    let mut parts = vec![0.0; windows.len() + 1];
    let cuts = boundaries(windows, a, b);
    let mut edges = vec![a];
    edges.extend(&cuts);
    edges.push(b.max(a));
    // Readings at the same instant: the highest (the register only grows).
    let mut by_time: BTreeMap<i64, f64> = BTreeMap::new();
    for &(t, v) in readings.iter().filter(|r| r.1.is_finite()) {
        let e = by_time.entry(t).or_insert(v);
        *e = e.max(v);
    }
    let points: Vec<(i64, f64)> = by_time.into_iter().collect();
    let bracketed = |c: i64| {
        let i = points.partition_point(|p| p.0 < c);
        points.get(i).is_some_and(|p| p.0 == c)
            || (i > 0
                && i < points.len()
                && points[i].0 - points[i - 1].0 <= MAX_INTERPOLATION_GAP_US)
    };
    let mut split = if cuts.iter().all(|c| bracketed(*c)) {
        Split::Metered
    } else {
        Split::Estimated
    };
    let steps: Vec<f64> = if points.len() >= 2 {
        edges
            .windows(2)
            .map(|e| (curve(&points, e[1]) - curve(&points, e[0])).max(0.0))
            .collect()
    } else {
        Vec::new()
    };
    let metered_total: f64 = steps.iter().sum();
    if metered_total > 0.0 {
        for (e, step) in edges.windows(2).zip(&steps) {
            parts[rate_at(windows, e[0] + (e[1] - e[0]) / 2)] += step / metered_total * kwh;
        }
    } else if kwh != 0.0 {
        // No usable curve: in proportion to time.
        let span = (b - a).max(1) as f64;
        for e in edges.windows(2) {
            parts[rate_at(windows, e[0] + (e[1] - e[0]) / 2)] += (e[1] - e[0]) as f64 / span * kwh;
        }
        if !cuts.is_empty() {
            split = Split::Estimated;
        }
    }
    (parts, split)
}

/// Parses the file with the `toml` crate into a JSON object (the validation
/// below reads JSON values); errors carry the 1-based line.
fn parse_toml(text: &str) -> Result<Map<String, Value>, (usize, String)> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
            .unwrap_or(1);
        (line, e.message().to_string())
    })?;
    match serde_json::to_value(table) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err((1, "expected a table".into())),
        Err(e) => Err((1, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000_000;
    const M: i64 = MICROS_PER_MINUTE;

    fn book(text: &str) -> Result<TariffBook, TariffError> {
        TariffBook::parse(Path::new("t.toml"), text)
    }

    const NIGHT: &str = r#"
# base tariff
[[tariff]]
id = "std"   # comment after a value
currency = "EUR"
valid_from = "2025-01-01"
energy_price_per_kwh = 0.30
per_minute_fee = 0.0
stations = [
  "A",  # first
  'B',
]

[[tariff.windows]]
start = "22:00"
end = "06:00"
energy_price_per_kwh = 0.20
timezone = "UTC"

[[tariff]]
id = "std-2"
currency = "EUR"
valid_from = "2025-04-01"
energy_price_per_kwh = 1_0.5e-1
"#;

    #[test]
    fn parses_the_example() {
        let b = book(NIGHT).unwrap();
        assert_eq!(b.tariffs.len(), 2);
        let t = &b.tariffs[0];
        assert_eq!((t.id.as_str(), t.currency.as_str()), ("std", "EUR"));
        assert_eq!(t.valid_from, NaiveDate::from_ymd_opt(2025, 1, 1).unwrap());
        assert_eq!(t.windows.len(), 1);
        assert_eq!((t.windows[0].start_min, t.windows[0].end_min), (1320, 360));
        assert_eq!(
            t.stations.iter().collect::<Vec<_>>(),
            vec![&"A".to_string(), &"B".to_string()]
        );
        assert_eq!(b.tariffs[1].energy_price_per_kwh, 1.05);
        assert!(b.tariffs[1].windows.is_empty());
        assert_eq!(b.tariffs[1].decimals, 2);
        assert_ne!(b.hash, book(&NIGHT.replace("0.30", "0.31")).unwrap().hash);
    }

    #[test]
    fn errors_name_file_line_tariff_and_field() {
        let e = book("[[tariff]]\nid = \"x\"\ncurrency = \"EUR\"\nvalid_from = 2025-01-01\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("valid_from") && e.contains("quote"), "{e}");
        let e = book("[[tariff]]\nid = \"x\"\ncurrency = = \"EUR\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.toml, line 3"), "{e}");
        let e = book("[[tariff]]\nid = \"x\"\ncurrency = \"EUR\"\nvalid_from = \"2025-01-01\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tariff \"x\"") && e.contains("energy_price_per_kwh"),
            "{e}"
        );
        let bad_window = NIGHT.replace("end = \"06:00\"", "end = \"25:00\"");
        let e = book(&bad_window).unwrap_err().to_string();
        assert!(e.contains("windows[0].end") && e.contains("\"std\""), "{e}");
        let tz = NIGHT.replace("\"UTC\"", "\"Europe/Paris\"");
        assert!(book(&tz).unwrap_err().to_string().contains("timezone"));
        let dup = NIGHT.replace("id = \"std-2\"", "id = \"std\"");
        assert!(book(&dup).unwrap_err().to_string().contains("duplicate"));
        let unknown = NIGHT.replace("per_minute_fee", "per_minute_feee");
        assert!(
            book(&unknown)
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
        let w = |s: &str, e: &str| {
            format!(
                "\n[[tariff.windows]]\nstart = \"{s}\"\nend = \"{e}\"\nenergy_price_per_kwh = 0.1\n"
            )
        };
        let overlap = format!("{NIGHT}{}{}", w("23:00", "01:00"), w("00:30", "02:00"));
        assert!(book(&format!("{NIGHT}{}", w("23:00", "01:00"))).is_ok());
        assert!(book(&overlap).unwrap_err().to_string().contains("overlaps"));
        let same_day = NIGHT
            .replace("2025-04-01", "2025-01-01")
            .replace("stations = [\n  \"A\",  # first\n  'B',\n]", "");
        assert!(
            book(&same_day)
                .unwrap_err()
                .to_string()
                .contains("ambiguous")
        );
        assert!(book("x = {a = 1}").is_err());
        assert!(book("").unwrap_err().to_string().contains("no [[tariff]]"));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let b = book(include_str!("../../workflows/tariffs.toml")).unwrap();
        assert_eq!(b.tariffs.len(), 3);
        assert!(b.tariffs.iter().all(|t| t.currency == "EUR"));
    }

    #[test]
    fn in_force_by_start_date_and_scope() {
        let text = r#"
[[tariff]]
id = "base-1"
currency = "EUR"
valid_from = "2025-01-01"
energy_price_per_kwh = 0.3
[[tariff]]
id = "base-2"
currency = "EUR"
valid_from = "2025-03-15"
energy_price_per_kwh = 0.4
[[tariff]]
id = "fleet"
currency = "EUR"
valid_from = "2025-02-01"
energy_price_per_kwh = 0.1
id_tokens = ["FLEET"]
"#;
        let b = book(text).unwrap();
        let at = |d: &str| {
            NaiveDate::parse_from_str(d, "%Y-%m-%d")
                .unwrap()
                .and_hms_opt(23, 59, 0)
                .unwrap()
                .and_utc()
                .timestamp_micros()
        };
        let id = |s, t, d| b.in_force(s, t, at(d)).map(|t| t.id.as_str());
        assert_eq!(id("A", None, "2024-12-31"), None);
        assert_eq!(id("A", None, "2025-03-14"), Some("base-1"));
        assert_eq!(id("A", None, "2025-03-15"), Some("base-2"));
        assert_eq!(id("A", Some("FLEET"), "2025-01-31"), Some("base-1"));
        assert_eq!(id("A", Some("FLEET"), "2025-06-01"), Some("fleet"));
    }

    fn night() -> Tariff {
        book(NIGHT).unwrap().tariffs.remove(0)
    }

    #[test]
    fn split_interpolates_samples_at_the_boundary() {
        // 21:00–23:00, 1 kWh per 30 min, no sample at 22:00:
        // 2 kWh before 22:00 (0.30) and 2 after (0.20) = 1.00.
        let a = 21 * H;
        // Samples at 21:00, 21:25, 21:50, 22:15, 22:40 and 23:00.
        let readings: Vec<(i64, f64)> = [0, 25, 50, 75, 100, 120]
            .iter()
            .map(|m| (a + m * M, *m as f64 * 1000.0 / 30.0))
            .collect();
        let p = price(&night(), a, 23 * H, Some(4.0), &readings);
        assert_eq!(p.split, Split::Metered);
        assert_eq!(
            (p.energy_kwh_peak, p.energy_kwh_offpeak),
            (Some(2.0), Some(2.0))
        );
        assert_eq!(p.energy_cost, 1.0);
        assert_eq!(p.total_cost, 1.0);
    }

    #[test]
    fn split_follows_uneven_power_and_wraps_midnight() {
        // 05:00–07:00: 3 kWh in the first hour (night, to 06:00), 1 kWh after.
        let a = 5 * H;
        let r = [
            (a, 0.0),
            (a + 30 * M, 1500.0),
            (a + H, 3000.0),
            (a + 90 * M, 3500.0),
            (a + 2 * H, 4000.0),
        ];
        let p = price(&night(), a, a + 2 * H, Some(4.0), &r);
        assert_eq!(
            (p.energy_kwh_peak, p.energy_kwh_offpeak),
            (Some(1.0), Some(3.0))
        );
        assert_eq!(p.split, Split::Metered);
        // 0.3 × 1 + 0.2 × 3 = 0.9
        assert_eq!(p.energy_cost, 0.9);
    }

    #[test]
    fn only_start_and_stop_readings_estimate_by_time() {
        // 21:00–23:00 with readings only at the ends: 2 h gap around 22:00.
        let p = price(
            &night(),
            21 * H,
            23 * H,
            Some(4.0),
            &[(21 * H, 0.0), (23 * H, 4000.0)],
        );
        assert_eq!(p.split, Split::Estimated);
        assert_eq!(
            (p.energy_kwh_peak, p.energy_kwh_offpeak),
            (Some(2.0), Some(2.0))
        );
        // No readings at all: in proportion to time, estimated too.
        let p = price(&night(), 21 * H, 23 * H, Some(4.0), &[]);
        assert_eq!(
            (p.split, p.energy_kwh_offpeak),
            (Split::Estimated, Some(2.0))
        );
        // Within one rate nothing needs splitting: metered.
        let p = price(&night(), 10 * H, 11 * H, Some(4.0), &[]);
        assert_eq!((p.split, p.energy_kwh_peak), (Split::Metered, Some(4.0)));
    }

    #[test]
    fn per_minute_fee_and_flagged_energy() {
        let mut t = night();
        t.per_minute_fee = 0.05;
        // 45 min × 0.05 = 2.25; 3 kWh × 0.30 = 0.90.
        let p = price(&t, 10 * H, 10 * H + 45 * M, Some(3.0), &[]);
        assert_eq!(
            (p.time_cost, p.energy_cost, p.total_cost),
            (2.25, 0.9, 3.15)
        );
        let p = price(&t, 10 * H, 10 * H + 45 * M, None, &[]);
        assert_eq!((p.energy_cost, p.total_cost), (0.0, 2.25));
        assert_eq!((p.split, p.energy_kwh_peak), (Split::Unavailable, None));
    }
}
