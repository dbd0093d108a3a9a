//! The live status store: the latest status per (station, evse, connector) and
//! each station's presence (connected, node, last seen, boot info).
//!
//! Writes follow one rule: a connector status is replaced only by an event
//! with a newer timestamp, so replays and out-of-order delivery are harmless.
//! This is the embedded store used when no `REDIS_URL` is configured.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectorStatus {
    pub station_id: String,
    /// 0 where the version has no EVSE level (1.6).
    pub evse_id: i32,
    pub connector_id: i32,
    pub status: String,
    pub error_code: Option<String>,
    pub info: Option<String>,
    pub event_time: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StationPresence {
    pub station_id: String,
    pub connected: bool,
    pub node: Option<String>,
    pub last_seen: Option<DateTime<Utc>>,
    pub ocpp_version: Option<String>,
    pub boot: Option<Value>,
}

type ConnectorKey = (String, i32, i32);

/// In-process status store. Cheap to clone (shared maps).
#[derive(Clone, Default)]
pub struct EmbeddedStore {
    connectors: Arc<DashMap<ConnectorKey, ConnectorStatus>>,
    stations: Arc<DashMap<String, StationPresence>>,
}

impl EmbeddedStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `s` unless the stored status for its connector is at least as new.
    /// Returns whether it was stored.
    pub fn put_connector(&self, s: ConnectorStatus) -> bool {
        let key = (s.station_id.clone(), s.evse_id, s.connector_id);
        let mut stored = false;
        self.connectors
            .entry(key)
            .and_modify(|cur| {
                if s.event_time > cur.event_time {
                    *cur = s.clone();
                    stored = true;
                }
            })
            .or_insert_with(|| {
                stored = true;
                s.clone()
            });
        stored
    }

    pub fn connected(&self, station: &str, node: &str, version: &str, at: DateTime<Utc>) {
        let mut p = self.presence_mut(station);
        p.connected = true;
        p.node = Some(node.to_string());
        p.ocpp_version = Some(version.to_string());
        p.last_seen = Some(at);
    }

    /// Marks the station disconnected, unless another node (or a newer
    /// connection on this one) has taken it over meanwhile.
    pub fn disconnected(&self, station: &str, node: &str, at: DateTime<Utc>) {
        if let Some(mut p) = self.stations.get_mut(station)
            && p.node.as_deref() == Some(node)
        {
            p.connected = false;
            p.last_seen = Some(p.last_seen.map_or(at, |l| l.max(at)));
        }
    }

    pub fn seen(&self, station: &str, at: DateTime<Utc>) {
        let mut p = self.presence_mut(station);
        if p.last_seen.is_none_or(|l| at > l) {
            p.last_seen = Some(at);
        }
    }

    pub fn boot(&self, station: &str, info: Value) {
        self.presence_mut(station).boot = Some(info);
    }

    fn presence_mut(
        &self,
        station: &str,
    ) -> dashmap::mapref::one::RefMut<'_, String, StationPresence> {
        self.stations
            .entry(station.to_string())
            .or_insert_with(|| StationPresence {
                station_id: station.to_string(),
                connected: false,
                node: None,
                last_seen: None,
                ocpp_version: None,
                boot: None,
            })
    }

    pub fn station(&self, station: &str) -> Option<StationPresence> {
        self.stations.get(station).map(|p| p.clone())
    }

    pub fn stations(&self) -> Vec<StationPresence> {
        let mut v: Vec<_> = self.stations.iter().map(|p| p.clone()).collect();
        v.sort_by(|a, b| a.station_id.cmp(&b.station_id));
        v
    }

    pub fn connectors(&self, station: Option<&str>) -> Vec<ConnectorStatus> {
        let mut v: Vec<_> = self
            .connectors
            .iter()
            .filter(|e| station.is_none_or(|s| e.key().0 == s))
            .map(|e| e.value().clone())
            .collect();
        v.sort_by(|a, b| {
            (&a.station_id, a.evse_id, a.connector_id).cmp(&(
                &b.station_id,
                b.evse_id,
                b.connector_id,
            ))
        });
        v
    }

    /// Forgets a station (it was removed from the registry).
    pub fn remove_station(&self, station: &str) {
        self.stations.remove(station);
        self.connectors.retain(|k, _| k.0 != station);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn st(status: &str, secs: i64) -> ConnectorStatus {
        ConnectorStatus {
            station_id: "S1".into(),
            evse_id: 1,
            connector_id: 1,
            status: status.into(),
            error_code: None,
            info: None,
            event_time: Utc.timestamp_opt(secs, 0).unwrap(),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn newer_wins_regardless_of_arrival_order() {
        let s = EmbeddedStore::new();
        assert!(s.put_connector(st("Charging", 20)));
        assert!(!s.put_connector(st("Available", 10)));
        assert!(!s.put_connector(st("Faulted", 20)));
        assert_eq!(s.connectors(Some("S1"))[0].status, "Charging");
        assert!(s.put_connector(st("Faulted", 30)));
        assert_eq!(s.connectors(None)[0].status, "Faulted");
    }

    #[test]
    fn disconnect_from_old_node_does_not_clobber_takeover() {
        let s = EmbeddedStore::new();
        let t = Utc::now();
        s.connected("S1", "a", "1.6", t);
        s.connected("S1", "b", "1.6", t);
        s.disconnected("S1", "a", t);
        assert!(s.station("S1").unwrap().connected);
        s.disconnected("S1", "b", t);
        assert!(!s.station("S1").unwrap().connected);
        s.remove_station("S1");
        assert!(s.station("S1").is_none());
    }
}
