//! The action catalog: for each version, every action, who may initiate it,
//! and its request and response validators compiled once from the embedded
//! OCA schemas.

use std::{collections::HashMap, sync::OnceLock};

use jsonschema::{Validator, error::ValidationErrorKind};
use serde_json::Value;

use crate::{ErrorKind, OcppVersion};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_schemas.rs"));
}

/// Actions a charging station sends to the CSMS, per version. Every other
/// action in a version's schema folder is CSMS-initiated (DataTransfer goes
/// both ways).
const CS_INITIATED_16: &[&str] = &[
    "Authorize",
    "BootNotification",
    "DataTransfer",
    "DiagnosticsStatusNotification",
    "FirmwareStatusNotification",
    "Heartbeat",
    "MeterValues",
    "StartTransaction",
    "StatusNotification",
    "StopTransaction",
    "LogStatusNotification",
    "SecurityEventNotification",
    "SignCertificate",
    "SignedFirmwareStatusNotification",
];

const CS_INITIATED_201: &[&str] = &[
    "Authorize",
    "BootNotification",
    "ClearedChargingLimit",
    "DataTransfer",
    "FirmwareStatusNotification",
    "Get15118EVCertificate",
    "GetCertificateStatus",
    "Heartbeat",
    "LogStatusNotification",
    "MeterValues",
    "NotifyChargingLimit",
    "NotifyCustomerInformation",
    "NotifyDisplayMessages",
    "NotifyEVChargingNeeds",
    "NotifyEVChargingSchedule",
    "NotifyEvent",
    "NotifyMonitoringReport",
    "NotifyReport",
    "PublishFirmwareStatusNotification",
    "ReportChargingProfiles",
    "ReservationStatusUpdate",
    "SecurityEventNotification",
    "SignCertificate",
    "StatusNotification",
    "TransactionEvent",
];

/// 2.1 adds these to the 2.0.1 set.
const CS_INITIATED_21_EXTRA: &[&str] = &[
    "BatterySwap",
    "ClosePeriodicEventStream",
    "GetCertificateChainStatus",
    "NotifyAllowedEnergyTransfer",
    "NotifyDERAlarm",
    "NotifyDERStartStop",
    "NotifyPeriodicEventStream",
    "NotifyPriorityCharging",
    "NotifySettlement",
    "NotifyWebPaymentStarted",
    "OpenPeriodicEventStream",
    "PullDynamicScheduleUpdate",
    "ReportDERControl",
    "VatNumberValidation",
];

/// Actions that both sides may initiate.
const BOTH_WAYS: &[&str] = &["DataTransfer"];

/// Who sends the CALL of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    ChargingStation,
    Csms,
    Both,
}

/// One action of one version.
pub struct ActionSpec {
    pub action: String,
    pub initiator: Initiator,
    request: Validator,
    /// `None` for SEND-only messages, which have no response.
    response: Option<Validator>,
    request_schema: Value,
    response_schema: Option<Value>,
}

impl ActionSpec {
    pub fn request_schema(&self) -> &Value {
        &self.request_schema
    }

    pub fn response_schema(&self) -> Option<&Value> {
        self.response_schema.as_ref()
    }

    pub fn cs_may_send(&self) -> bool {
        matches!(self.initiator, Initiator::ChargingStation | Initiator::Both)
    }

    pub fn csms_may_send(&self) -> bool {
        matches!(self.initiator, Initiator::Csms | Initiator::Both)
    }
}

/// A payload that broke its schema: the error kind to answer with and a short
/// description naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {description}")]
pub struct Violation {
    pub kind: ErrorKind,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("schema {version}/{file} is not valid JSON: {source}")]
    Json {
        version: String,
        file: String,
        source: serde_json::Error,
    },
    #[error("schema {version}/{file} does not compile: {message}")]
    Compile {
        version: String,
        file: String,
        message: String,
    },
}

/// Every action of every supported version.
pub struct Catalog {
    /// By version, then action name: looked up by `&str` on every frame.
    actions: HashMap<OcppVersion, HashMap<String, ActionSpec>>,
}

impl Catalog {
    /// The process-wide catalog, compiled on first use. Compiling takes a
    /// moment, so servers call this once at start.
    pub fn global() -> &'static Catalog {
        static CATALOG: OnceLock<Catalog> = OnceLock::new();
        CATALOG.get_or_init(|| Catalog::compile().expect("the embedded OCA schemas compile"))
    }

    /// Compiles every embedded schema.
    pub fn compile() -> Result<Catalog, CatalogError> {
        let mut by_file: HashMap<(&str, &str), Value> = HashMap::new();
        for (version, stem, text) in embedded::EMBEDDED {
            let value: Value = serde_json::from_str(text).map_err(|source| CatalogError::Json {
                version: version.to_string(),
                file: stem.to_string(),
                source,
            })?;
            by_file.insert((version, stem), value);
        }
        let mut actions = HashMap::new();
        for version in OcppVersion::ALL {
            let v = version.as_str();
            let mut names: Vec<String> = by_file
                .keys()
                .filter(|(fv, _)| *fv == v)
                .filter_map(|(_, stem)| request_action(version, stem))
                .collect();
            names.sort();
            names.dedup();
            for action in names {
                let req_file = request_file(version, &action, &by_file);
                let resp_file = format!("{action}Response");
                let request_schema = by_file[&(v, req_file.as_str())].clone();
                let response_schema = by_file.get(&(v, resp_file.as_str())).cloned();
                let request = compile_one(v, &req_file, &request_schema)?;
                let response = match &response_schema {
                    Some(s) => Some(compile_one(v, &resp_file, s)?),
                    None => None,
                };
                let initiator = initiator_of(version, &action);
                actions.entry(version).or_insert_with(HashMap::new).insert(
                    action.clone(),
                    ActionSpec {
                        action,
                        initiator,
                        request,
                        response,
                        request_schema,
                        response_schema,
                    },
                );
            }
        }
        Ok(Catalog { actions })
    }

    pub fn get(&self, version: OcppVersion, action: &str) -> Option<&ActionSpec> {
        self.actions.get(&version)?.get(action)
    }

    /// All actions of a version, sorted by name.
    pub fn actions(&self, version: OcppVersion) -> Vec<&ActionSpec> {
        let mut v: Vec<&ActionSpec> = self
            .actions
            .get(&version)
            .map(|m| m.values().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.action.cmp(&b.action));
        v
    }

    /// Validates the payload of a CALL (or SEND) of `action`.
    pub fn validate_request(
        &self,
        version: OcppVersion,
        action: &str,
        payload: &Value,
    ) -> Result<(), Violation> {
        let spec = self.get(version, action).ok_or_else(|| Violation {
            kind: ErrorKind::NotImplemented,
            description: format!("{action} is not an OCPP {version} action"),
        })?;
        check(&spec.request, payload)
    }

    /// Validates the payload of a CALLRESULT to `action`.
    pub fn validate_response(
        &self,
        version: OcppVersion,
        action: &str,
        payload: &Value,
    ) -> Result<(), Violation> {
        let spec = self.get(version, action).ok_or_else(|| Violation {
            kind: ErrorKind::NotImplemented,
            description: format!("{action} is not an OCPP {version} action"),
        })?;
        match &spec.response {
            Some(v) => check(v, payload),
            None => Err(Violation {
                kind: ErrorKind::ProtocolError,
                description: format!("{action} has no response"),
            }),
        }
    }
}

fn compile_one(version: &str, file: &str, schema: &Value) -> Result<Validator, CatalogError> {
    // Formats (date-time, uri) are not enforced: real chargers send
    // timestamps without offsets and the adapters fall back to the receive
    // time, so refusing them would lose data for no gain.
    jsonschema::options()
        .should_validate_formats(false)
        .build(schema)
        .map_err(|e| CatalogError::Compile {
            version: version.to_string(),
            file: file.to_string(),
            message: e.to_string(),
        })
}

/// The action a schema file is the request of, if it is one.
fn request_action(version: OcppVersion, stem: &str) -> Option<String> {
    if stem.ends_with("Response") {
        return None;
    }
    match version {
        OcppVersion::V16 => Some(stem.to_string()),
        // 2.x request files end in `Request`, except SEND-only messages.
        _ => Some(stem.strip_suffix("Request").unwrap_or(stem).to_string()),
    }
}

fn request_file(
    version: OcppVersion,
    action: &str,
    files: &HashMap<(&str, &str), Value>,
) -> String {
    let with_suffix = format!("{action}Request");
    if version.is_2x() && files.contains_key(&(version.as_str(), with_suffix.as_str())) {
        with_suffix
    } else {
        action.to_string()
    }
}

fn initiator_of(version: OcppVersion, action: &str) -> Initiator {
    if BOTH_WAYS.contains(&action) {
        return Initiator::Both;
    }
    let cs = match version {
        OcppVersion::V16 => CS_INITIATED_16.contains(&action),
        OcppVersion::V201 => CS_INITIATED_201.contains(&action),
        OcppVersion::V21 => {
            CS_INITIATED_201.contains(&action) || CS_INITIATED_21_EXTRA.contains(&action)
        }
    };
    if cs {
        Initiator::ChargingStation
    } else {
        Initiator::Csms
    }
}

fn check(validator: &Validator, payload: &Value) -> Result<(), Violation> {
    let Some(err) = validator.iter_errors(payload).next() else {
        return Ok(());
    };
    let path = err.instance_path().to_string();
    let at = if path.is_empty() {
        "payload".to_string()
    } else {
        path
    };
    let kind = match err.kind() {
        ValidationErrorKind::Required { .. }
        | ValidationErrorKind::MinItems { .. }
        | ValidationErrorKind::MaxItems { .. } => ErrorKind::OccurrenceConstraintViolation,
        ValidationErrorKind::Type { .. } => ErrorKind::TypeConstraintViolation,
        ValidationErrorKind::AdditionalProperties { .. } => ErrorKind::FormatViolation,
        _ => ErrorKind::PropertyConstraintViolation,
    };
    Err(Violation {
        kind,
        description: format!("{at}: {err}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_version_has_its_actions() {
        let c = Catalog::global();
        assert_eq!(c.actions(OcppVersion::V16).len(), 39);
        assert_eq!(c.actions(OcppVersion::V201).len(), 64);
        assert!(c.actions(OcppVersion::V21).len() > 80);
        for v in OcppVersion::ALL {
            let listed: Vec<&str> = match v {
                OcppVersion::V16 => CS_INITIATED_16.to_vec(),
                OcppVersion::V201 => CS_INITIATED_201.to_vec(),
                OcppVersion::V21 => [CS_INITIATED_201, CS_INITIATED_21_EXTRA].concat(),
            };
            for a in listed {
                let spec = c
                    .get(v, a)
                    .unwrap_or_else(|| panic!("{v} {a} has no schema"));
                assert!(spec.cs_may_send());
            }
        }
        assert!(
            c.get(OcppVersion::V21, "NotifyPeriodicEventStream")
                .unwrap()
                .response_schema()
                .is_none()
        );
        assert!(!c.get(OcppVersion::V16, "Reset").unwrap().cs_may_send());
    }

    #[test]
    fn violations_map_to_spec_codes() {
        let c = Catalog::global();
        let v16 = OcppVersion::V16;
        assert!(
            c.validate_request(
                v16,
                "BootNotification",
                &json!({"chargePointVendor":"a","chargePointModel":"b"})
            )
            .is_ok()
        );
        let e = c
            .validate_request(v16, "BootNotification", &json!({"chargePointVendor":"a"}))
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::OccurrenceConstraintViolation);
        let e = c
            .validate_request(
                v16,
                "BootNotification",
                &json!({"chargePointVendor":1,"chargePointModel":"b"}),
            )
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::TypeConstraintViolation);
        assert!(
            e.description.contains("/chargePointVendor"),
            "{}",
            e.description
        );
        let e = c
            .validate_request(
                v16,
                "BootNotification",
                &json!({"chargePointVendor":"a".repeat(21),"chargePointModel":"b"}),
            )
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::PropertyConstraintViolation);
        let e = c
            .validate_request(
                v16,
                "BootNotification",
                &json!({"chargePointVendor":"a","chargePointModel":"b","x":1}),
            )
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::FormatViolation);
        let e = c
            .validate_request(OcppVersion::V201, "Bogus", &json!({}))
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotImplemented);
        let e = c
            .validate_request(
                OcppVersion::V201,
                "StatusNotification",
                &json!({"timestamp":"x","connectorStatus":"Broken","evseId":1,"connectorId":1}),
            )
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::PropertyConstraintViolation);
    }
}
