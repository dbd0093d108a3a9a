//! Version-neutral core events: what a charger told us, with the OCPP version's
//! wire shape removed. The adapters in [`crate::adapter`] produce them; ingest
//! acts on them and the pipeline builds silver from them, so both sides share
//! one mapping.
//!
//! Field values are kept as sent (statuses, reasons, units) except where a
//! field's meaning is numeric and the spec defines a default or a scale, which
//! are applied: measurand defaults to `Energy.Active.Import.Register`, unit to
//! `Wh`, a 2.x `unitOfMeasure.multiplier` is folded into the value, and
//! transaction `meter_wh` is always watt-hours.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The measurand a sampled value has when the charger omits it (both families).
pub const DEFAULT_MEASURAND: &str = "Energy.Active.Import.Register";
/// The unit a sampled value has when the charger omits it (both families).
pub const DEFAULT_UNIT: &str = "Wh";

/// One fact reported by a charging station.
///
/// Adjacently tagged (`{"event": "...", "data": ...}`) so every variant,
/// including the unit and sequence ones, round-trips through JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum CoreEvent {
    Boot(BootInfo),
    StatusChanged(StatusChange),
    TransactionStarted(TxStart),
    TransactionUpdated(TxUpdate),
    TransactionEnded(TxEnd),
    MeterSample(MeterSample),
    Heartbeat,
    /// A token presented for authorisation (1.6 `idTag`, 2.x `idToken.idToken`).
    Authorize {
        id_token: String,
        /// 2.x `idToken.type` (e.g. `ISO14443`); 1.6 has none.
        token_type: Option<String>,
    },
    SecurityEvent {
        kind: String,
        event_time: Option<DateTime<Utc>>,
        tech_info: Option<String>,
    },
    /// 1.6 FirmwareStatusNotification / SignedFirmwareStatusNotification and
    /// 2.x FirmwareStatusNotification.
    FirmwareStatus {
        status: String,
        /// The UpdateFirmware request this answers (1.6 signed firmware, 2.x).
        request_id: Option<i64>,
    },
    /// 2.x NotifyEvent: a monitored variable changed or crossed a threshold.
    /// Kept whole because faults in 2.x are often reported this way rather
    /// than through StatusNotification.
    DeviceEvent(DeviceEvent),
    /// 2.x NotifyReport: one entry per (component, variable, attribute).
    DeviceModelReport(Vec<DeviceVariable>),
}

/// A (re)boot of the station.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootInfo {
    pub vendor: String,
    pub model: String,
    /// 1.6 `chargePointSerialNumber` (else the deprecated
    /// `chargeBoxSerialNumber`), 2.x `chargingStation.serialNumber`.
    pub serial_number: Option<String>,
    pub firmware_version: Option<String>,
    /// 2.x boot reason (`PowerUp`, `Watchdog`, ...); 1.6 has none.
    pub reason: Option<String>,
    pub iccid: Option<String>,
    pub imsi: Option<String>,
}

/// A connector (or EVSE, or whole station) changed status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    /// 2.x `evseId`; 1.6 has no EVSE level.
    pub evse_id: Option<i32>,
    /// 1.6 `connectorId`, 2.x `connectorId`; 0 means the whole station (1.6)
    /// or the whole EVSE (2.x NotifyEvent on an EVSE component).
    pub connector_id: i32,
    /// The status as sent (1.6 `status`, 2.x `connectorStatus`).
    pub status: String,
    /// `Faulted` in either family.
    pub is_fault: bool,
    /// 1.6 `errorCode` (`NoError` becomes `None`), 2.x NotifyEvent `techCode`.
    pub error_code: Option<String>,
    pub info: Option<String>,
    pub vendor_error_code: Option<String>,
    pub event_time: Option<DateTime<Utc>>,
}

/// A transaction began. In 1.6 the id comes from the CSMS's answer to
/// StartTransaction; in 2.x the station chooses it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxStart {
    pub transaction_id: String,
    pub evse_id: Option<i32>,
    pub connector_id: Option<i32>,
    pub id_token: Option<String>,
    /// Energy register at start, in Wh (1.6 `meterStart`; 2.x the
    /// Energy.Active.Import.Register sample carried by the event).
    pub meter_wh: Option<f64>,
    pub event_time: Option<DateTime<Utc>>,
    /// 2.x `seqNo`.
    pub seq_no: Option<i64>,
    /// 2.x `triggerReason`.
    pub trigger_reason: Option<String>,
    /// 2.x `transactionInfo.chargingState`.
    pub charging_state: Option<String>,
    pub reservation_id: Option<i64>,
    /// 2.x `transactionInfo.remoteStartId`.
    pub remote_start_id: Option<i64>,
}

/// Something about a running transaction changed (2.x TransactionEvent
/// Updated; 1.6 MeterValues that name a transaction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxUpdate {
    pub transaction_id: String,
    pub evse_id: Option<i32>,
    pub connector_id: Option<i32>,
    pub id_token: Option<String>,
    /// Latest energy register reading in Wh, if the message carried one.
    pub meter_wh: Option<f64>,
    pub event_time: Option<DateTime<Utc>>,
    pub seq_no: Option<i64>,
    pub trigger_reason: Option<String>,
    pub charging_state: Option<String>,
}

/// A transaction finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxEnd {
    pub transaction_id: String,
    pub evse_id: Option<i32>,
    pub connector_id: Option<i32>,
    pub id_token: Option<String>,
    /// Energy register at stop, in Wh (1.6 `meterStop`).
    pub meter_wh: Option<f64>,
    /// 1.6 `reason`, 2.x `transactionInfo.stoppedReason`, as sent. 1.6 says an
    /// absent reason means `Local`; that default is left to the reader.
    pub stop_reason: Option<String>,
    pub event_time: Option<DateTime<Utc>>,
    pub seq_no: Option<i64>,
    pub trigger_reason: Option<String>,
    pub charging_state: Option<String>,
    /// 2.1 `costDetails.totalCost.total.inclTax` (else `exclTax`): the
    /// station's own price, for reconciliation with billing.
    pub total_cost: Option<f64>,
    pub currency: Option<String>,
}

/// One sampled meter value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeterSample {
    pub transaction_id: Option<String>,
    pub evse_id: Option<i32>,
    pub connector_id: Option<i32>,
    pub sampled_at: Option<DateTime<Utc>>,
    /// Defaults to [`DEFAULT_MEASURAND`] when absent.
    pub measurand: String,
    pub phase: Option<String>,
    /// Defaults to [`DEFAULT_UNIT`] when absent. Not converted: a `kWh`
    /// sample keeps its value and unit.
    pub unit: String,
    pub context: Option<String>,
    pub location: Option<String>,
    /// The value in `unit` (2.x multiplier applied; 1.6 string parsed).
    pub value: f64,
}

impl MeterSample {
    /// The value in Wh if this is an energy register reading in Wh or kWh.
    pub fn energy_wh(&self) -> Option<f64> {
        if !self.measurand.starts_with("Energy.") {
            return None;
        }
        match self.unit.as_str() {
            "Wh" => Some(self.value),
            "kWh" => Some(self.value * 1000.0),
            _ => None,
        }
    }
}

/// A 2.x NotifyEvent entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub event_id: Option<i64>,
    pub event_time: Option<DateTime<Utc>>,
    /// `Alerting`, `Delta` or `Periodic`.
    pub trigger: String,
    pub component: String,
    pub component_instance: Option<String>,
    pub evse_id: Option<i32>,
    pub connector_id: Option<i32>,
    pub variable: String,
    pub variable_instance: Option<String>,
    pub actual_value: String,
    pub tech_code: Option<String>,
    pub tech_info: Option<String>,
    pub cleared: Option<bool>,
    pub transaction_id: Option<String>,
    /// 2.1 only.
    pub severity: Option<i64>,
}

/// One attribute of one variable from a 2.x NotifyReport.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceVariable {
    pub component: String,
    pub component_instance: Option<String>,
    pub evse_id: Option<i32>,
    pub connector_id: Option<i32>,
    pub variable: String,
    pub variable_instance: Option<String>,
    /// `Actual` when absent, as the spec defaults it.
    pub attribute_type: String,
    pub value: Option<String>,
    pub mutability: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_json() {
        let events = vec![
            CoreEvent::Heartbeat,
            CoreEvent::DeviceModelReport(vec![DeviceVariable {
                component: "EVSE".into(),
                component_instance: None,
                evse_id: Some(1),
                connector_id: None,
                variable: "Power".into(),
                variable_instance: None,
                attribute_type: "MaxSet".into(),
                value: Some("22000".into()),
                mutability: Some("ReadOnly".into()),
            }]),
            CoreEvent::SecurityEvent {
                kind: "FirmwareUpdated".into(),
                event_time: None,
                tech_info: Some("x".into()),
            },
        ];
        for e in events {
            let text = serde_json::to_string(&e).unwrap();
            let back: CoreEvent = serde_json::from_str(&text).unwrap();
            assert_eq!(back, e, "{text}");
        }
        assert_eq!(
            serde_json::to_string(&CoreEvent::Heartbeat).unwrap(),
            r#"{"event":"heartbeat"}"#
        );
    }

    #[test]
    fn energy_wh_converts_kwh_only_for_energy() {
        let mut s = MeterSample {
            transaction_id: None,
            evse_id: None,
            connector_id: Some(1),
            sampled_at: None,
            measurand: DEFAULT_MEASURAND.into(),
            phase: None,
            unit: "kWh".into(),
            context: None,
            location: None,
            value: 1.5,
        };
        assert_eq!(s.energy_wh(), Some(1500.0));
        s.unit = "Wh".into();
        assert_eq!(s.energy_wh(), Some(1.5));
        s.measurand = "Power.Active.Import".into();
        s.unit = "W".into();
        assert_eq!(s.energy_wh(), None);
    }
}
