//! Connection liveness: a silent socket (no pong) is found and released, and
//! a second connection with the same station id replaces the first.

use std::time::Duration;

use tests::TestServer;

#[tokio::test]
async fn silent_connection_is_closed_and_released() {
    let server = TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .env("CSMS_OCPP__PING_INTERVAL_SECS", "1")
        .start()
        .await;
    let mut cp = server.connect("SILENT", "ocpp1.6", None).await.unwrap();
    cp.heartbeat_ok("h1").await.unwrap();
    // Not reading the socket means never answering the server's pings.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let closed = cp.wait_closed(Duration::from_secs(5)).await.unwrap();
    assert!(closed.texts.is_empty(), "{:?}", closed.texts);
    assert!(
        server
            .metric("csms_dead_connections_total", &[])
            .await
            .unwrap()
            >= 1.0
    );
    let r = server
        .admin_request("GET", "/api/stations/SILENT", None)
        .await
        .unwrap();
    assert_eq!(r.json().unwrap()["connected"], false, "{}", r.text());
}

#[tokio::test]
async fn answering_pings_keeps_a_quiet_station_connected() {
    let server = TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .env("CSMS_OCPP__PING_INTERVAL_SECS", "1")
        .start()
        .await;
    let mut cp = server.connect("QUIET", "ocpp2.0.1", None).await.unwrap();
    // Reading answers pings automatically; no OCPP traffic for 4 s.
    let r = cp.recv_text_timeout(Duration::from_secs(4)).await;
    assert!(r.is_err(), "no text expected: {r:?}");
    cp.heartbeat_ok("h1").await.unwrap();
}

#[tokio::test]
async fn newer_connection_replaces_the_older() {
    let server = TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .start()
        .await;
    let mut first = server.connect("TWICE", "ocpp1.6", None).await.unwrap();
    first.heartbeat_ok("a1").await.unwrap();
    let mut second = server.connect("TWICE", "ocpp1.6", None).await.unwrap();
    let closed = first.wait_closed(Duration::from_secs(5)).await.unwrap();
    assert_eq!(closed.code, Some(1008), "{closed:?}");
    assert!(closed.reason.contains("replaced"), "{}", closed.reason);
    second.heartbeat_ok("b1").await.unwrap();
    assert!(
        server
            .metric("csms_sessions_replaced_total", &[])
            .await
            .unwrap()
            >= 1.0
    );
    // Each answered CALL is timed under its action's name.
    assert!(
        server
            .metric("csms_call_seconds_count", &[("action", "Heartbeat")])
            .await
            .unwrap()
            >= 2.0
    );
    let r = server
        .admin_request("GET", "/api/stations/TWICE", None)
        .await
        .unwrap();
    assert_eq!(r.json().unwrap()["connected"], true, "{}", r.text());
}

/// `last_seen` follows a station's CALLs, written at most once a second
/// per connection (each write is a Redis script call when status is shared).
#[tokio::test]
async fn last_seen_follows_calls_once_a_second() {
    let server = TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .start()
        .await;
    let last_seen = || async {
        let r = server
            .admin_request("GET", "/api/stations/SEEN", None)
            .await
            .unwrap();
        let v = r.json().unwrap();
        let at = v["last_seen"].as_str().unwrap_or_else(|| panic!("{v}"));
        chrono::DateTime::parse_from_rfc3339(at).unwrap()
    };
    let mut cp = server.connect("SEEN", "ocpp1.6", None).await.unwrap();
    cp.heartbeat_ok("h1").await.unwrap();
    // The status update follows the answer; give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first = last_seen().await;
    cp.heartbeat_ok("h2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        last_seen().await,
        first,
        "a CALL within the second moved it"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cp.heartbeat_ok("h3").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = last_seen().await;
        if now > first {
            assert!(
                now - first >= chrono::Duration::milliseconds(1000),
                "{first} → {now}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "last_seen stayed at {first}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
