//! OCPP 1.6 (including the security whitepaper's messages) to core events.

use serde_json::Value;

use super::{array, id_string, int, int32, num, register_wh, string, time};
use crate::events::{
    BootInfo, CoreEvent, DEFAULT_MEASURAND, DEFAULT_UNIT, MeterSample, StatusChange, TxEnd,
    TxStart, TxUpdate,
};

pub(super) fn events(action: &str, req: &Value, resp: Option<&Value>) -> Vec<CoreEvent> {
    match action {
        "BootNotification" => boot(req).map(CoreEvent::Boot).into_iter().collect(),
        "StatusNotification" => status(req)
            .map(CoreEvent::StatusChanged)
            .into_iter()
            .collect(),
        "StartTransaction" => start(req, resp)
            .map(CoreEvent::TransactionStarted)
            .into_iter()
            .collect(),
        "StopTransaction" => stop(req),
        "MeterValues" => meter_values(req),
        "Heartbeat" => vec![CoreEvent::Heartbeat],
        "Authorize" => string(req, "idTag")
            .map(|id_token| CoreEvent::Authorize {
                id_token,
                token_type: None,
            })
            .into_iter()
            .collect(),
        "SecurityEventNotification" => string(req, "type")
            .map(|kind| CoreEvent::SecurityEvent {
                kind,
                event_time: time(req, "timestamp"),
                tech_info: string(req, "techInfo"),
            })
            .into_iter()
            .collect(),
        "FirmwareStatusNotification" | "SignedFirmwareStatusNotification" => string(req, "status")
            .map(|status| CoreEvent::FirmwareStatus {
                status,
                request_id: int(req, "requestId"),
            })
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

fn boot(req: &Value) -> Option<BootInfo> {
    Some(BootInfo {
        vendor: string(req, "chargePointVendor")?,
        model: string(req, "chargePointModel")?,
        serial_number: string(req, "chargePointSerialNumber")
            .or_else(|| string(req, "chargeBoxSerialNumber")),
        firmware_version: string(req, "firmwareVersion"),
        reason: None,
        iccid: string(req, "iccid"),
        imsi: string(req, "imsi"),
    })
}

fn status(req: &Value) -> Option<StatusChange> {
    let status = string(req, "status")?;
    Some(StatusChange {
        evse_id: None,
        connector_id: int32(req, "connectorId")?,
        is_fault: status == "Faulted",
        status,
        error_code: string(req, "errorCode").filter(|c| c != "NoError"),
        info: string(req, "info"),
        vendor_error_code: string(req, "vendorErrorCode"),
        event_time: time(req, "timestamp"),
    })
}

/// Needs the CALLRESULT: in 1.6 the CSMS assigns the transaction id, so a
/// StartTransaction without its answer names no transaction and gives nothing.
fn start(req: &Value, resp: Option<&Value>) -> Option<TxStart> {
    Some(TxStart {
        transaction_id: id_string(resp?, "transactionId")?,
        evse_id: None,
        connector_id: int32(req, "connectorId"),
        id_token: string(req, "idTag"),
        meter_wh: num(req, "meterStart"),
        event_time: time(req, "timestamp"),
        seq_no: None,
        trigger_reason: None,
        charging_state: None,
        reservation_id: int(req, "reservationId"),
        remote_start_id: None,
    })
}

fn stop(req: &Value) -> Vec<CoreEvent> {
    let Some(transaction_id) = id_string(req, "transactionId") else {
        return Vec::new();
    };
    let end = TxEnd {
        transaction_id: transaction_id.clone(),
        evse_id: None,
        connector_id: None,
        id_token: string(req, "idTag"),
        meter_wh: num(req, "meterStop"),
        stop_reason: string(req, "reason"),
        event_time: time(req, "timestamp"),
        seq_no: None,
        trigger_reason: None,
        charging_state: None,
        total_cost: None,
        currency: None,
    };
    let samples = samples(array(req, "transactionData"), Some(&transaction_id), None);
    std::iter::once(CoreEvent::TransactionEnded(end))
        .chain(samples.into_iter().map(CoreEvent::MeterSample))
        .collect()
}

/// MeterValues naming a transaction also give a [`TxUpdate`] with the latest
/// energy register, so 1.6 and 2.x running transactions look alike.
fn meter_values(req: &Value) -> Vec<CoreEvent> {
    let connector_id = int32(req, "connectorId");
    let transaction_id = id_string(req, "transactionId");
    let samples = samples(
        array(req, "meterValue"),
        transaction_id.as_deref(),
        connector_id,
    );
    let mut out = Vec::with_capacity(samples.len() + 1);
    if let Some(transaction_id) = transaction_id {
        let register = register_wh(&samples, None);
        let last_time = array(req, "meterValue")
            .iter()
            .filter_map(|mv| time(mv, "timestamp"))
            .max();
        out.push(CoreEvent::TransactionUpdated(TxUpdate {
            transaction_id,
            evse_id: None,
            connector_id,
            id_token: None,
            meter_wh: register.map(|(wh, _)| wh),
            event_time: register.and_then(|(_, t)| t).or(last_time),
            seq_no: None,
            trigger_reason: None,
            charging_state: None,
        }));
    }
    out.extend(samples.into_iter().map(CoreEvent::MeterSample));
    out
}

/// Flattens `meterValue[].sampledValue[]`. Values are strings in 1.6;
/// unparseable ones and signed data (whose text is not a reading) are skipped.
fn samples(
    meter_values: &[Value],
    transaction_id: Option<&str>,
    connector_id: Option<i32>,
) -> Vec<MeterSample> {
    let mut out = Vec::new();
    for mv in meter_values {
        let sampled_at = time(mv, "timestamp");
        for sv in array(mv, "sampledValue") {
            if string(sv, "format").as_deref() == Some("SignedData") {
                continue;
            }
            let Some(value) = sv
                .get("value")
                .and_then(Value::as_str)
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite())
            else {
                continue;
            };
            out.push(MeterSample {
                transaction_id: transaction_id.map(str::to_owned),
                evse_id: None,
                connector_id,
                sampled_at,
                measurand: string(sv, "measurand").unwrap_or_else(|| DEFAULT_MEASURAND.to_owned()),
                phase: string(sv, "phase"),
                unit: string(sv, "unit").unwrap_or_else(|| DEFAULT_UNIT.to_owned()),
                context: string(sv, "context"),
                location: string(sv, "location"),
                value,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeZone, Utc};
    use serde_json::json;

    use crate::{Catalog, OcppVersion, adapter::events_from_call, events::*};

    const V: OcppVersion = OcppVersion::V16;

    fn at(h: u32, m: u32, s: u32) -> Option<DateTime<Utc>> {
        Some(Utc.with_ymd_and_hms(2025, 3, 1, h, m, s).unwrap())
    }

    /// Adapts after checking the payload is a valid 1.6 request, so the
    /// fixtures are realistic.
    fn adapt(
        action: &str,
        req: serde_json::Value,
        resp: Option<serde_json::Value>,
    ) -> Vec<CoreEvent> {
        Catalog::global()
            .validate_request(V, action, &req)
            .unwrap_or_else(|e| panic!("fixture {action}: {e}"));
        if let Some(r) = &resp {
            Catalog::global()
                .validate_response(V, action, r)
                .unwrap_or_else(|e| panic!("fixture {action} response: {e}"));
        }
        events_from_call(V, action, &req, resp.as_ref())
    }

    #[test]
    fn boot_notification() {
        let ev = adapt(
            "BootNotification",
            json!({"chargePointVendor": "Alfen", "chargePointModel": "NG920", "chargeBoxSerialNumber": "ACE0001",
                   "firmwareVersion": "5.8.1", "iccid": "8944", "meterType": "MID"}),
            None,
        );
        assert_eq!(
            ev,
            vec![CoreEvent::Boot(BootInfo {
                vendor: "Alfen".into(),
                model: "NG920".into(),
                serial_number: Some("ACE0001".into()),
                firmware_version: Some("5.8.1".into()),
                reason: None,
                iccid: Some("8944".into()),
                imsi: None,
            })]
        );
    }

    #[test]
    fn status_notification_faulted_and_no_error() {
        let ev = adapt(
            "StatusNotification",
            json!({"connectorId": 2, "errorCode": "GroundFailure", "status": "Faulted", "info": "RCD tripped",
                   "vendorErrorCode": "E42", "timestamp": "2025-03-01T10:00:00Z"}),
            None,
        );
        assert_eq!(
            ev,
            vec![CoreEvent::StatusChanged(StatusChange {
                evse_id: None,
                connector_id: 2,
                status: "Faulted".into(),
                is_fault: true,
                error_code: Some("GroundFailure".into()),
                info: Some("RCD tripped".into()),
                vendor_error_code: Some("E42".into()),
                event_time: at(10, 0, 0),
            })]
        );
        let ev = adapt(
            "StatusNotification",
            json!({"connectorId": 0, "errorCode": "NoError", "status": "Available"}),
            None,
        );
        let CoreEvent::StatusChanged(s) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (
                s.connector_id,
                s.is_fault,
                s.error_code.as_deref(),
                s.event_time
            ),
            (0, false, None, None)
        );
    }

    #[test]
    fn start_transaction_takes_id_from_response() {
        let req = json!({"connectorId": 1, "idTag": "04A2B3C4", "meterStart": 1000, "timestamp": "2025-03-01T10:00:00.000Z", "reservationId": 7});
        let resp = json!({"transactionId": 4711, "idTagInfo": {"status": "Accepted"}});
        let ev = adapt("StartTransaction", req.clone(), Some(resp));
        assert_eq!(
            ev,
            vec![CoreEvent::TransactionStarted(TxStart {
                transaction_id: "4711".into(),
                evse_id: None,
                connector_id: Some(1),
                id_token: Some("04A2B3C4".into()),
                meter_wh: Some(1000.0),
                event_time: at(10, 0, 0),
                seq_no: None,
                trigger_reason: None,
                charging_state: None,
                reservation_id: Some(7),
                remote_start_id: None,
            })]
        );
        assert!(
            adapt("StartTransaction", req, None).is_empty(),
            "no transaction id without the answer"
        );
    }

    #[test]
    fn stop_transaction_with_transaction_data() {
        let ev = adapt(
            "StopTransaction",
            json!({"transactionId": 4711, "meterStop": 12345, "timestamp": "2025-03-01T11:30:00Z", "reason": "EVDisconnected",
                   "idTag": "04A2B3C4", "transactionData": [
                       {"timestamp": "2025-03-01T10:00:00Z", "sampledValue": [
                           {"value": "1000", "context": "Transaction.Begin", "unit": "Wh"}]},
                       {"timestamp": "2025-03-01T11:30:00Z", "sampledValue": [
                           {"value": "12.345", "context": "Transaction.End", "measurand": "Energy.Active.Import.Register", "unit": "kWh"},
                           {"value": "n/a", "measurand": "SoC", "unit": "Percent"}]}]}),
            None,
        );
        let sample = |at, value, unit: &str, context: &str| {
            CoreEvent::MeterSample(MeterSample {
                transaction_id: Some("4711".into()),
                evse_id: None,
                connector_id: None,
                sampled_at: at,
                measurand: "Energy.Active.Import.Register".into(),
                phase: None,
                unit: unit.into(),
                context: Some(context.into()),
                location: None,
                value,
            })
        };
        assert_eq!(
            ev,
            vec![
                CoreEvent::TransactionEnded(TxEnd {
                    transaction_id: "4711".into(),
                    evse_id: None,
                    connector_id: None,
                    id_token: Some("04A2B3C4".into()),
                    meter_wh: Some(12345.0),
                    stop_reason: Some("EVDisconnected".into()),
                    event_time: at(11, 30, 0),
                    seq_no: None,
                    trigger_reason: None,
                    charging_state: None,
                    total_cost: None,
                    currency: None,
                }),
                sample(at(10, 0, 0), 1000.0, "Wh", "Transaction.Begin"),
                sample(at(11, 30, 0), 12.345, "kWh", "Transaction.End"),
            ]
        );
    }

    #[test]
    fn meter_values_give_samples_and_a_transaction_update() {
        let ev = adapt(
            "MeterValues",
            json!({"connectorId": 1, "transactionId": 4711, "meterValue": [{"timestamp": "2025-03-01T10:15:00Z", "sampledValue": [
                {"value": "5.5", "measurand": "Energy.Active.Import.Register", "unit": "kWh", "context": "Sample.Periodic", "location": "Outlet"},
                {"value": "1800", "measurand": "Energy.Active.Import.Register", "phase": "L1", "unit": "Wh"},
                {"value": "7200.5", "measurand": "Power.Active.Import", "unit": "W"},
                {"value": "0xDEAD", "format": "SignedData"}]}]}),
            None,
        );
        assert_eq!(ev.len(), 4, "{ev:#?}");
        assert_eq!(
            ev[0],
            CoreEvent::TransactionUpdated(TxUpdate {
                transaction_id: "4711".into(),
                evse_id: None,
                connector_id: Some(1),
                id_token: None,
                meter_wh: Some(5500.0),
                event_time: at(10, 15, 0),
                seq_no: None,
                trigger_reason: None,
                charging_state: None,
            })
        );
        assert_eq!(
            ev[1],
            CoreEvent::MeterSample(MeterSample {
                transaction_id: Some("4711".into()),
                evse_id: None,
                connector_id: Some(1),
                sampled_at: at(10, 15, 0),
                measurand: "Energy.Active.Import.Register".into(),
                phase: None,
                unit: "kWh".into(),
                context: Some("Sample.Periodic".into()),
                location: Some("Outlet".into()),
                value: 5.5,
            })
        );
        let CoreEvent::MeterSample(power) = &ev[3] else {
            panic!()
        };
        assert_eq!(
            (power.measurand.as_str(), power.unit.as_str(), power.value),
            ("Power.Active.Import", "W", 7200.5)
        );

        // Without a transaction: samples only, defaults applied.
        let ev = adapt(
            "MeterValues",
            json!({"connectorId": 0, "meterValue": [{"timestamp": "2025-03-01T10:15:00Z", "sampledValue": [{"value": "99"}]}]}),
            None,
        );
        let [CoreEvent::MeterSample(s)] = ev.as_slice() else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (
                s.measurand.as_str(),
                s.unit.as_str(),
                s.value,
                s.transaction_id.as_deref()
            ),
            (DEFAULT_MEASURAND, "Wh", 99.0, None)
        );
    }

    #[test]
    fn small_messages() {
        assert_eq!(
            adapt("Heartbeat", json!({}), None),
            vec![CoreEvent::Heartbeat]
        );
        assert_eq!(
            adapt("Authorize", json!({"idTag": "04A2B3C4"}), None),
            vec![CoreEvent::Authorize {
                id_token: "04A2B3C4".into(),
                token_type: None
            }]
        );
        assert_eq!(
            adapt(
                "SecurityEventNotification",
                json!({"type": "TamperDetectionActivated", "timestamp": "2025-03-01T10:00:00Z", "techInfo": "lid"}),
                None
            ),
            vec![CoreEvent::SecurityEvent {
                kind: "TamperDetectionActivated".into(),
                event_time: at(10, 0, 0),
                tech_info: Some("lid".into())
            }]
        );
        assert_eq!(
            adapt(
                "FirmwareStatusNotification",
                json!({"status": "Installed"}),
                None
            ),
            vec![CoreEvent::FirmwareStatus {
                status: "Installed".into(),
                request_id: None
            }]
        );
        assert_eq!(
            adapt(
                "SignedFirmwareStatusNotification",
                json!({"status": "InvalidSignature", "requestId": 3}),
                None
            ),
            vec![CoreEvent::FirmwareStatus {
                status: "InvalidSignature".into(),
                request_id: Some(3)
            }]
        );
        assert!(adapt("DataTransfer", json!({"vendorId": "x"}), None).is_empty());
    }
}
