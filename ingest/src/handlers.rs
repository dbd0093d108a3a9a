//! The CSMS's answer to every charger-initiated action of every version.
//!
//! Answers are computed from the (already schema-validated) request and the
//! node's policy; they never wait on Redis or the lake, except 1.6
//! StartTransaction, which must draw a network-wide unique id.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use schemas::{ErrorKind, OcppVersion};
use serde_json::{Value, json};

use crate::{
    config::{BootPolicy, OcppConfig},
    registry::{IdTokenRegistry, IdTokenStatus},
    txid::TxIdAllocator,
};

/// Why a CALL is answered with a CALLERROR rather than a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: ErrorKind,
    pub description: String,
}

/// Everything the answers depend on.
#[derive(Clone)]
pub struct Handlers {
    pub ocpp: Arc<OcppConfig>,
    pub tokens: IdTokenRegistry,
    pub txids: TxIdAllocator,
    /// While the node is saturated, the interval after which a booting
    /// station is to try again (it is answered Pending); `None` otherwise.
    pub defer_boot: Arc<dyn Fn() -> Option<u32> + Send + Sync>,
}

fn now_str(now: DateTime<Utc>) -> String {
    now.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Handlers {
    /// The CALLRESULT payload for a validated charger CALL.
    pub async fn answer(
        &self,
        version: OcppVersion,
        action: &str,
        req: &Value,
    ) -> Result<Value, Refusal> {
        let now = Utc::now();
        Ok(match (version, action) {
            (_, "BootNotification") => self.boot(now),
            (_, "Heartbeat") => json!({ "currentTime": now_str(now) }),
            (OcppVersion::V16, "Authorize") => {
                json!({ "idTagInfo": self.id_tag_info(req["idTag"].as_str(), now) })
            }
            (OcppVersion::V16, "StartTransaction") => {
                let tx = self.txids.next().await.map_err(|e| Refusal {
                    kind: ErrorKind::InternalError,
                    description: format!("cannot assign a transaction id: {e}"),
                })?;
                json!({ "idTagInfo": self.id_tag_info(req["idTag"].as_str(), now), "transactionId": tx })
            }
            (OcppVersion::V16, "StopTransaction") => match req["idTag"].as_str() {
                Some(tag) => json!({ "idTagInfo": self.id_tag_info(Some(tag), now) }),
                None => json!({}),
            },
            (_, "Authorize") => json!({ "idTokenInfo": self.id_token_info(&req["idToken"], now) }),
            (_, "TransactionEvent") => match req.get("idToken") {
                Some(tok) => json!({ "idTokenInfo": self.id_token_info(tok, now) }),
                None => json!({}),
            },
            // No vendor extensions are registered: the specification's answer
            // for a vendor this CSMS does not know.
            (_, "DataTransfer") => json!({ "status": "UnknownVendorId" }),
            // No certificate authority is configured for this CSMS, so a CSR
            // cannot be signed; saying so lets the station retry elsewhere.
            (_, "SignCertificate") => json!({ "status": "Rejected" }),
            (_, "Get15118EVCertificate") => json!({ "status": "Failed", "exiResponse": "" }),
            (_, "GetCertificateStatus") => json!({ "status": "Failed" }),
            (_, "GetCertificateChainStatus") => {
                let entries: Vec<Value> = req["certificateStatusRequests"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|r| {
                                json!({
                                    "certificateHashData": r["certificateHashData"],
                                    "source": r["source"],
                                    "status": "Failed",
                                    "nextUpdate": now_str(now),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                json!({ "certificateStatus": entries })
            }
            // No smart-charging schedule is computed here.
            (_, "NotifyEVChargingNeeds") => json!({ "status": "Rejected" }),
            (_, "PullDynamicScheduleUpdate") => json!({ "status": "Rejected" }),
            (_, "NotifyEVChargingSchedule")
            | (_, "NotifyAllowedEnergyTransfer")
            | (_, "OpenPeriodicEventStream") => {
                json!({ "status": "Accepted" })
            }
            // Cannot be checked against a tax registry from here.
            (_, "VatNumberValidation") => json!({
                "vatNumber": req["vatNumber"],
                "status": "Rejected",
                "statusInfo": { "reasonCode": "NotSupported" },
            }),
            // Every other charger-initiated message is a notification whose
            // answer is empty: its content is captured in bronze and acted on
            // through the core events.
            _ => json!({}),
        })
    }

    fn boot(&self, now: DateTime<Utc>) -> Value {
        let (status, interval) = match (self.ocpp.boot_policy, (self.defer_boot)()) {
            (BootPolicy::Reject, _) => ("Rejected", self.ocpp.pending_interval_secs),
            (_, Some(retry_in)) => {
                metrics::counter!("csms_boots_deferred_total").increment(1);
                ("Pending", retry_in)
            }
            (BootPolicy::Accept, None) => ("Accepted", self.ocpp.heartbeat_interval_secs),
            (BootPolicy::Pending, None) => ("Pending", self.ocpp.pending_interval_secs),
        };
        json!({ "status": status, "currentTime": now_str(now), "interval": interval })
    }

    /// 1.6 `IdTagInfo`.
    fn id_tag_info(&self, tag: Option<&str>, now: DateTime<Utc>) -> Value {
        let Some(tag) = tag else {
            return json!({ "status": "Invalid" });
        };
        let d = self.tokens.authorize(tag, now);
        let status = match d.status {
            IdTokenStatus::Accepted => "Accepted",
            IdTokenStatus::Blocked => "Blocked",
            IdTokenStatus::Expired => "Expired",
            // 1.6 has no "Unknown".
            IdTokenStatus::Invalid | IdTokenStatus::Unknown => "Invalid",
        };
        let mut info = json!({ "status": status });
        if let Some(exp) = d.expiry {
            info["expiryDate"] = json!(now_str(exp));
        }
        if let Some(group) = d.group_id {
            info["parentIdTag"] = json!(group);
        }
        info
    }

    /// 2.x `IdTokenInfoType`.
    fn id_token_info(&self, token: &Value, now: DateTime<Utc>) -> Value {
        let id = token["idToken"].as_str().unwrap_or_default();
        // Token types that carry no identifier to check: the station has
        // already decided (free vend, local keys, no authorization).
        let kind = token["type"].as_str().unwrap_or_default();
        if matches!(kind, "NoAuthorization" | "Central") && id.is_empty() {
            return json!({ "status": "Accepted" });
        }
        let d = self.tokens.authorize(id, now);
        let status = match d.status {
            IdTokenStatus::Accepted => "Accepted",
            IdTokenStatus::Blocked => "Blocked",
            IdTokenStatus::Expired => "Expired",
            IdTokenStatus::Invalid => "Invalid",
            IdTokenStatus::Unknown => "Unknown",
        };
        let mut info = json!({ "status": status });
        if let Some(exp) = d.expiry {
            info["cacheExpiryDateTime"] = json!(now_str(exp));
        }
        if let Some(group) = d.group_id {
            info["groupIdToken"] = json!({ "idToken": group, "type": "Central" });
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{DefaultPolicy, IdTokenRecord};
    use schemas::{Catalog, sample};

    fn handlers(dir: &std::path::Path, policy: DefaultPolicy) -> Handlers {
        Handlers {
            ocpp: Arc::new(OcppConfig::default()),
            tokens: IdTokenRegistry::open(dir, policy).unwrap(),
            txids: TxIdAllocator::File(Arc::new(crate::txid::FileAllocator::open(dir).unwrap())),
            defer_boot: Arc::new(|| None),
        }
    }

    /// Every charger-initiated action of every version gets an answer that
    /// validates against the OCA response schema, for a minimal and a full
    /// request.
    #[tokio::test]
    async fn every_answer_is_schema_valid() {
        let dir = tempfile::tempdir().unwrap();
        let h = handlers(dir.path(), DefaultPolicy::AcceptAll);
        let catalog = Catalog::global();
        let mut checked = 0;
        for version in OcppVersion::ALL {
            for spec in catalog
                .actions(version)
                .into_iter()
                .filter(|s| s.cs_may_send())
            {
                let Some(_) = spec.response_schema() else {
                    continue;
                };
                for req in [
                    sample::minimal_instance(spec.request_schema()),
                    sample::full_instance(spec.request_schema()),
                ] {
                    catalog
                        .validate_request(version, &spec.action, &req)
                        .unwrap();
                    let resp = h.answer(version, &spec.action, &req).await.unwrap();
                    if let Err(e) = catalog.validate_response(version, &spec.action, &resp) {
                        panic!("{version} {}: {resp} is invalid: {e}", spec.action);
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 150, "{checked}");
    }

    #[tokio::test]
    async fn boot_policy_and_overload() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = handlers(dir.path(), DefaultPolicy::AcceptAll);
        let r = h
            .answer(OcppVersion::V16, "BootNotification", &json!({}))
            .await
            .unwrap();
        assert_eq!(r["status"], "Accepted");
        assert_eq!(r["interval"], 300);
        h.defer_boot = Arc::new(|| Some(7));
        let r = h
            .answer(OcppVersion::V201, "BootNotification", &json!({}))
            .await
            .unwrap();
        assert_eq!(r["status"], "Pending");
        assert_eq!(r["interval"], 7, "the overload's own retry interval");
    }

    #[tokio::test]
    async fn token_decisions_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let h = handlers(dir.path(), DefaultPolicy::RejectUnknown);
        h.tokens
            .add(IdTokenRecord {
                id_token: "GOOD".into(),
                status: IdTokenStatus::Accepted,
                expiry: None,
                group_id: None,
            })
            .unwrap();
        h.tokens
            .add(IdTokenRecord {
                id_token: "BAD".into(),
                status: IdTokenStatus::Blocked,
                expiry: None,
                group_id: None,
            })
            .unwrap();
        let a = |v, action: &'static str, req: Value| {
            let h = h.clone();
            async move { h.answer(v, action, &req).await.unwrap() }
        };
        assert_eq!(
            a(OcppVersion::V16, "Authorize", json!({"idTag": "GOOD"})).await["idTagInfo"]["status"],
            "Accepted"
        );
        assert_eq!(
            a(OcppVersion::V16, "Authorize", json!({"idTag": "BAD"})).await["idTagInfo"]["status"],
            "Blocked"
        );
        assert_eq!(
            a(OcppVersion::V16, "Authorize", json!({"idTag": "WHO"})).await["idTagInfo"]["status"],
            "Invalid"
        );
        let r = a(
            OcppVersion::V201,
            "Authorize",
            json!({"idToken": {"idToken": "WHO", "type": "ISO14443"}}),
        )
        .await;
        // 2.x has a status of its own for tokens the CSMS does not know.
        assert_eq!(r["idTokenInfo"]["status"], "Unknown");
        let r = a(OcppVersion::V16, "StartTransaction", json!({"idTag": "GOOD", "connectorId": 1, "meterStart": 0, "timestamp": "2026-01-01T00:00:00Z"})).await;
        assert!(r["transactionId"].as_i64().unwrap() > 0);
    }
}
