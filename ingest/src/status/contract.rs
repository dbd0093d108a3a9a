//! The contract both status stores satisfy, run on the embedded store, on a
//! real redis-server and on a one-node Redis Cluster; plus Redis-only tests
//! (outage replay, presence expiry). Each test starts its own redis-server.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;

use super::*;
use crate::test_redis::RedisServer;

const FLUSH: Duration = Duration::from_secs(10);

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

fn cs(station: &str, connector: i32, status: &str, secs: i64) -> ConnectorStatus {
    ConnectorStatus {
        station_id: station.into(),
        evse_id: 1,
        connector_id: connector,
        status: status.into(),
        error_code: None,
        info: Some(format!("written at {secs}")),
        event_time: t(secs),
        updated_at: Utc::now(),
    }
}

async fn sync(stores: &[StatusStore]) {
    for s in stores {
        assert!(s.flush(FLUSH).await, "flush timed out");
    }
}

async fn status_of(s: &StatusStore, station: &str, connector: i32) -> Option<ConnectorStatus> {
    s.connectors(Some(station))
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.connector_id == connector)
}

/// The contract. `stores` are handles on one backend as separate nodes would
/// hold them (independent connections and queues for Redis); `keys` lists the
/// backend's raw keys where there are any.
async fn contract(stores: Vec<StatusStore>, keys: impl Fn() -> Vec<String>) {
    let (a, b) = (&stores[0], &stores[1]);

    // Newer wins, each write applied on its own (through the script).
    for (status, secs) in [("Charging", 20), ("Available", 10), ("Faulted", 20)] {
        a.put_connector(cs("NW", 1, status, secs));
        sync(&stores).await;
    }
    let c = status_of(a, "NW", 1).await.unwrap();
    assert_eq!((c.status.as_str(), c.event_time), ("Charging", t(20)));
    assert_eq!(c, cs("NW", 1, "Charging", 20).with_updated_at(c.updated_at));
    b.put_connector(cs("NW", 1, "Faulted", 30));
    sync(&stores).await;
    assert_eq!(status_of(a, "NW", 1).await.unwrap().status, "Faulted");

    // Same, as a burst (coalesced in the queue), and from two nodes.
    for (status, secs) in [("B", 50), ("A", 40), ("C", 50), ("D", 45)] {
        a.put_connector(cs("NW", 2, status, secs));
        b.put_connector(cs("NW", 2, &format!("{status}b"), secs - 5));
    }
    sync(&stores).await;
    assert_eq!(status_of(b, "NW", 2).await.unwrap().status, "B");

    // Concurrent writers with random timestamps: the maximum wins.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = stores[w % stores.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut max = i64::MIN;
            for _ in 0..200 {
                let secs: i64 = rand::random_range(0..100_000);
                max = max.max(secs);
                s.put_connector(cs("CW", 1, &format!("t{secs}"), secs));
                if rand::random_range(0..10) == 0 {
                    tokio::task::yield_now().await;
                }
            }
            max
        }));
    }
    let mut max = i64::MIN;
    for task in tasks {
        max = max.max(task.await.unwrap());
    }
    sync(&stores).await;
    let c = status_of(a, "CW", 1).await.unwrap();
    assert_eq!((c.status, c.event_time), (format!("t{max}"), t(max)));

    // Presence: a takeover is not clobbered by the old node's disconnect,
    // nor by a late replay of an older connection.
    a.connected("P", "node-a", "1.6", t(100));
    sync(&stores).await;
    b.connected("P", "node-b", "2.0.1", t(110));
    sync(&stores).await;
    a.disconnected("P", "node-a", t(120));
    a.connected("P2", "node-a", "1.6", t(100));
    sync(&stores).await;
    a.connected("P", "node-a", "1.6", t(105));
    sync(&stores).await;
    let p = a.station("P").await.unwrap().unwrap();
    assert!(p.connected);
    assert_eq!(p.node.as_deref(), Some("node-b"));
    assert_eq!(p.ocpp_version.as_deref(), Some("2.0.1"));
    assert_eq!(p.last_seen, Some(t(110)));
    // A disconnect older than the connection it would end is stale.
    b.disconnected("P", "node-b", t(109));
    sync(&stores).await;
    assert!(a.station("P").await.unwrap().unwrap().connected);
    b.disconnected("P", "node-b", t(130));
    sync(&stores).await;
    let p = a.station("P").await.unwrap().unwrap();
    assert!(!p.connected);
    assert_eq!(p.node.as_deref(), Some("node-b"));
    assert_eq!(p.last_seen, Some(t(130)));
    // Connect and disconnect in one burst: disconnected at the end.
    a.connected("P", "node-a", "1.6", t(140));
    a.seen("P", t(141));
    a.disconnected("P", "node-a", t(142));
    sync(&stores).await;
    let p = b.station("P").await.unwrap().unwrap();
    assert!(!p.connected);
    assert_eq!(
        (p.node.as_deref(), p.last_seen),
        (Some("node-a"), Some(t(142)))
    );

    // Re-asserted presence: never displaces another holder.
    b.reassert_presence("node-b", vec![("P2".into(), "1.6".into())]);
    sync(&stores).await;
    assert_eq!(
        a.station("P2").await.unwrap().unwrap().node.as_deref(),
        Some("node-a")
    );
    a.disconnected("P2", "node-a", t(101));
    sync(&stores).await;
    b.reassert_presence("node-b", vec![("P2".into(), "2.0.1".into())]);
    sync(&stores).await;
    let p = a.station("P2").await.unwrap().unwrap();
    assert!(p.connected);
    assert_eq!(p.node.as_deref(), Some("node-b"));
    assert_eq!(p.ocpp_version.as_deref(), Some("2.0.1"));
    // Any real connection overrides a re-asserted claim.
    a.connected("P2", "node-a", "1.6", t(90));
    sync(&stores).await;
    assert_eq!(
        b.station("P2").await.unwrap().unwrap().node.as_deref(),
        Some("node-a")
    );

    // Seen and boot.
    a.seen("SB", t(200));
    sync(&stores).await;
    b.seen("SB", t(150));
    b.boot("SB", json!({"vendor": "V", "model": "M"}));
    sync(&stores).await;
    let p = a.station("SB").await.unwrap().unwrap();
    assert_eq!(
        p,
        StationPresence {
            station_id: "SB".into(),
            connected: false,
            node: None,
            last_seen: Some(t(200)),
            ocpp_version: None,
            boot: Some(json!({"vendor": "V", "model": "M"})),
        }
    );
    assert_eq!(a.station("nobody").await.unwrap(), None);

    // Listing.
    let ids: Vec<String> = a
        .stations()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.station_id)
        .collect();
    assert_eq!(ids, ["P", "P2", "SB"]);
    let all: Vec<(String, i32)> = b
        .connectors(None)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.station_id, c.connector_id))
        .collect();
    assert_eq!(all, [("CW".into(), 1), ("NW".into(), 1), ("NW".into(), 2)]);
    assert!(a.connectors(Some("nobody")).await.unwrap().is_empty());

    // Removal forgets every key of a station, pending updates included.
    a.connected("RM", "node-a", "1.6", t(300));
    a.boot("RM", json!({}));
    a.put_connector(cs("RM", 1, "Available", 300));
    sync(&stores).await;
    let raw = keys();
    assert!(raw.is_empty() || raw.iter().filter(|k| k.contains("{RM}")).count() == 3);
    a.put_connector(cs("RM", 2, "Available", 301));
    a.remove_station("RM").await.unwrap();
    sync(&stores).await;
    assert_eq!(a.station("RM").await.unwrap(), None);
    assert!(a.connectors(Some("RM")).await.unwrap().is_empty());
    assert!(
        !a.stations()
            .await
            .unwrap()
            .iter()
            .any(|p| p.station_id == "RM")
    );
    assert!(keys().iter().all(|k| !k.contains("{RM}")));
    for id in ["NW", "CW", "P", "P2", "SB"] {
        a.remove_station(id).await.unwrap();
    }
    assert!(a.stations().await.unwrap().is_empty());
    assert!(a.connectors(None).await.unwrap().is_empty());
    assert_eq!(keys(), Vec::<String>::new());
}

impl ConnectorStatus {
    fn with_updated_at(mut self, at: DateTime<Utc>) -> Self {
        self.updated_at = at;
        self
    }
}

fn test_config() -> RedisStatusConfig {
    RedisStatusConfig {
        key_prefix: "t:".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_embedded() {
    let s = StatusStore::embedded();
    contract(vec![s.clone(), s], Vec::new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_redis() {
    let server = RedisServer::start();
    let a = StatusStore::redis(&server.url(), test_config())
        .await
        .unwrap();
    let b = StatusStore::redis(&server.url(), test_config())
        .await
        .unwrap();
    contract(vec![a, b], || server.keys()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_redis_cluster() {
    let server = RedisServer::start_cluster();
    let url = format!("redis+cluster://127.0.0.1:{}", server.port);
    let a = StatusStore::redis(&url, test_config()).await.unwrap();
    let b = StatusStore::redis(&format!("{},{}", server.url(), server.url()), test_config())
        .await
        .unwrap();
    contract(vec![a, b], || server.keys()).await;
}

/// Kill redis-server (SIGKILL, no persistence) in the middle of a stream of
/// updates, keep writing while it is down, restart it: after `flush` the
/// state is the latest update per connector and presence is repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_replay() {
    let mut server = RedisServer::start();
    let store = StatusStore::redis(&server.url(), test_config())
        .await
        .unwrap();
    let mut recoveries = store.recoveries().unwrap();
    store.connected("OUT", "node-a", "1.6", t(0));
    let mut latest = std::collections::HashMap::new();
    let mut slowest = Duration::ZERO;
    let mut write = |round: i64, connector: i32| {
        let started = Instant::now();
        store.put_connector(cs("OUT", connector, &format!("r{round}"), round));
        // An older event arriving late must not win on replay.
        store.put_connector(cs("OUT", connector, "stale", round - 1000));
        store.seen("OUT", t(round));
        slowest = slowest.max(started.elapsed());
        latest.insert(connector, round);
    };
    for round in 0..60 {
        for connector in 1..=4 {
            write(round, connector);
        }
        if round == 30 {
            server.kill();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Only some connectors change during the rest of the outage.
    for round in 60..100 {
        write(round, 1 + (round as i32 % 2));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        !store.flush(Duration::from_millis(300)).await,
        "flushed with Redis down"
    );
    assert!(
        slowest < Duration::from_millis(100),
        "a write blocked for {slowest:?}"
    );
    server.restart();
    assert!(
        store.flush(Duration::from_secs(20)).await,
        "replay did not complete"
    );
    let got: std::collections::HashMap<i32, (String, DateTime<Utc>)> = store
        .connectors(Some("OUT"))
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.connector_id, (c.status, c.event_time)))
        .collect();
    let want = latest
        .iter()
        .map(|(&c, &r)| (c, (format!("r{r}"), t(r))))
        .collect();
    assert_eq!(got, want);
    let p = store.station("OUT").await.unwrap().unwrap();
    assert_eq!(p.last_seen, Some(t(99)));
    // Presence was lost with the server's memory and re-asserted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = store.station("OUT").await.unwrap().unwrap();
        if p.connected && p.node.as_deref() == Some("node-a") {
            break;
        }
        assert!(Instant::now() < deadline, "presence not repaired: {p:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(*recoveries.borrow_and_update() >= 1);
}

/// A node that stops refreshing (crashed) loses its stations after the TTL;
/// a live one keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_presence_expires_unless_refreshed() {
    let server = RedisServer::start();
    let config = RedisStatusConfig {
        presence_ttl_secs: 1,
        ..test_config()
    };
    let a = StatusStore::redis(&server.url(), config.clone())
        .await
        .unwrap();
    let observer = StatusStore::redis(&server.url(), config).await.unwrap();
    a.connected("TTL", "node-a", "1.6", Utc::now());
    assert!(a.flush(FLUSH).await);
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg("t:{TTL}:presence")
        .query(&mut server.raw())
        .unwrap();
    assert!((1..=1000).contains(&ttl), "pttl {ttl}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(observer.station("TTL").await.unwrap().unwrap().connected);
    drop(a);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let p = observer.station("TTL").await.unwrap().unwrap();
    assert!(!p.connected);
    assert_eq!(p.node.as_deref(), Some("node-a"));
}
