//! OCPP 2.0.1 and 2.1 to core events. The two share the shapes of every
//! message adapted here; 2.1 only adds fields (TransactionEvent
//! `costDetails`, NotifyEvent `severity`), which are read when present.

use serde_json::Value;

use super::{array, boolean, id_string, int, int32, num, register_wh, string, time};
use crate::events::{
    BootInfo, CoreEvent, DEFAULT_MEASURAND, DEFAULT_UNIT, DeviceEvent, DeviceVariable, MeterSample,
    StatusChange, TxEnd, TxStart, TxUpdate,
};

pub(super) fn events(action: &str, req: &Value) -> Vec<CoreEvent> {
    match action {
        "BootNotification" => boot(req).map(CoreEvent::Boot).into_iter().collect(),
        "StatusNotification" => status(req)
            .map(CoreEvent::StatusChanged)
            .into_iter()
            .collect(),
        "TransactionEvent" => transaction_event(req),
        "MeterValues" => samples(array(req, "meterValue"), None, int32(req, "evseId"), None)
            .into_iter()
            .map(CoreEvent::MeterSample)
            .collect(),
        "NotifyEvent" => notify_event(req),
        "NotifyReport" => {
            let vars = report(req);
            if vars.is_empty() {
                Vec::new()
            } else {
                vec![CoreEvent::DeviceModelReport(vars)]
            }
        }
        "Heartbeat" => vec![CoreEvent::Heartbeat],
        "Authorize" => req
            .get("idToken")
            .and_then(|t| {
                Some(CoreEvent::Authorize {
                    id_token: string(t, "idToken")?,
                    token_type: string(t, "type"),
                })
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
        "FirmwareStatusNotification" => string(req, "status")
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
    let cs = req.get("chargingStation")?;
    let modem = cs.get("modem").unwrap_or(&Value::Null);
    Some(BootInfo {
        vendor: string(cs, "vendorName")?,
        model: string(cs, "model")?,
        serial_number: string(cs, "serialNumber"),
        firmware_version: string(cs, "firmwareVersion"),
        reason: string(req, "reason"),
        iccid: string(modem, "iccid"),
        imsi: string(modem, "imsi"),
    })
}

fn status(req: &Value) -> Option<StatusChange> {
    let status = string(req, "connectorStatus")?;
    Some(StatusChange {
        evse_id: Some(int32(req, "evseId")?),
        connector_id: int32(req, "connectorId")?,
        is_fault: status == "Faulted",
        status,
        error_code: None,
        info: None,
        vendor_error_code: None,
        event_time: time(req, "timestamp"),
    })
}

/// Started/Updated/Ended map to the three transaction events; every other
/// change (charging state, trigger reasons, meter values) is an Updated in
/// 2.x already. The energy register comes from the event's own samples,
/// preferring `Transaction.Begin`/`Transaction.End` context on Started/Ended.
fn transaction_event(req: &Value) -> Vec<CoreEvent> {
    let info = req.get("transactionInfo").unwrap_or(&Value::Null);
    let transaction_id = id_string(info, "transactionId");
    let evse = req.get("evse").unwrap_or(&Value::Null);
    let evse_id = int32(evse, "id");
    let connector_id = int32(evse, "connectorId");
    let samples = samples(
        array(req, "meterValue"),
        transaction_id.as_deref(),
        evse_id,
        connector_id,
    );
    let id_token = req.get("idToken").and_then(|t| string(t, "idToken"));
    let event_time = time(req, "timestamp");
    let seq_no = int(req, "seqNo");
    let trigger_reason = string(req, "triggerReason");
    let charging_state = string(info, "chargingState");

    let main = transaction_id.and_then(|transaction_id| match string(req, "eventType")?.as_str() {
        "Started" => Some(CoreEvent::TransactionStarted(TxStart {
            transaction_id,
            evse_id,
            connector_id,
            id_token,
            meter_wh: register_wh(&samples, Some("Transaction.Begin")).map(|(wh, _)| wh),
            event_time,
            seq_no,
            trigger_reason,
            charging_state,
            reservation_id: int(req, "reservationId"),
            remote_start_id: int(info, "remoteStartId"),
        })),
        "Updated" => Some(CoreEvent::TransactionUpdated(TxUpdate {
            transaction_id,
            evse_id,
            connector_id,
            id_token,
            meter_wh: register_wh(&samples, None).map(|(wh, _)| wh),
            event_time,
            seq_no,
            trigger_reason,
            charging_state,
        })),
        "Ended" => {
            let total_cost = req.get("costDetails").and_then(|c| c.get("totalCost"));
            let total = total_cost
                .and_then(|t| t.get("total"))
                .unwrap_or(&Value::Null);
            Some(CoreEvent::TransactionEnded(TxEnd {
                transaction_id,
                evse_id,
                connector_id,
                id_token,
                meter_wh: register_wh(&samples, Some("Transaction.End")).map(|(wh, _)| wh),
                stop_reason: string(info, "stoppedReason"),
                event_time,
                seq_no,
                trigger_reason,
                charging_state,
                total_cost: num(total, "inclTax").or_else(|| num(total, "exclTax")),
                currency: total_cost.and_then(|t| string(t, "currency")),
            }))
        }
        _ => None,
    });
    main.into_iter()
        .chain(samples.into_iter().map(CoreEvent::MeterSample))
        .collect()
}

/// Every NotifyEvent entry becomes a [`DeviceEvent`]. An `Alerting`/`Delta`
/// report of the `AvailabilityState` variable of a Connector, EVSE or the
/// ChargingStation is a status change (the 2.x alternative to
/// StatusNotification), so it also gives a [`StatusChange`]: EVSE level is
/// connector 0 of that EVSE, station level is EVSE 0 connector 0. `Periodic`
/// reports are left out of status changes so fault counts are not inflated.
fn notify_event(req: &Value) -> Vec<CoreEvent> {
    let mut out = Vec::new();
    for ed in array(req, "eventData") {
        let component = ed.get("component").unwrap_or(&Value::Null);
        let variable = ed.get("variable").unwrap_or(&Value::Null);
        let evse = component.get("evse").unwrap_or(&Value::Null);
        let (Some(trigger), Some(component_name), Some(variable_name), Some(actual_value)) = (
            string(ed, "trigger"),
            string(component, "name"),
            string(variable, "name"),
            string(ed, "actualValue"),
        ) else {
            continue;
        };
        let event = DeviceEvent {
            event_id: int(ed, "eventId"),
            event_time: time(ed, "timestamp"),
            trigger,
            component: component_name,
            component_instance: string(component, "instance"),
            evse_id: int32(evse, "id"),
            connector_id: int32(evse, "connectorId"),
            variable: variable_name,
            variable_instance: string(variable, "instance"),
            actual_value,
            tech_code: string(ed, "techCode"),
            tech_info: string(ed, "techInfo"),
            cleared: boolean(ed, "cleared"),
            transaction_id: string(ed, "transactionId"),
            severity: int(ed, "severity"),
        };
        let status = availability_change(&event);
        out.push(CoreEvent::DeviceEvent(event));
        out.extend(status.map(CoreEvent::StatusChanged));
    }
    out
}

fn availability_change(e: &DeviceEvent) -> Option<StatusChange> {
    if e.variable != "AvailabilityState" || !matches!(e.trigger.as_str(), "Alerting" | "Delta") {
        return None;
    }
    let (evse_id, connector_id) = match e.component.as_str() {
        "Connector" => (Some(e.evse_id?), e.connector_id?),
        "EVSE" => (Some(e.evse_id?), 0),
        "ChargingStation" => (Some(0), 0),
        _ => return None,
    };
    Some(StatusChange {
        evse_id,
        connector_id,
        status: e.actual_value.clone(),
        is_fault: e.actual_value == "Faulted",
        error_code: e.tech_code.clone(),
        info: e.tech_info.clone(),
        vendor_error_code: None,
        event_time: e.event_time,
    })
}

fn report(req: &Value) -> Vec<DeviceVariable> {
    let mut out = Vec::new();
    for rd in array(req, "reportData") {
        let component = rd.get("component").unwrap_or(&Value::Null);
        let variable = rd.get("variable").unwrap_or(&Value::Null);
        let evse = component.get("evse").unwrap_or(&Value::Null);
        let (Some(component_name), Some(variable_name)) =
            (string(component, "name"), string(variable, "name"))
        else {
            continue;
        };
        for attr in array(rd, "variableAttribute") {
            out.push(DeviceVariable {
                component: component_name.clone(),
                component_instance: string(component, "instance"),
                evse_id: int32(evse, "id"),
                connector_id: int32(evse, "connectorId"),
                variable: variable_name.clone(),
                variable_instance: string(variable, "instance"),
                attribute_type: string(attr, "type").unwrap_or_else(|| "Actual".to_owned()),
                value: string(attr, "value"),
                mutability: string(attr, "mutability"),
            });
        }
    }
    out
}

/// Flattens `meterValue[].sampledValue[]`, folding `unitOfMeasure.multiplier`
/// (a power of ten) into the value so that `value` is in `unit`.
fn samples(
    meter_values: &[Value],
    transaction_id: Option<&str>,
    evse_id: Option<i32>,
    connector_id: Option<i32>,
) -> Vec<MeterSample> {
    let mut out = Vec::new();
    for mv in meter_values {
        let sampled_at = time(mv, "timestamp");
        for sv in array(mv, "sampledValue") {
            let Some(raw) = num(sv, "value") else {
                continue;
            };
            let uom = sv.get("unitOfMeasure").unwrap_or(&Value::Null);
            let multiplier = int32(uom, "multiplier").unwrap_or(0).clamp(-30, 30);
            let value = raw * 10f64.powi(multiplier);
            out.push(MeterSample {
                transaction_id: transaction_id.map(str::to_owned),
                evse_id,
                connector_id,
                sampled_at,
                measurand: string(sv, "measurand").unwrap_or_else(|| DEFAULT_MEASURAND.to_owned()),
                phase: string(sv, "phase"),
                unit: string(uom, "unit").unwrap_or_else(|| DEFAULT_UNIT.to_owned()),
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
    use serde_json::{Value, json};

    use crate::{Catalog, OcppVersion, adapter::events_from_call, events::*};

    const V201: OcppVersion = OcppVersion::V201;
    const V21: OcppVersion = OcppVersion::V21;

    fn at(h: u32, m: u32, s: u32) -> Option<DateTime<Utc>> {
        Some(Utc.with_ymd_and_hms(2025, 3, 1, h, m, s).unwrap())
    }

    /// Adapts after checking the fixture is a valid request of that version.
    fn adapt(v: OcppVersion, action: &str, req: Value) -> Vec<CoreEvent> {
        Catalog::global()
            .validate_request(v, action, &req)
            .unwrap_or_else(|e| panic!("fixture {v} {action}: {e}"));
        events_from_call(v, action, &req, None)
    }

    #[test]
    fn boot_notification() {
        for v in [V201, V21] {
            let ev = adapt(
                v,
                "BootNotification",
                json!({"reason": "PowerUp", "chargingStation": {"vendorName": "ABB", "model": "Terra AC",
                       "serialNumber": "S-1", "firmwareVersion": "1.2.3", "modem": {"iccid": "8944", "imsi": "2620"}}}),
            );
            assert_eq!(
                ev,
                vec![CoreEvent::Boot(BootInfo {
                    vendor: "ABB".into(),
                    model: "Terra AC".into(),
                    serial_number: Some("S-1".into()),
                    firmware_version: Some("1.2.3".into()),
                    reason: Some("PowerUp".into()),
                    iccid: Some("8944".into()),
                    imsi: Some("2620".into()),
                })]
            );
        }
    }

    #[test]
    fn status_notification_faulted() {
        for v in [V201, V21] {
            let ev = adapt(
                v,
                "StatusNotification",
                json!({"timestamp": "2025-03-01T10:00:00Z", "connectorStatus": "Faulted", "evseId": 2, "connectorId": 1}),
            );
            assert_eq!(
                ev,
                vec![CoreEvent::StatusChanged(StatusChange {
                    evse_id: Some(2),
                    connector_id: 1,
                    status: "Faulted".into(),
                    is_fault: true,
                    error_code: None,
                    info: None,
                    vendor_error_code: None,
                    event_time: at(10, 0, 0),
                })],
                "{v}"
            );
            let ev = adapt(
                v,
                "StatusNotification",
                json!({"timestamp": "2025-03-01T10:00:00Z", "connectorStatus": "Occupied", "evseId": 1, "connectorId": 1}),
            );
            assert!(
                matches!(&ev[..], [CoreEvent::StatusChanged(s)] if !s.is_fault && s.status == "Occupied")
            );
        }
    }

    fn tx_event(event_type: &str, trigger: &str, seq: i64, extra: Value) -> Value {
        let mut base = json!({"eventType": event_type, "timestamp": "2025-03-01T10:00:00Z", "triggerReason": trigger, "seqNo": seq,
            "transactionInfo": {"transactionId": "tx-9"}, "evse": {"id": 1, "connectorId": 1}});
        for (k, v) in extra.as_object().unwrap() {
            if k == "transactionInfo" {
                for (ik, iv) in v.as_object().unwrap() {
                    base["transactionInfo"][ik] = iv.clone();
                }
            } else {
                base[k] = v.clone();
            }
        }
        base
    }

    #[test]
    fn transaction_event_started() {
        let req = tx_event(
            "Started",
            "Authorized",
            0,
            json!({"idToken": {"idToken": "04A2B3C4", "type": "ISO14443"}, "transactionInfo": {"chargingState": "EVConnected", "remoteStartId": 5},
                   "meterValue": [{"timestamp": "2025-03-01T10:00:00Z", "sampledValue": [{"value": 1.0, "context": "Transaction.Begin",
                   "unitOfMeasure": {"unit": "kWh"}}]}]}),
        );
        let ev = adapt(V201, "TransactionEvent", req);
        assert_eq!(
            ev[0],
            CoreEvent::TransactionStarted(TxStart {
                transaction_id: "tx-9".into(),
                evse_id: Some(1),
                connector_id: Some(1),
                id_token: Some("04A2B3C4".into()),
                meter_wh: Some(1000.0),
                event_time: at(10, 0, 0),
                seq_no: Some(0),
                trigger_reason: Some("Authorized".into()),
                charging_state: Some("EVConnected".into()),
                reservation_id: None,
                remote_start_id: Some(5),
            })
        );
        let [_, CoreEvent::MeterSample(s)] = ev.as_slice() else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (
                s.transaction_id.as_deref(),
                s.evse_id,
                s.connector_id,
                s.unit.as_str(),
                s.value
            ),
            (Some("tx-9"), Some(1), Some(1), "kWh", 1.0)
        );
    }

    #[test]
    fn transaction_event_updated_on_charging_state_change() {
        for v in [V201, V21] {
            let ev = adapt(
                v,
                "TransactionEvent",
                tx_event(
                    "Updated",
                    "ChargingStateChanged",
                    1,
                    json!({"transactionInfo": {"chargingState": "SuspendedEV"}}),
                ),
            );
            assert_eq!(
                ev,
                vec![CoreEvent::TransactionUpdated(TxUpdate {
                    transaction_id: "tx-9".into(),
                    evse_id: Some(1),
                    connector_id: Some(1),
                    id_token: None,
                    meter_wh: None,
                    event_time: at(10, 0, 0),
                    seq_no: Some(1),
                    trigger_reason: Some("ChargingStateChanged".into()),
                    charging_state: Some("SuspendedEV".into()),
                })]
            );
        }
    }

    #[test]
    fn transaction_event_ended_201() {
        let req = tx_event(
            "Ended",
            "EVCommunicationLost",
            7,
            json!({"transactionInfo": {"stoppedReason": "EVDisconnected", "chargingState": "Idle"}, "meterValue": [
                {"timestamp": "2025-03-01T11:00:00Z", "sampledValue": [
                    {"value": 9.9, "measurand": "Energy.Active.Import.Register", "unitOfMeasure": {"unit": "kWh"}, "context": "Sample.Periodic"},
                    {"value": 3.0, "measurand": "Energy.Active.Import.Register", "phase": "L1", "unitOfMeasure": {"unit": "kWh"}, "context": "Transaction.End"}]},
                {"timestamp": "2025-03-01T11:30:00Z", "sampledValue": [
                    {"value": 12.345, "measurand": "Energy.Active.Import.Register", "unitOfMeasure": {"unit": "Wh", "multiplier": 3}, "context": "Transaction.End"},
                    {"value": 80, "measurand": "SoC", "unitOfMeasure": {"unit": "Percent"}, "context": "Transaction.End", "location": "EV"}]}]}),
        );
        let ev = adapt(V201, "TransactionEvent", req);
        assert_eq!(ev.len(), 5, "{ev:#?}");
        let CoreEvent::TransactionEnded(end) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            *end,
            TxEnd {
                transaction_id: "tx-9".into(),
                evse_id: Some(1),
                connector_id: Some(1),
                id_token: None,
                meter_wh: Some(12345.0),
                stop_reason: Some("EVDisconnected".into()),
                event_time: at(10, 0, 0),
                seq_no: Some(7),
                trigger_reason: Some("EVCommunicationLost".into()),
                charging_state: Some("Idle".into()),
                total_cost: None,
                currency: None,
            }
        );
        let CoreEvent::MeterSample(soc) = &ev[4] else {
            panic!()
        };
        assert_eq!(
            (
                soc.measurand.as_str(),
                soc.location.as_deref(),
                soc.value,
                soc.sampled_at
            ),
            ("SoC", Some("EV"), 80.0, at(11, 30, 0))
        );
        let CoreEvent::MeterSample(scaled) = &ev[3] else {
            panic!()
        };
        assert!(
            (scaled.value - 12345.0).abs() < 1e-6,
            "multiplier applied: {}",
            scaled.value
        );
    }

    #[test]
    fn transaction_event_ended_21_with_cost() {
        let req = tx_event(
            "Ended",
            "StopAuthorized",
            3,
            json!({"idToken": {"idToken": "app-user-1", "type": "Central"}, "transactionInfo": {"stoppedReason": "Local"},
                   "costDetails": {"totalCost": {"currency": "EUR", "typeOfCost": "NormalCost", "total": {"exclTax": 10.0, "inclTax": 12.1}},
                                   "totalUsage": {"energy": 20000.0, "chargingTime": 3600, "idleTime": 0}}}),
        );
        let ev = adapt(V21, "TransactionEvent", req);
        let [CoreEvent::TransactionEnded(end)] = ev.as_slice() else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (
                end.total_cost,
                end.currency.as_deref(),
                end.id_token.as_deref()
            ),
            (Some(12.1), Some("EUR"), Some("app-user-1"))
        );
        assert_eq!(end.meter_wh, None);
    }

    #[test]
    fn meter_values_use_evse_id() {
        let ev = adapt(
            V201,
            "MeterValues",
            json!({"evseId": 0, "meterValue": [{"timestamp": "2025-03-01T10:00:00Z", "sampledValue": [{"value": 230.1, "measurand": "Voltage", "phase": "L1-N", "unitOfMeasure": {"unit": "V"}}, {"value": 42}]}]}),
        );
        assert_eq!(
            ev[0],
            CoreEvent::MeterSample(MeterSample {
                transaction_id: None,
                evse_id: Some(0),
                connector_id: None,
                sampled_at: at(10, 0, 0),
                measurand: "Voltage".into(),
                phase: Some("L1-N".into()),
                unit: "V".into(),
                context: None,
                location: None,
                value: 230.1,
            })
        );
        let CoreEvent::MeterSample(d) = &ev[1] else {
            panic!()
        };
        assert_eq!(
            (d.measurand.as_str(), d.unit.as_str(), d.value),
            (DEFAULT_MEASURAND, DEFAULT_UNIT, 42.0)
        );
    }

    #[test]
    fn notify_event_availability_faulted_is_a_status_change() {
        for v in [V201, V21] {
            let ev = adapt(
                v,
                "NotifyEvent",
                json!({"generatedAt": "2025-03-01T10:00:01Z", "seqNo": 0, "eventData": [
                    {"eventId": 1, "timestamp": "2025-03-01T10:00:00Z", "trigger": "Delta", "actualValue": "Faulted", "techCode": "GF",
                     "techInfo": "ground fault", "eventNotificationType": "HardWiredNotification",
                     "component": {"name": "Connector", "evse": {"id": 1, "connectorId": 2}}, "variable": {"name": "AvailabilityState"}},
                    {"eventId": 2, "timestamp": "2025-03-01T10:00:00Z", "trigger": "Periodic", "actualValue": "Available",
                     "eventNotificationType": "HardWiredMonitor", "component": {"name": "EVSE", "evse": {"id": 1}}, "variable": {"name": "AvailabilityState"}},
                    {"eventId": 3, "timestamp": "2025-03-01T10:00:00Z", "trigger": "Alerting", "actualValue": "85", "cleared": false,
                     "eventNotificationType": "CustomMonitor", "component": {"name": "TemperatureSensor"}, "variable": {"name": "Temperature"}}]}),
            );
            assert_eq!(ev.len(), 4, "{v}: {ev:#?}");
            assert_eq!(
                ev[1],
                CoreEvent::StatusChanged(StatusChange {
                    evse_id: Some(1),
                    connector_id: 2,
                    status: "Faulted".into(),
                    is_fault: true,
                    error_code: Some("GF".into()),
                    info: Some("ground fault".into()),
                    vendor_error_code: None,
                    event_time: at(10, 0, 0),
                })
            );
            let CoreEvent::DeviceEvent(temp) = &ev[3] else {
                panic!()
            };
            assert_eq!(
                (
                    temp.component.as_str(),
                    temp.variable.as_str(),
                    temp.actual_value.as_str(),
                    temp.cleared,
                    temp.evse_id
                ),
                ("TemperatureSensor", "Temperature", "85", Some(false), None)
            );
        }
    }

    #[test]
    fn notify_report_flattens_attributes() {
        let ev = adapt(
            V201,
            "NotifyReport",
            json!({"requestId": 1, "generatedAt": "2025-03-01T10:00:00Z", "seqNo": 0, "tbc": false, "reportData": [
                {"component": {"name": "EVSE", "evse": {"id": 1}}, "variable": {"name": "Power"},
                 "variableAttribute": [{"type": "Actual", "value": "0", "mutability": "ReadOnly"}, {"type": "MaxSet", "value": "22000"}]},
                {"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "HeartbeatInterval"}, "variableAttribute": [{"value": "300"}]}]}),
        );
        let [CoreEvent::DeviceModelReport(vars)] = ev.as_slice() else {
            panic!("{ev:?}")
        };
        assert_eq!(vars.len(), 3);
        assert_eq!(
            vars[1],
            DeviceVariable {
                component: "EVSE".into(),
                component_instance: None,
                evse_id: Some(1),
                connector_id: None,
                variable: "Power".into(),
                variable_instance: None,
                attribute_type: "MaxSet".into(),
                value: Some("22000".into()),
                mutability: None,
            }
        );
        assert_eq!(
            (vars[2].attribute_type.as_str(), vars[2].value.as_deref()),
            ("Actual", Some("300"))
        );
        assert!(
            adapt(
                V201,
                "NotifyReport",
                json!({"requestId": 1, "generatedAt": "2025-03-01T10:00:00Z", "seqNo": 1})
            )
            .is_empty()
        );
    }

    #[test]
    fn small_messages() {
        for v in [V201, V21] {
            assert_eq!(adapt(v, "Heartbeat", json!({})), vec![CoreEvent::Heartbeat]);
            assert_eq!(
                adapt(
                    v,
                    "SecurityEventNotification",
                    json!({"type": "StartupOfTheDevice", "timestamp": "2025-03-01T10:00:00Z"})
                ),
                vec![CoreEvent::SecurityEvent {
                    kind: "StartupOfTheDevice".into(),
                    event_time: at(10, 0, 0),
                    tech_info: None
                }]
            );
            assert_eq!(
                adapt(
                    v,
                    "FirmwareStatusNotification",
                    json!({"status": "Installed", "requestId": 9})
                ),
                vec![CoreEvent::FirmwareStatus {
                    status: "Installed".into(),
                    request_id: Some(9)
                }]
            );
            assert_eq!(
                adapt(
                    v,
                    "Authorize",
                    json!({"idToken": {"idToken": "04A2B3C4", "type": "ISO14443"}})
                ),
                vec![CoreEvent::Authorize {
                    id_token: "04A2B3C4".into(),
                    token_type: Some("ISO14443".into())
                }]
            );
        }
    }
}
