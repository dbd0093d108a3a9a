//! `csms simulate`: writes a realistic bronze history straight into
//! `bronze.ocpp_messages`, for demos and benchmarks of the pipeline.
//!
//! Rows look as if ingest wrote them: both directions of every exchange (the
//! charger's CALL and the CSMS's CALLRESULT, with the CALL's action), real
//! OCPP-J frame text with the payload serialized by serde_json, a running
//! `wal_seq` under `node_id`, and each commit carrying the application
//! transaction `csms-bronze-{node_id}` = the highest seq it holds, so a
//! later `csms serve` with the same node id continues above it.
//!
//! # What is simulated
//! A mix of OCPP 1.6 and 2.0.1 stations (`ratio_201`), each with one or two
//! connectors. Per station and day: sometimes a BootNotification shortly
//! after midnight (always on the first day) followed by StatusNotification
//! Available per connector; Heartbeats every `heartbeat_secs`; charging
//! sessions (1.6 StartTransaction with a CSMS-assigned integer id unique
//! across the simulated node, MeterValues, StopTransaction; 2.0.1
//! TransactionEvent Started/Updated/Ended with `Energy.Active.Import.Register`
//! samples) with meter samples every `meter_interval_secs`, possibly across
//! midnight; and faults (StatusNotification Faulted, then Available). A few
//! percent of stations are flaky and have days with five to eight faults, so
//! `gold.fault_ranking` is not trivial. A fraction of timestamped CALLs (and
//! their answers) arrive late, one to three days after their payload
//! timestamp, and a fraction are retransmitted with the same message id.
//!
//! # Deterministic and parallel
//! Every (station, day) draws from its own random stream derived from
//! `seed`, and the only state carried between days is per station (meter
//! registers, busy connectors, counters), so the output depends on the seed
//! and options alone, not on how stations are split between threads.
//! Stations are generated in chunks on blocking threads, one per core.
//!
//! # Commits
//! Bronze is partitioned by the day a message was *received*; rows are
//! committed day by day, in received order, at most `max_rows_per_commit`
//! per commit (which bounds memory; a day of many stations is split into
//! waves of stations). Rows received on a later day (late messages, sessions
//! running past midnight) wait for that day's commit; those received after
//! the last simulated day get a final commit.
//!
//! Running it twice into one lake appends a second history whose 1.6
//! transaction ids repeat the first's; use one simulation per lake.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use deltalake::arrow::array::{
    ArrayRef, Date32Array, Int8Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use schemas::OcppVersion;
use schemas::tables::{BRONZE_OCPP_MESSAGES, bronze_schema};
use serde_json::{Value, json};

use crate::PipelineError;
use crate::lake;

const SECOND: i64 = 1_000_000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimulateOptions {
    pub stations: usize,
    pub days: u32,
    /// First simulated day (UTC).
    pub start: NaiveDate,
    pub seed: u64,
    /// Share of stations speaking OCPP 2.0.1 (the rest speak 1.6).
    pub ratio_201: f64,
    /// Share of timestamped CALLs received one to three days late.
    pub late_fraction: f64,
    /// Share of CALLs retransmitted with the same message id.
    pub duplicate_fraction: f64,
    /// The node the rows are attributed to (`node_id`, app transaction).
    pub node_id: String,
    /// Heartbeat interval. Real chargers often beat every few minutes; an
    /// hour keeps 10,000 stations × 30 days at a size that is about sessions.
    pub heartbeat_secs: u32,
    /// Interval of meter samples during a session.
    pub meter_interval_secs: u32,
    /// Most rows per Delta commit (bounds memory: rows are held until
    /// committed).
    pub max_rows_per_commit: usize,
}

impl Default for SimulateOptions {
    fn default() -> Self {
        SimulateOptions {
            stations: 100,
            days: 7,
            start: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap_or_default(),
            seed: 1,
            ratio_201: 0.4,
            late_fraction: 0.002,
            duplicate_fraction: 0.002,
            node_id: "simulator".into(),
            heartbeat_secs: 3600,
            meter_interval_secs: 300,
            max_rows_per_commit: 500_000,
        }
    }
}

/// What a simulation wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulateSummary {
    /// Bronze rows (messages, both directions, duplicates included).
    pub rows: u64,
    /// Parquet files added to bronze.
    pub files: u64,
    pub seconds: f64,
}

/// SplitMix64: tiny, fast and good enough for synthetic data; seeded per
/// (station, day) so streams do not depend on thread scheduling.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, a: u64, b: u64) -> Rng {
        let mut r = Rng(seed
            ^ a.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ b.wrapping_add(1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in [lo, hi).
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + (self.next() % (hi - lo) as u64) as i64
    }

    /// Exponentially distributed with the given mean.
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

/// A simulated station's fixed traits.
struct Profile {
    id: Arc<str>,
    index: u64,
    version: OcppVersion,
    connectors: usize,
    /// Maximum charging power (W).
    power_w: f64,
    model: &'static str,
    /// A few stations fault in bursts.
    flaky: bool,
    heartbeat_offset: i64,
}

fn profile(seed: u64, index: usize, ratio_201: f64) -> Profile {
    let mut rng = Rng::new(seed, index as u64, u64::MAX);
    let version = if rng.chance(ratio_201) {
        OcppVersion::V201
    } else {
        OcppVersion::V16
    };
    let (power_w, model) = match rng.range(0, 10) {
        0..=3 => (11_000.0, "AC11"),
        4..=7 => (22_000.0, "AC22"),
        8 => (50_000.0, "DC50"),
        _ => (150_000.0, "DC150"),
    };
    Profile {
        id: format!("SIM{index:05}").into(),
        index: index as u64,
        version,
        connectors: if rng.chance(0.6) { 2 } else { 1 },
        power_w,
        model,
        flaky: rng.chance(0.05),
        heartbeat_offset: rng.range(0, 3600) * SECOND,
    }
}

/// What a station carries from one day to the next.
#[derive(Clone)]
struct StationState {
    /// Energy register per connector (Wh).
    meter_wh: Vec<f64>,
    /// End of the current session (or fault) per connector.
    busy_until: Vec<i64>,
    next_message: u64,
    sessions: u64,
}

impl StationState {
    fn new(p: &Profile, seed: u64) -> StationState {
        let mut rng = Rng::new(seed, p.index, u64::MAX - 1);
        StationState {
            meter_wh: (0..p.connectors)
                .map(|_| rng.range(100_000, 5_000_000) as f64)
                .collect(),
            busy_until: vec![i64::MIN; p.connectors],
            next_message: 1,
            sessions: 0,
        }
    }
}

/// One bronze row before it is committed. `raw` holds the frame; the
/// payload column is the slice `payload` of it.
struct Row {
    received_at: i64,
    station: Arc<str>,
    version: &'static str,
    to_charger: bool,
    message_type: i8,
    message_id: String,
    action: &'static str,
    raw: String,
    payload: (usize, usize),
}

fn ts(us: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An OCPP-J frame `[type, id, (action,) payload]` from its parts, with the
/// payload's position in the text.
fn frame(
    message_type: i8,
    id: &str,
    action: Option<&str>,
    payload: &Value,
) -> (String, (usize, usize)) {
    let json_str = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut raw = format!("[{message_type},{}", json_str(id));
    if let Some(a) = action {
        raw.push(',');
        raw.push_str(&json_str(a));
    }
    raw.push(',');
    let start = raw.len();
    raw.push_str(&payload.to_string());
    let end = raw.len();
    raw.push(']');
    (raw, (start, end))
}

/// What occupies a connector from one time to another.
#[derive(Clone, Copy)]
enum Slot {
    Session(i64, i64),
    Fault(i64, i64),
}

/// Generates one station's messages for one day into `out`.
struct DayGen<'a> {
    p: &'a Profile,
    st: &'a mut StationState,
    rng: Rng,
    opts: &'a SimulateOptions,
    stations: u64,
    out: &'a mut Vec<Row>,
}

impl DayGen<'_> {
    fn message_id(&mut self) -> String {
        let n = self.st.next_message;
        self.st.next_message += 1;
        match self.p.version {
            // 1.6 chargers commonly count; 2.x ones send UUIDs.
            OcppVersion::V16 => n.to_string(),
            _ => {
                let a = self.rng.next();
                format!(
                    "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                    (a >> 32) as u32,
                    (a >> 16) as u16,
                    a as u16 & 0xfff,
                    0x8000 | (n as u16 & 0x3fff),
                    n & 0xffff_ffff_ffff
                )
            }
        }
    }

    /// A CALL sent at `at` and the CSMS's answer, with lateness and
    /// retransmission drawn. `timestamped`: the payload carries its event
    /// time (only those can meaningfully arrive late).
    fn exchange(
        &mut self,
        at: i64,
        action: &'static str,
        payload: Value,
        response: &dyn Fn(i64) -> Value,
        timestamped: bool,
    ) {
        let id = self.message_id();
        let mut received = at + self.rng.range(20_000, 400_000);
        if timestamped && self.rng.chance(self.opts.late_fraction) {
            received += self.rng.range(1, 4) * DAY + self.rng.range(0, 3600) * SECOND;
        }
        let copies = if self.rng.chance(self.opts.duplicate_fraction) {
            2
        } else {
            1
        };
        let version = self.p.version.as_str();
        let (call_raw, call_payload) = frame(2, &id, Some(action), &payload);
        for copy in 0..copies {
            if copy > 0 {
                received += self.rng.range(5, 60) * SECOND;
            }
            let answered = received + self.rng.range(1_000, 30_000);
            let (res_raw, res_payload) = frame(3, &id, None, &response(answered));
            self.out.push(Row {
                received_at: received,
                station: self.p.id.clone(),
                version,
                to_charger: false,
                message_type: 2,
                message_id: id.clone(),
                action,
                raw: call_raw.clone(),
                payload: call_payload,
            });
            self.out.push(Row {
                received_at: answered,
                station: self.p.id.clone(),
                version,
                to_charger: true,
                message_type: 3,
                message_id: id.clone(),
                action,
                raw: res_raw,
                payload: res_payload,
            });
        }
    }

    fn status(&mut self, at: i64, connector: usize, status: &str, error: Option<&str>) {
        let payload = match self.p.version {
            OcppVersion::V16 => {
                let mut p = json!({
                    "connectorId": connector + 1,
                    "errorCode": error.unwrap_or("NoError"),
                    "status": status,
                    "timestamp": ts(at),
                });
                if error.is_some() {
                    p["vendorErrorCode"] = json!(format!("E{}", self.rng.range(100, 999)));
                }
                p
            }
            _ => {
                // 2.0.1 connector statuses: the 1.6 session states are Occupied.
                let s = match status {
                    "Preparing" | "Charging" | "Finishing" | "SuspendedEV" => "Occupied",
                    s => s,
                };
                json!({
                    "timestamp": ts(at),
                    "connectorStatus": s,
                    "evseId": connector + 1,
                    "connectorId": 1,
                })
            }
        };
        self.exchange(at, "StatusNotification", payload, &|_| json!({}), true);
    }

    fn boot(&mut self, at: i64) {
        let interval = self.opts.heartbeat_secs;
        let payload = match self.p.version {
            OcppVersion::V16 => json!({
                "chargePointVendor": "SimVendor",
                "chargePointModel": self.p.model,
                "chargePointSerialNumber": &*self.p.id,
                "firmwareVersion": "1.4.2",
            }),
            _ => json!({
                "chargingStation": {
                    "model": self.p.model,
                    "vendorName": "SimVendor",
                    "serialNumber": &*self.p.id,
                    "firmwareVersion": "2.3.0",
                },
                "reason": "PowerUp",
            }),
        };
        let v16 = self.p.version == OcppVersion::V16;
        self.exchange(
            at,
            "BootNotification",
            payload,
            &|t| {
                if v16 {
                    json!({"status": "Accepted", "currentTime": ts(t), "interval": interval})
                } else {
                    json!({"currentTime": ts(t), "interval": interval, "status": "Accepted"})
                }
            },
            false,
        );
        for c in 0..self.p.connectors {
            self.status(at + SECOND + c as i64 * 100_000, c, "Available", None);
        }
    }

    fn heartbeat(&mut self, at: i64) {
        self.exchange(
            at,
            "Heartbeat",
            json!({}),
            &|t| json!({"currentTime": ts(t)}),
            false,
        );
    }

    fn fault(&mut self, at: i64, until: i64, connector: usize) {
        const CODES: [&str; 5] = [
            "GroundFailure",
            "OverCurrentFailure",
            "PowerMeterFailure",
            "ConnectorLockFailure",
            "OtherError",
        ];
        let code = CODES[self.rng.range(0, CODES.len() as i64) as usize];
        self.status(at, connector, "Faulted", Some(code));
        self.status(until, connector, "Available", None);
    }

    /// Energy register samples of a session from `t1` to `end`.
    fn sample(value_wh: f64, power_w: f64, at: i64, context: &str, v16: bool) -> Value {
        if v16 {
            json!({"timestamp": ts(at), "sampledValue": [
                {"value": format!("{}", value_wh.round() as i64), "context": context,
                 "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
                {"value": format!("{}", power_w.round() as i64), "context": context,
                 "measurand": "Power.Active.Import", "unit": "W"},
            ]})
        } else {
            json!({"timestamp": ts(at), "sampledValue": [
                {"value": value_wh.round(), "context": context,
                 "measurand": "Energy.Active.Import.Register", "unitOfMeasure": {"unit": "Wh"}},
                {"value": power_w.round(), "context": context,
                 "measurand": "Power.Active.Import", "unitOfMeasure": {"unit": "W"}},
            ]})
        }
    }

    fn session(&mut self, start: i64, end: i64, connector: usize) {
        let v16 = self.p.version == OcppVersion::V16;
        let n = self.st.sessions;
        self.st.sessions += 1;
        let id_tag = format!("TAG{:05}", self.rng.range(0, 5000));
        let power = self.p.power_w * (0.5 + 0.5 * self.rng.unit());
        let meter_start = self.st.meter_wh[connector];
        let t1 = start + self.rng.range(20, 60) * SECOND;
        let energy_at = |t: i64| meter_start + power * ((t - t1) as f64 / HOUR as f64);
        let interval = self.opts.meter_interval_secs.max(1) as i64 * SECOND;
        let meter_stop = energy_at(end);
        let stop_reason = if self.rng.chance(0.7) {
            "EVDisconnected"
        } else {
            "Local"
        };
        if v16 {
            // Unique across the node: station index + stations × session number.
            let tx = 1 + self.p.index + self.stations * n;
            self.status(start, connector, "Preparing", None);
            self.exchange(
                t1,
                "StartTransaction",
                json!({"connectorId": connector + 1, "idTag": id_tag,
                       "meterStart": meter_start.round() as i64, "timestamp": ts(t1)}),
                &|_| json!({"idTagInfo": {"status": "Accepted"}, "transactionId": tx}),
                true,
            );
            self.status(t1 + 2 * SECOND, connector, "Charging", None);
            let mut t = t1 + interval;
            while t < end {
                self.exchange(
                    t,
                    "MeterValues",
                    json!({"connectorId": connector + 1, "transactionId": tx,
                           "meterValue": [Self::sample(energy_at(t), power, t, "Sample.Periodic", true)]}),
                    &|_| json!({}),
                    true,
                );
                t += interval;
            }
            self.exchange(
                end,
                "StopTransaction",
                json!({"transactionId": tx, "idTag": id_tag, "meterStop": meter_stop.round() as i64,
                       "timestamp": ts(end), "reason": stop_reason}),
                &|_| json!({"idTagInfo": {"status": "Accepted"}}),
                true,
            );
            self.status(end + 2 * SECOND, connector, "Finishing", None);
        } else {
            let tx = format!("{}-{n:06}", self.p.id);
            let evse = json!({"id": connector + 1, "connectorId": 1});
            let token = json!({"idToken": id_tag, "type": "ISO14443"});
            self.status(start, connector, "Occupied", None);
            self.exchange(
                t1,
                "TransactionEvent",
                json!({"eventType": "Started", "timestamp": ts(t1), "triggerReason": "Authorized",
                       "seqNo": 0, "transactionInfo": {"transactionId": tx, "chargingState": "Charging"},
                       "idToken": token, "evse": evse,
                       "meterValue": [Self::sample(meter_start, 0.0, t1, "Transaction.Begin", false)]}),
                &|_| json!({"idTokenInfo": {"status": "Accepted"}}),
                true,
            );
            let mut seq = 1;
            let mut t = t1 + interval;
            while t < end {
                self.exchange(
                    t,
                    "TransactionEvent",
                    json!({"eventType": "Updated", "timestamp": ts(t),
                           "triggerReason": "MeterValuePeriodic", "seqNo": seq,
                           "transactionInfo": {"transactionId": tx, "chargingState": "Charging"},
                           "meterValue": [Self::sample(energy_at(t), power, t, "Sample.Periodic", false)]}),
                    &|_| json!({}),
                    true,
                );
                seq += 1;
                t += interval;
            }
            let (trigger, reason) = if stop_reason == "Local" {
                ("StopAuthorized", "Local")
            } else {
                ("EVCommunicationLost", "EVDisconnected")
            };
            self.exchange(
                end,
                "TransactionEvent",
                json!({"eventType": "Ended", "timestamp": ts(end), "triggerReason": trigger,
                       "seqNo": seq,
                       "transactionInfo": {"transactionId": tx, "chargingState": "Idle", "stoppedReason": reason},
                       "idToken": token, "evse": evse,
                       "meterValue": [Self::sample(meter_stop, 0.0, end, "Transaction.End", false)]}),
                &|_| json!({}),
                true,
            );
        }
        let available = end + self.rng.range(30, 120) * SECOND;
        self.status(available, connector, "Available", None);
        self.st.meter_wh[connector] = meter_stop;
    }

    fn run(mut self, day_start: i64, first_day: bool) {
        let day_end = day_start + DAY;
        let connectors = self.p.connectors;
        // Boot, only when no session runs on from yesterday.
        let boot_at = day_start + self.rng.range(1, 300) * SECOND;
        let booted =
            (first_day || self.rng.chance(0.05)) && self.st.busy_until.iter().all(|b| *b < boot_at);
        if booted {
            self.boot(boot_at);
            for b in &mut self.st.busy_until {
                *b = (*b).max(boot_at + 2 * SECOND);
            }
        }
        let hb = self.opts.heartbeat_secs.max(1) as i64 * SECOND;
        let mut t = day_start + self.p.heartbeat_offset % hb;
        while t < day_end {
            self.heartbeat(t);
            t += hb;
        }
        // Faults first (idle windows), then sessions around them. `carried`:
        // when each connector is free of yesterday's session (or the boot).
        let carried = self.st.busy_until.clone();
        let faults = if self.p.flaky && self.rng.chance(0.3) {
            self.rng.range(5, 9)
        } else if self.rng.chance(0.04) {
            self.rng.range(1, 4)
        } else {
            0
        };
        let mut windows: Vec<Vec<(i64, i64)>> = vec![Vec::new(); connectors];
        // A burst hits one connector (counted per station all the same).
        let burst_connector = self.rng.range(0, connectors as i64) as usize;
        let mut at = day_start + self.rng.range(0, 6 * 3600) * SECOND;
        for _ in 0..faults {
            let c = if faults >= 5 {
                burst_connector
            } else {
                self.rng.range(0, connectors as i64) as usize
            };
            let previous = windows[c].last().map(|w| w.1).unwrap_or(i64::MIN);
            let start = at.max(carried[c] + MINUTE).max(previous + MINUTE);
            let until = start + self.rng.range(2 * 60, 20 * 60) * SECOND;
            if until >= day_end {
                break;
            }
            windows[c].push((start, until));
            at = until + self.rng.range(5 * 60, 45 * 60) * SECOND;
        }
        let mut events: Vec<(i64, usize, Slot)> = Vec::new();
        for c in 0..connectors {
            let mut t = carried[c].max(day_start);
            loop {
                let start = t + (self.rng.exp(6.0 * 3600.0) as i64) * SECOND;
                if start >= day_end {
                    break;
                }
                let minutes = (10.0 + self.rng.exp(70.0)).min(12.0 * 60.0);
                let end = start + (minutes * 60.0) as i64 * SECOND;
                // Clashes with a fault window: resume after it.
                if let Some(w) = windows[c]
                    .iter()
                    .find(|w| w.0 < end + 3 * MINUTE && w.1 + MINUTE > start)
                {
                    t = w.1 + MINUTE;
                    continue;
                }
                events.push((start, c, Slot::Session(start, end)));
                t = end + 3 * MINUTE;
            }
            for w in &windows[c] {
                events.push((w.0, c, Slot::Fault(w.0, w.1)));
            }
            let last_window = windows[c].last().map(|w| w.1).unwrap_or(i64::MIN);
            self.st.busy_until[c] = t.max(last_window);
        }
        events.sort_by_key(|e| (e.0, e.1));
        for (_, c, slot) in events {
            match slot {
                Slot::Session(start, end) => self.session(start, end, c),
                Slot::Fault(start, until) => self.fault(start, until, c),
            }
        }
    }
}

/// Generates `day` for a slice of stations.
fn generate(
    profiles: &[Profile],
    states: &mut [StationState],
    day: u32,
    day_start: i64,
    opts: &SimulateOptions,
    stations: u64,
) -> Vec<Row> {
    let mut out = Vec::new();
    for (p, st) in profiles.iter().zip(states.iter_mut()) {
        DayGen {
            p,
            st,
            rng: Rng::new(opts.seed, p.index, day as u64),
            opts,
            stations,
            out: &mut out,
        }
        .run(day_start, day == 0);
    }
    out
}

/// Builds the bronze batch of `rows` (sorted by received time), numbering
/// them from `first_seq`.
fn batch(rows: &[Row], node_id: &str, first_seq: u64) -> Result<RecordBatch, PipelineError> {
    let received: Vec<i64> = rows.iter().map(|r| r.received_at).collect();
    let date: Vec<i32> = received.iter().map(|r| r.div_euclid(DAY) as i32).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampMicrosecondArray::from(received).with_timezone("UTC")),
        Arc::new(Date32Array::from(date)),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|_| node_id))),
        Arc::new(Int64Array::from_iter_values(
            (0..rows.len() as u64).map(|i| (first_seq + i) as i64),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| &*r.station),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.version),
        )),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| {
            if r.to_charger {
                "csms_to_cs"
            } else {
                "cs_to_csms"
            }
        }))),
        Arc::new(Int8Array::from_iter_values(
            rows.iter().map(|r| r.message_type),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.message_id.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.action))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| &r.raw[r.payload.0..r.payload.1]),
        )),
        Arc::new(StringArray::new_null(rows.len())),
        Arc::new(StringArray::new_null(rows.len())),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.raw.as_str()),
        )),
    ];
    RecordBatch::try_new(bronze_schema(), columns).map_err(|e| PipelineError::Arrow(e.to_string()))
}

/// Appends rows to bronze, numbered after the node's committed seq.
struct Writer {
    table: deltalake::DeltaTable,
    location: String,
    app_id: String,
    node_id: String,
    seq: u64,
    rows: u64,
    files_before: u64,
}

impl Writer {
    async fn commit(&mut self, mut rows: Vec<Row>) -> Result<(), PipelineError> {
        if rows.is_empty() {
            return Ok(());
        }
        let node_id = self.node_id.clone();
        let first = self.seq + 1;
        let n = rows.len() as u64;
        let batch = tokio::task::spawn_blocking(move || {
            rows.sort_by(|a, b| {
                (a.received_at, &a.station, a.message_type).cmp(&(
                    b.received_at,
                    &b.station,
                    b.message_type,
                ))
            });
            batch(&rows, &node_id, first)
        })
        .await
        .map_err(|e| PipelineError::Arrow(format!("building a bronze batch: {e}")))??;
        let last = first + n - 1;
        self.table = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_partition_columns(["date"])
            .with_commit_properties(
                CommitProperties::default()
                    .with_application_transaction(Transaction::new(&self.app_id, last as i64)),
            )
            .await
            .map_err(lake::delta_err(&self.location))?;
        self.seq = last;
        self.rows += n;
        Ok(())
    }

    fn files(&self) -> Result<u64, PipelineError> {
        Ok(self
            .table
            .snapshot()
            .map_err(lake::delta_err(&self.location))?
            .log_data()
            .num_files() as u64)
    }
}

/// Rough rows per station and day for the options (for progress estimates
/// and wave sizes; the simulation itself decides the real count).
fn estimate_per_station_day(opts: &SimulateOptions) -> f64 {
    let heartbeats = 2.0 * 86_400.0 / opts.heartbeat_secs.max(1) as f64;
    // ~1.6 connectors × ~3.4 sessions a day, ~85 minutes each.
    let sessions = 1.6 * 3.4;
    let samples = 85.0 * 60.0 / opts.meter_interval_secs.max(1) as f64;
    let per_session = 2.0 * (samples + 6.0);
    heartbeats + sessions * per_session + 2.0
}

/// Writes a simulated bronze history (see the module docs) into the lake at
/// `lake_url`, creating bronze if needed. `progress` gets (rows written so
/// far, estimated total) after each commit.
pub async fn simulate(
    lake_url: &str,
    storage_options: &HashMap<String, String>,
    opts: &SimulateOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<SimulateSummary, PipelineError> {
    let started = Instant::now();
    let mut opts = opts.clone();
    opts.ratio_201 = opts.ratio_201.clamp(0.0, 1.0);
    opts.late_fraction = opts.late_fraction.clamp(0.0, 1.0);
    opts.duplicate_fraction = opts.duplicate_fraction.clamp(0.0, 1.0);
    let opts = Arc::new(opts);
    let location = lake::table_location(lake_url, BRONZE_OCPP_MESSAGES)?;
    let table = lake::open_or_create(
        &location,
        storage_options,
        &bronze_schema(),
        "date",
        "bronze.ocpp_messages: every OCPP frame, both directions, as received or sent",
    )
    .await?;
    let app_id = format!("csms-bronze-{}", opts.node_id);
    let seq = lake::app_version(&table, &location, &app_id)
        .await?
        .unwrap_or(0)
        .max(0) as u64;
    let mut writer = Writer {
        table,
        location,
        app_id,
        node_id: opts.node_id.clone(),
        seq,
        rows: 0,
        files_before: 0,
    };
    writer.files_before = writer.files()?;
    let n = opts.stations;
    if n == 0 || opts.days == 0 {
        return Ok(SimulateSummary {
            rows: 0,
            files: 0,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let profiles: Arc<Vec<Profile>> = Arc::new(
        (0..n)
            .map(|i| profile(opts.seed, i, opts.ratio_201))
            .collect(),
    );
    let mut states: Vec<StationState> = profiles
        .iter()
        .map(|p| StationState::new(p, opts.seed))
        .collect();
    let per_station_day = estimate_per_station_day(&opts);
    let mut estimate = (per_station_day * n as f64 * opts.days as f64) as u64;
    let wave = ((opts.max_rows_per_commit.max(1) as f64 / per_station_day) as usize).clamp(1, n);
    let workers = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(2)
        .max(1);
    let start_us = opts
        .start
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc()
        .timestamp_micros();
    // Rows received on a later day than the one being committed.
    let mut pending: Vec<Row> = Vec::new();
    progress(0, estimate);
    for day in 0..opts.days {
        let day_start = start_us + day as i64 * DAY;
        let day_end = day_start + DAY;
        let mut first = 0;
        while first < n {
            let last = (first + wave).min(n);
            // Split the wave between workers; each owns its stations' state.
            let per = (last - first).div_ceil(workers);
            let mut tasks = Vec::new();
            let mut lo = first;
            while lo < last {
                let hi = (lo + per).min(last);
                let chunk: Vec<StationState> = states[lo..hi].to_vec();
                let profiles = profiles.clone();
                let opts = opts.clone();
                tasks.push(tokio::task::spawn_blocking(move || {
                    let mut chunk = chunk;
                    let rows = generate(
                        &profiles[lo..hi],
                        &mut chunk,
                        day,
                        day_start,
                        &opts,
                        n as u64,
                    );
                    (lo, chunk, rows)
                }));
                lo = hi;
            }
            let mut now: Vec<Row> = Vec::new();
            for t in tasks {
                let (lo, chunk, rows) = t
                    .await
                    .map_err(|e| PipelineError::Arrow(format!("simulating stations: {e}")))?;
                let hi = lo + chunk.len();
                states[lo..hi].clone_from_slice(&chunk);
                for r in rows {
                    if r.received_at < day_end {
                        now.push(r);
                    } else {
                        pending.push(r);
                    }
                }
            }
            if last == n {
                let (due, later): (Vec<Row>, Vec<Row>) =
                    pending.into_iter().partition(|r| r.received_at < day_end);
                pending = later;
                now.extend(due);
            }
            writer.commit(now).await?;
            // Refine the estimate from what the days so far produced.
            let done = day as f64 * n as f64 + last as f64;
            estimate =
                estimate.max((writer.rows as f64 * (n as f64 * opts.days as f64) / done) as u64);
            progress(writer.rows, estimate);
            first = last;
        }
    }
    // Received after the simulated period: late messages, sessions past the end.
    pending.sort_by_key(|r| r.received_at);
    while !pending.is_empty() {
        let rest = pending.split_off(pending.len().min(opts.max_rows_per_commit.max(1)));
        writer.commit(pending).await?;
        pending = rest;
    }
    progress(writer.rows, writer.rows);
    let files = writer.files()?.saturating_sub(writer.files_before);
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        rows = writer.rows,
        files,
        seconds,
        stations = n,
        days = opts.days,
        "simulated bronze history"
    );
    metrics::counter!("csms_simulate_rows_total").increment(writer.rows);
    Ok(SimulateSummary {
        rows: writer.rows,
        files,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden_tests::rows;
    use crate::{PipelineConfig, RunOptions, run};
    use schemas::Catalog;
    use schemas::tables::{GOLD_FAULT_RANKING, SILVER_TRANSACTIONS};

    fn small(stations: usize, days: u32) -> SimulateOptions {
        SimulateOptions {
            stations,
            days,
            start: NaiveDate::from_ymd_opt(2026, 3, 1).unwrap(),
            seed: 7,
            // Enough late and duplicate messages to appear in a small run.
            late_fraction: 0.01,
            duplicate_fraction: 0.01,
            ..SimulateOptions::default()
        }
    }

    /// Every generated frame is OCPP-J its version decodes, its payload is
    /// the frame's payload text, and the payload is valid against the OCA
    /// schema of its action (request or response).
    #[test]
    fn frames_are_schema_valid_ocpp_j() {
        let opts = small(40, 3);
        let profiles: Vec<Profile> = (0..opts.stations)
            .map(|i| profile(opts.seed, i, opts.ratio_201))
            .collect();
        let mut states: Vec<StationState> = profiles
            .iter()
            .map(|p| StationState::new(p, opts.seed))
            .collect();
        let start = micros_of(opts.start);
        let mut all = Vec::new();
        for day in 0..opts.days {
            all.extend(generate(
                &profiles,
                &mut states,
                day,
                start + day as i64 * DAY,
                &opts,
                opts.stations as u64,
            ));
        }
        let catalog = Catalog::global();
        let mut actions = std::collections::BTreeSet::new();
        let (mut late, mut faults) = (0, 0);
        for r in &all {
            let version = OcppVersion::parse(r.version).unwrap();
            let frame = schemas::frame::decode(&r.raw, version)
                .unwrap_or_else(|e| panic!("{}: {e:?}", r.raw));
            assert_eq!(frame.message_id(), r.message_id);
            let payload: Value = serde_json::from_str(&r.raw[r.payload.0..r.payload.1]).unwrap();
            let checked = if r.message_type == 2 {
                catalog.validate_request(version, r.action, &payload)
            } else {
                catalog.validate_response(version, r.action, &payload)
            };
            checked.unwrap_or_else(|e| panic!("{} {}: {e}", r.version, r.raw));
            actions.insert((r.version, r.action));
            if let Some(t) = payload.get("timestamp").and_then(|t| t.as_str()) {
                let t = schemas::parse_timestamp(t).unwrap().timestamp_micros();
                if r.received_at - t > DAY {
                    late += 1;
                }
            }
            if payload.get("status").and_then(|s| s.as_str()) == Some("Faulted")
                || payload.get("connectorStatus").and_then(|s| s.as_str()) == Some("Faulted")
            {
                faults += 1;
            }
        }
        for expected in [
            ("1.6", "BootNotification"),
            ("1.6", "Heartbeat"),
            ("1.6", "StatusNotification"),
            ("1.6", "StartTransaction"),
            ("1.6", "MeterValues"),
            ("1.6", "StopTransaction"),
            ("2.0.1", "BootNotification"),
            ("2.0.1", "Heartbeat"),
            ("2.0.1", "StatusNotification"),
            ("2.0.1", "TransactionEvent"),
        ] {
            assert!(
                actions.contains(&expected),
                "no {expected:?} in {actions:?}"
            );
        }
        assert!(late > 0, "some messages arrive late");
        assert!(faults > 0, "some stations fault");
        // Retransmissions: the same CALL (id and text) twice.
        let mut seen = std::collections::HashSet::new();
        let dups = all
            .iter()
            .filter(|r| r.message_type == 2)
            .filter(|r| !seen.insert((r.station.clone(), r.message_id.clone())))
            .count();
        assert!(dups > 0, "some messages are retransmitted");
    }

    fn micros_of(d: NaiveDate) -> i64 {
        d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_micros()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn simulated_history_feeds_the_pipeline_deterministically() {
        let tmp = tempfile::tempdir().unwrap();
        let lake_a = tmp.path().join("a");
        let lake_a = lake_a.to_str().unwrap();
        let opts = small(20, 2);
        let seen = std::sync::Mutex::new(Vec::new());
        let a = simulate(lake_a, &HashMap::new(), &opts, &|rows, total| {
            seen.lock().unwrap().push((rows, total))
        })
        .await
        .unwrap();
        assert!(a.rows > 2_000, "{a:?}");
        assert!(a.files >= 2, "{a:?}");
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.last(), Some(&(a.rows, a.rows)));

        // Same seed, same history (row count and content hash); another
        // commit size splits it differently but writes the same rows.
        let lake_b = tmp.path().join("b");
        let lake_b = lake_b.to_str().unwrap();
        let b_opts = SimulateOptions {
            max_rows_per_commit: 1_000,
            ..opts.clone()
        };
        let b = simulate(lake_b, &HashMap::new(), &b_opts, &|_, _| {})
            .await
            .unwrap();
        assert_eq!(a.rows, b.rows);
        let digest = "SELECT COUNT(*), COUNT(DISTINCT station_id || message_id || direction || raw), \
                      SUM(CAST(received_at AS BIGINT) % 1000003), MAX(wal_seq) FROM t";
        assert_eq!(
            rows(lake_a, BRONZE_OCPP_MESSAGES, digest).await,
            rows(lake_b, BRONZE_OCPP_MESSAGES, digest).await
        );
        assert_eq!(
            rows(
                lake_a,
                BRONZE_OCPP_MESSAGES,
                "SELECT MAX(wal_seq), COUNT(DISTINCT wal_seq) FROM t"
            )
            .await,
            vec![format!("{0}|{0}", a.rows)]
        );
        let c = simulate(
            tmp.path().join("c").to_str().unwrap(),
            &HashMap::new(),
            &SimulateOptions {
                seed: 8,
                ..opts.clone()
            },
            &|_, _| {},
        )
        .await
        .unwrap();
        assert_ne!(a.rows, c.rows, "another seed, another history");

        // The pipeline finds faults to rank and whole transactions.
        run(
            lake_a,
            &PipelineConfig::default(),
            &RunOptions::default(),
            &|_| {},
        )
        .await
        .unwrap();
        let complete = rows(
            lake_a,
            SILVER_TRANSACTIONS,
            "SELECT ocpp_version, COUNT(*) FROM t \
             WHERE is_complete AND energy_wh > 0 AND energy_flag IS NULL \
             GROUP BY ocpp_version ORDER BY ocpp_version",
        )
        .await;
        assert_eq!(complete.len(), 2, "both versions: {complete:?}");
        let flagged = rows(
            lake_a,
            SILVER_TRANSACTIONS,
            "SELECT COUNT(*) FROM t WHERE energy_flag IS NOT NULL AND is_complete",
        )
        .await;
        assert_eq!(flagged, vec!["0"], "simulated energy is plausible");
        let ranking = rows(lake_a, GOLD_FAULT_RANKING, "SELECT station_id FROM t").await;
        assert!(!ranking.is_empty(), "some station faulted 5 times a day");
    }
}
