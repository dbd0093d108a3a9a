//! What a simulated station sends and when: heartbeats every H seconds,
//! connector status changes, and charging sessions separated by idle gaps,
//! with meter values every M seconds while charging. The schedule is a
//! timeline of offsets from the moment the station was Accepted; the
//! sustained and saturation modes send the same steps in the same order but
//! paced by the requested rate instead of these offsets.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rand::{Rng, SeedableRng, rngs::StdRng};
use schemas::OcppVersion;
use serde_json::{Value, json};

/// Timing of a station's life.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleParams {
    pub heartbeat: Duration,
    pub meter: Duration,
    /// Mean session length (each is uniform in [0.5, 1.5] of it).
    pub session: Duration,
    /// Mean idle gap between sessions (same spread).
    pub gap: Duration,
}

/// Connector states the stations report (1.6 and 2.0.1 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnStatus {
    Available,
    Preparing,
    Charging,
    Finishing,
    Occupied,
}

impl ConnStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnStatus::Available => "Available",
            ConnStatus::Preparing => "Preparing",
            ConnStatus::Charging => "Charging",
            ConnStatus::Finishing => "Finishing",
            ConnStatus::Occupied => "Occupied",
        }
    }
}

/// One CALL a station makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Heartbeat,
    Status(ConnStatus),
    /// 1.6 StartTransaction, 2.0.1 TransactionEvent Started.
    Start,
    /// 1.6 MeterValues, 2.0.1 TransactionEvent Updated.
    Meter,
    /// 1.6 StopTransaction, 2.0.1 TransactionEvent Ended.
    Stop,
}

/// An endless, seeded timeline of steps for one station.
pub struct Schedule {
    params: ScheduleParams,
    v201: bool,
    rng: StdRng,
    next_heartbeat: Duration,
    /// Steps of the current session (and the initial status), in time order.
    queue: VecDeque<(Duration, Step)>,
    /// When the last generated session ended.
    cursor: Duration,
}

impl Schedule {
    pub fn new(params: ScheduleParams, version: OcppVersion, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // A random phase so stations booted together do not heartbeat together.
        let hb = params.heartbeat.max(Duration::from_millis(1));
        let next_heartbeat = Duration::from_secs_f64(rng.random_range(0.0..hb.as_secs_f64()));
        let mut queue = VecDeque::new();
        queue.push_back((Duration::ZERO, Step::Status(ConnStatus::Available)));
        Schedule {
            params: ScheduleParams {
                heartbeat: hb,
                meter: params.meter.max(Duration::from_millis(1)),
                ..params
            },
            v201: version.is_2x(),
            rng,
            next_heartbeat,
            queue,
            cursor: Duration::ZERO,
        }
    }

    /// A station that has been up for a while rather than one that just
    /// booted: its first connector status comes at a random moment within one
    /// heartbeat interval instead of at once. Without this, a run whose
    /// stations all start their timelines together opens with one
    /// StatusNotification from every station in the same instant, a burst no
    /// fleet in its steady state produces (after a power cut, the reconnect
    /// storm is that burst, and it keeps the immediate status).
    pub fn in_steady_state(mut self) -> Self {
        let phase = Duration::from_secs_f64(
            self.rng
                .random_range(0.0..self.params.heartbeat.as_secs_f64()),
        );
        self.queue.clear();
        self.queue
            .push_back((phase, Step::Status(ConnStatus::Available)));
        self.cursor = phase;
        self
    }

    fn spread(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(self.rng.random_range(0.5..1.5))
    }

    /// Appends one idle gap and one session to the queue.
    fn plan_session(&mut self) {
        let second = Duration::from_secs(1);
        let start = self.cursor + self.spread(self.params.gap);
        let length = self.spread(self.params.session).max(self.params.meter);
        let mut t = start;
        let q = &mut self.queue;
        if self.v201 {
            q.push_back((t, Step::Status(ConnStatus::Occupied)));
            t += second;
            q.push_back((t, Step::Start));
        } else {
            q.push_back((t, Step::Status(ConnStatus::Preparing)));
            t += second;
            q.push_back((t, Step::Start));
            q.push_back((t, Step::Status(ConnStatus::Charging)));
        }
        let charge_start = t;
        let mut m = charge_start + self.params.meter;
        while m < charge_start + length {
            q.push_back((m, Step::Meter));
            m += self.params.meter;
        }
        t = charge_start + length;
        q.push_back((t, Step::Stop));
        if !self.v201 {
            q.push_back((t, Step::Status(ConnStatus::Finishing)));
        }
        t += second;
        q.push_back((t, Step::Status(ConnStatus::Available)));
        self.cursor = t;
    }

    /// The next step and its offset from the start of the schedule.
    pub fn next_step(&mut self) -> (Duration, Step) {
        if self.queue.is_empty() {
            self.plan_session();
        }
        let (at, step) = *self.queue.front().expect("a session was just planned");
        if self.next_heartbeat < at {
            let hb = self.next_heartbeat;
            self.next_heartbeat += self.params.heartbeat;
            return (hb, Step::Heartbeat);
        }
        self.queue.pop_front();
        (at, step)
    }
}

/// A station's transaction state, needed to fill in its CALLs.
#[derive(Debug, Default)]
pub struct TxState {
    /// Energy register in Wh; only grows.
    pub meter_wh: u64,
    /// 1.6: assigned by the CSMS in the StartTransaction answer.
    pub tx_id_16: Option<i64>,
    /// 2.0.1: chosen by the station.
    pub tx_id_201: Option<String>,
    pub seq_no: u64,
    pub id_tag: String,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The BootNotification payload of a version.
pub fn boot_payload(version: OcppVersion) -> Value {
    if version.is_2x() {
        json!({"reason": "PowerUp", "chargingStation": {"model": "LG-1", "vendorName": "LoadGen"}})
    } else {
        json!({"chargePointVendor": "LoadGen", "chargePointModel": "LG-1"})
    }
}

/// The action and payload for `step`, or `None` when the step does not apply
/// (meter values or stop without a running transaction). `meter_every`
/// converts the charging power into energy between samples.
pub fn call_for(
    step: Step,
    version: OcppVersion,
    tx: &mut TxState,
    meter_every: Duration,
) -> Option<(&'static str, Value)> {
    let ts = now();
    let v201 = version.is_2x();
    // An 11 kW charger.
    let added_wh = (11_000.0 * meter_every.as_secs_f64() / 3600.0).max(1.0) as u64;
    Some(match step {
        Step::Heartbeat => ("Heartbeat", json!({})),
        Step::Status(s) if v201 => (
            "StatusNotification",
            json!({"timestamp": ts, "connectorStatus": s.as_str(), "evseId": 1, "connectorId": 1}),
        ),
        Step::Status(s) => (
            "StatusNotification",
            json!({"connectorId": 1, "errorCode": "NoError", "status": s.as_str(), "timestamp": ts}),
        ),
        Step::Start if v201 => {
            let id = uuid::Uuid::new_v4().to_string();
            tx.tx_id_201 = Some(id.clone());
            tx.seq_no = 0;
            (
                "TransactionEvent",
                json!({
                    "eventType": "Started", "timestamp": ts, "triggerReason": "Authorized",
                    "seqNo": 0, "transactionInfo": {"transactionId": id, "chargingState": "Charging"},
                    "evse": {"id": 1, "connectorId": 1},
                    "idToken": {"idToken": tx.id_tag, "type": "ISO14443"},
                    "meterValue": [meter_201(&ts, tx.meter_wh)],
                }),
            )
        }
        Step::Start => {
            tx.tx_id_16 = None;
            (
                "StartTransaction",
                json!({"connectorId": 1, "idTag": tx.id_tag, "meterStart": tx.meter_wh, "timestamp": ts}),
            )
        }
        Step::Meter if v201 => {
            let id = tx.tx_id_201.clone()?;
            tx.meter_wh += added_wh;
            tx.seq_no += 1;
            (
                "TransactionEvent",
                json!({
                    "eventType": "Updated", "timestamp": ts, "triggerReason": "MeterValuePeriodic",
                    "seqNo": tx.seq_no, "transactionInfo": {"transactionId": id, "chargingState": "Charging"},
                    "meterValue": [meter_201(&ts, tx.meter_wh)],
                }),
            )
        }
        Step::Meter => {
            let id = tx.tx_id_16?;
            tx.meter_wh += added_wh;
            (
                "MeterValues",
                json!({"connectorId": 1, "transactionId": id, "meterValue": [{
                    "timestamp": ts,
                    "sampledValue": [{"value": tx.meter_wh.to_string(),
                        "measurand": "Energy.Active.Import.Register", "unit": "Wh"}],
                }]}),
            )
        }
        Step::Stop if v201 => {
            let id = tx.tx_id_201.take()?;
            tx.seq_no += 1;
            (
                "TransactionEvent",
                json!({
                    "eventType": "Ended", "timestamp": ts, "triggerReason": "StopAuthorized",
                    "seqNo": tx.seq_no,
                    "transactionInfo": {"transactionId": id, "chargingState": "Idle", "stoppedReason": "Local"},
                    "meterValue": [meter_201(&ts, tx.meter_wh)],
                }),
            )
        }
        Step::Stop => {
            let id = tx.tx_id_16.take()?;
            (
                "StopTransaction",
                json!({"transactionId": id, "idTag": tx.id_tag, "meterStop": tx.meter_wh,
                    "timestamp": ts, "reason": "Local"}),
            )
        }
    })
}

fn meter_201(ts: &str, wh: u64) -> Value {
    json!({"timestamp": ts, "sampledValue": [{"value": wh as f64,
        "measurand": "Energy.Active.Import.Register", "unitOfMeasure": {"unit": "Wh"}}]})
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::Catalog;

    fn params() -> ScheduleParams {
        ScheduleParams {
            heartbeat: Duration::from_secs(60),
            meter: Duration::from_secs(10),
            session: Duration::from_secs(120),
            gap: Duration::from_secs(300),
        }
    }

    #[test]
    fn timeline_is_ordered_and_realistic() {
        for version in [OcppVersion::V16, OcppVersion::V201] {
            let mut s = Schedule::new(params(), version, 42);
            let steps: Vec<(Duration, Step)> = (0..400).map(|_| s.next_step()).collect();
            assert_eq!(steps[0].1, Step::Status(ConnStatus::Available));
            assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "time order");
            let horizon = steps.last().unwrap().0.as_secs_f64();
            let count = |want: Step| steps.iter().filter(|(_, s)| *s == want).count() as f64;
            // Heartbeats every 60 s, whatever else happens.
            let hb = count(Step::Heartbeat);
            assert!(
                (hb - horizon / 60.0).abs() <= 1.5,
                "{hb} heartbeats in {horizon}s"
            );
            let (starts, stops) = (count(Step::Start), count(Step::Stop));
            assert!(starts >= 2.0 && (starts - stops).abs() <= 1.0);
            // Sessions of ~120 s with samples every 10 s: about 11 per session.
            let per = count(Step::Meter) / stops;
            assert!(
                (4.0..=18.0).contains(&per),
                "{per} meter values per session"
            );
            // Every stop follows its start with meter values in between only.
            let mut open = false;
            for (_, step) in &steps {
                match step {
                    Step::Start => {
                        assert!(!open);
                        open = true
                    }
                    Step::Stop => {
                        assert!(open);
                        open = false
                    }
                    Step::Meter => assert!(open),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn seeds_differ_in_phase() {
        let a = Schedule::new(params(), OcppVersion::V16, 1).next_step();
        let b = Schedule::new(params(), OcppVersion::V16, 2).next_step();
        let mut sa = Schedule::new(params(), OcppVersion::V16, 1);
        let mut sb = Schedule::new(params(), OcppVersion::V16, 2);
        let ha = (0..5)
            .map(|_| sa.next_step())
            .find(|s| s.1 == Step::Heartbeat);
        let hb = (0..5)
            .map(|_| sb.next_step())
            .find(|s| s.1 == Step::Heartbeat);
        assert_eq!(a, b, "both start with Available at 0");
        assert_ne!(ha, hb);
    }

    #[test]
    fn steady_state_spreads_the_first_status_over_a_heartbeat() {
        let firsts: Vec<Duration> = (0..200)
            .map(|seed| {
                let mut s = Schedule::new(params(), OcppVersion::V201, seed).in_steady_state();
                (0..10)
                    .map(|_| s.next_step())
                    .find(|(_, step)| *step == Step::Status(ConnStatus::Available))
                    .expect("a first status")
                    .0
            })
            .collect();
        assert!(firsts.iter().all(|t| *t < params().heartbeat));
        // Spread, not bunched: both halves of the interval are used, and
        // fewer than 5% of the stations share any one second.
        let early = firsts.iter().filter(|t| t.as_secs() < 30).count();
        assert!(
            (60..=140).contains(&early),
            "{early} of 200 in the first half"
        );
        let mut per_second = [0usize; 60];
        for t in &firsts {
            per_second[t.as_secs() as usize] += 1;
        }
        assert!(per_second.iter().all(|n| *n < 10), "{per_second:?}");
        // The rest of the timeline still follows in time order.
        let mut s = Schedule::new(params(), OcppVersion::V16, 7).in_steady_state();
        let steps: Vec<_> = (0..100).map(|_| s.next_step()).collect();
        assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn every_call_is_schema_valid() {
        let catalog = Catalog::global();
        for version in [OcppVersion::V16, OcppVersion::V201] {
            catalog
                .validate_request(version, "BootNotification", &boot_payload(version))
                .unwrap();
            let mut s = Schedule::new(params(), version, 9);
            let mut tx = TxState {
                id_tag: "LG000001".into(),
                ..TxState::default()
            };
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..200 {
                let (_, step) = s.next_step();
                let Some((action, payload)) = call_for(step, version, &mut tx, params().meter)
                else {
                    panic!("{step:?} must apply for {version}");
                };
                if step == Step::Start && !version.is_2x() {
                    // The CSMS would assign this in the StartTransaction answer.
                    tx.tx_id_16 = Some(77);
                }
                catalog
                    .validate_request(version, action, &payload)
                    .unwrap_or_else(|e| panic!("{version} {action} {payload}: {e}"));
                seen.insert(action);
            }
            let kinds = if version.is_2x() { 3 } else { 5 };
            assert_eq!(seen.len(), kinds, "{seen:?}");
        }
    }

    #[test]
    fn no_transaction_means_no_meter_or_stop() {
        let mut tx = TxState::default();
        let m = Duration::from_secs(10);
        assert!(call_for(Step::Meter, OcppVersion::V16, &mut tx, m).is_none());
        assert!(call_for(Step::Stop, OcppVersion::V201, &mut tx, m).is_none());
    }
}
