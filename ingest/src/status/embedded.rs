//! In-process status store, used when no `REDIS_URL` is configured.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde_json::Value;

use super::{ConnectorStatus, StationPresence};

type ConnectorKey = (String, i32, i32);

/// A station's presence plus when its current holder connected (`None`: a
/// re-asserted claim, which any real connection overrides).
struct Presence {
    view: StationPresence,
    since: Option<DateTime<Utc>>,
}

/// In-process status store. Cheap to clone (shared maps).
#[derive(Clone, Default)]
pub struct EmbeddedStore {
    connectors: Arc<DashMap<ConnectorKey, ConnectorStatus>>,
    stations: Arc<DashMap<String, Presence>>,
}

fn max_seen(cur: Option<DateTime<Utc>>, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    Some(cur.map_or(at, |l| l.max(at)))
}

impl EmbeddedStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `s` unless the stored status for its connector is at least as new
    /// (compared to the microsecond, as the Redis store does).
    /// Returns whether it was stored.
    pub fn put_connector(&self, s: ConnectorStatus) -> bool {
        let key = (s.station_id.clone(), s.evse_id, s.connector_id);
        let mut stored = false;
        self.connectors
            .entry(key)
            .and_modify(|cur| {
                if s.event_time.timestamp_micros() > cur.event_time.timestamp_micros() {
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

    /// `node` now holds the station, unless another node holds it since a
    /// later time (a late replay of an older connection).
    pub fn connected(&self, station: &str, node: &str, version: &str, at: DateTime<Utc>) {
        let mut p = self.presence_mut(station);
        if p.view.connected
            && p.view.node.as_deref() != Some(node)
            && p.since
                .is_some_and(|s| s.timestamp_micros() > at.timestamp_micros())
        {
            return;
        }
        p.view.connected = true;
        p.view.node = Some(node.to_string());
        p.view.ocpp_version = Some(version.to_string());
        p.view.last_seen = max_seen(p.view.last_seen, at);
        p.since = Some(at);
    }

    /// Marks the station disconnected, unless another node (or a newer
    /// connection on this one) has taken it over meanwhile.
    pub fn disconnected(&self, station: &str, node: &str, at: DateTime<Utc>) {
        if let Some(mut p) = self.stations.get_mut(station)
            && p.view.connected
            && p.view.node.as_deref() == Some(node)
            && p.since
                .is_none_or(|s| s.timestamp_micros() <= at.timestamp_micros())
        {
            p.view.connected = false;
            p.view.last_seen = max_seen(p.view.last_seen, at);
        }
    }

    pub fn seen(&self, station: &str, at: DateTime<Utc>) {
        let mut p = self.presence_mut(station);
        p.view.last_seen = max_seen(p.view.last_seen, at);
    }

    pub fn boot(&self, station: &str, info: Value) {
        self.presence_mut(station).view.boot = Some(info);
    }

    /// Marks each station connected to `node` unless it is already connected
    /// (to `node` or to another node, which keeps it).
    pub fn reassert_presence(&self, node: &str, stations: Vec<(String, String)>) {
        for (station, version) in stations {
            let mut p = self.presence_mut(&station);
            if !p.view.connected {
                p.view.connected = true;
                p.view.node = Some(node.to_string());
                p.view.ocpp_version = Some(version);
                p.since = None;
            }
        }
    }

    fn presence_mut(&self, station: &str) -> dashmap::mapref::one::RefMut<'_, String, Presence> {
        self.stations
            .entry(station.to_string())
            .or_insert_with(|| Presence {
                view: StationPresence {
                    station_id: station.to_string(),
                    connected: false,
                    node: None,
                    last_seen: None,
                    ocpp_version: None,
                    boot: None,
                },
                since: None,
            })
    }

    pub fn station(&self, station: &str) -> Option<StationPresence> {
        self.stations.get(station).map(|p| p.view.clone())
    }

    pub fn stations(&self) -> Vec<StationPresence> {
        let mut v: Vec<_> = self.stations.iter().map(|p| p.view.clone()).collect();
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
    fn put_connector_reports_whether_it_stored() {
        let s = EmbeddedStore::new();
        assert!(s.put_connector(st("Charging", 20)));
        assert!(!s.put_connector(st("Available", 10)));
        assert!(!s.put_connector(st("Faulted", 20)));
        assert!(s.put_connector(st("Faulted", 30)));
        assert_eq!(s.connectors(None)[0].status, "Faulted");
    }
}
