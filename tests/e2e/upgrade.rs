//! WebSocket upgrade rules: subprotocol negotiation, Basic auth, station ids.

use std::time::Duration;

use anyhow::{Result, bail};
use tests::{OcppClient, TestServer, poll};

/// The HTTP status of a refused upgrade, or a failure if it succeeded.
async fn refused(url: &str, subprotocols: &[&str], basic: Option<(&str, &str)>) -> Result<u16> {
    match OcppClient::connect(url, subprotocols, basic).await {
        Ok(client) => bail!(
            "upgrade of {url} offering {subprotocols:?} succeeded (subprotocol {:?}), expected a refusal",
            client.subprotocol
        ),
        Err(e) => match e.status() {
            Some(status) => Ok(status),
            None => bail!("upgrade of {url} failed without an HTTP status: {e}"),
        },
    }
}

#[tokio::test]
async fn subprotocol_negotiation() -> Result<()> {
    let server = TestServer::builder()
        .station("CP1", Some("s3cret-pw"))
        .start()
        .await;
    let url = server.ocpp_url("CP1");
    let auth = Some(("CP1", "s3cret-pw"));

    for version in ["ocpp1.6", "ocpp2.0.1", "ocpp2.1"] {
        let client = OcppClient::connect(&url, &[version], auth).await?;
        assert_eq!(
            client.subprotocol.as_deref(),
            Some(version),
            "echoed subprotocol"
        );
        client.close().await?;
    }
    // The server picks a version it supports out of several offered.
    let client = OcppClient::connect(&url, &["ocpp9.9", "ocpp2.0.1"], auth).await?;
    assert_eq!(client.subprotocol.as_deref(), Some("ocpp2.0.1"));
    client.close().await?;

    assert_eq!(
        refused(&url, &[], auth).await?,
        400,
        "no subprotocol offered"
    );
    assert_eq!(
        refused(&url, &["ocpp1.5"], auth).await?,
        400,
        "unsupported subprotocol"
    );
    assert_eq!(
        refused(&url, &["mqtt", "wamp"], auth).await?,
        400,
        "unsupported subprotocols"
    );
    Ok(())
}

#[tokio::test]
async fn basic_auth_and_unknown_stations() -> Result<()> {
    let server = TestServer::builder()
        .station("CP1", Some("s3cret-pw"))
        .start()
        .await;
    let url = server.ocpp_url("CP1");

    assert_eq!(
        refused(&url, &["ocpp1.6"], Some(("CP1", "wrong"))).await?,
        401,
        "wrong password"
    );
    assert_eq!(
        refused(&url, &["ocpp1.6"], None).await?,
        401,
        "no credentials"
    );
    // The Basic-auth user must be the station id.
    assert_eq!(
        refused(&url, &["ocpp1.6"], Some(("OTHER", "s3cret-pw"))).await?,
        401,
        "credentials of another user"
    );
    assert_eq!(
        refused(
            &server.ocpp_url("UNKNOWN"),
            &["ocpp1.6"],
            Some(("UNKNOWN", "x"))
        )
        .await?,
        401,
        "unknown station"
    );
    assert_eq!(
        refused(&server.ocpp_url("UNKNOWN"), &["ocpp1.6"], None).await?,
        401,
        "unknown station without credentials"
    );

    let mut client = OcppClient::connect(&url, &["ocpp1.6"], Some(("CP1", "s3cret-pw"))).await?;
    client.heartbeat_ok("hb-1").await?;
    Ok(())
}

#[tokio::test]
async fn station_ids_are_validated_and_percent_decoded() -> Result<()> {
    let server = TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .start()
        .await;
    for bad in [
        "bad%20id".to_string(),      // space
        "%C3%A9t%C3%A9".to_string(), // non-ASCII
        "semi%3Bcolon".to_string(),  // ';' is not allowed
        "x".repeat(49),              // too long
    ] {
        let status = refused(&server.ocpp_url(&bad), &["ocpp2.0.1"], None).await?;
        assert_eq!(status, 400, "station id {bad:?}");
    }
    // Every allowed character class, 48 characters long.
    let longest = format!("aZ09*-_=:+|@.{}", "y".repeat(35));
    assert_eq!(longest.len(), 48);
    let encoded = longest.replace('|', "%7C");
    let mut client = OcppClient::connect(&server.ocpp_url(&encoded), &["ocpp2.0.1"], None).await?;
    client.heartbeat_ok("hb-long").await?;
    Ok(())
}

#[tokio::test]
async fn percent_encoded_id_matches_registered_station() -> Result<()> {
    let server = TestServer::builder()
        .station("CP*1", Some("pw-star"))
        .start()
        .await;
    let url = server.ocpp_url("CP%2A1");
    let mut client = OcppClient::connect(&url, &["ocpp1.6"], Some(("CP*1", "pw-star"))).await?;
    client.heartbeat_ok("hb-star").await?;
    Ok(())
}

#[tokio::test]
async fn allow_unknown_accepts_unregistered_stations() -> Result<()> {
    let server = TestServer::builder()
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .start()
        .await;
    let mut client = server.connect("NEW-STATION-1", "ocpp1.6", None).await?;
    client.heartbeat_ok("hb-new").await?;
    Ok(())
}

#[tokio::test]
async fn cli_registration_applies_to_running_server() -> Result<()> {
    let server = TestServer::start().await;
    let url = server.ocpp_url("LIVE1");
    let auth = Some(("LIVE1", "live-pw"));
    assert_eq!(
        refused(&url, &["ocpp2.0.1"], auth).await?,
        401,
        "before registration"
    );

    server.cli_ok(&["stations", "add", "LIVE1", "--password", "live-pw"]);
    let listed = server.cli_ok(&["stations", "list"]);
    assert!(
        listed.contains("LIVE1"),
        "stations list shows LIVE1: {listed}"
    );
    assert!(
        !listed.contains("live-pw"),
        "stations list must not print passwords"
    );

    let mut client = poll(
        Duration::from_secs(10),
        "registered station accepted",
        || async { Ok(OcppClient::connect(&url, &["ocpp2.0.1"], auth).await.ok()) },
    )
    .await?;
    client.heartbeat_ok("hb-live").await?;
    client.close().await?;

    server.cli_ok(&["stations", "remove", "LIVE1"]);
    poll(
        Duration::from_secs(10),
        "removed station refused",
        || async {
            match OcppClient::connect(&url, &["ocpp2.0.1"], auth).await {
                Ok(_) => Ok(None),
                Err(e) => Ok((e.status() == Some(401)).then_some(())),
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn bulk_import_registers_a_fleet() -> Result<()> {
    let server = TestServer::start().await;
    let csv = server.data_dir().join("fleet.csv");
    std::fs::write(
        &csv,
        "id,password\n# onboarding batch 1\nFLEET-1,pw-one-1234567890\nFLEET-2,pw-two-1234567890\nFLEET-3,\n",
    )?;
    let out = server.cli_ok(&["stations", "import", csv.to_str().unwrap()]);
    assert!(
        out.contains("3 stations imported (3 new, 0 updated, 2 with a password)"),
        "{out}"
    );
    let mut client = server
        .connect(
            "FLEET-2",
            "ocpp2.0.1",
            Some(("FLEET-2", "pw-two-1234567890")),
        )
        .await?;
    client.heartbeat_ok("hb-fleet").await?;
    let url = server.ocpp_url("FLEET-1");
    assert_eq!(
        refused(&url, &["ocpp2.0.1"], Some(("FLEET-1", "pw-two-1234567890"))).await?,
        401,
        "another station's password"
    );

    // A malformed file names the line and registers nothing.
    std::fs::write(&csv, "FLEET-4,pw-4\nFLEET-5\n")?;
    let out = server.cli(&["stations", "import", csv.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 2"), "{err}");
    assert!(!server.cli_ok(&["stations", "list"]).contains("FLEET-4"));
    Ok(())
}

/// Two nodes of one fleet (one Redis, one secret, the same registry): a
/// password verified with argon2 on one is let in on the other by the tag
/// the first shared, then by the second's own cache; a wrong password still
/// fails there.
#[tokio::test]
async fn nodes_share_password_verifications() -> Result<()> {
    let redis = tests::RedisServer::start().await?;
    let fleet = |node: &str| {
        TestServer::builder()
            .env("REDIS_URL", redis.url())
            .env("CSMS_NODE_ID", node)
            .env("CSMS_VERIFICATION_SECRET", "e2e fleet secret 0123456789")
    };
    let a = fleet("node-a")
        .station("SHARED-1", Some("shared-pw-123"))
        .start()
        .await;
    let b = fleet("node-b").start().await;
    // The registry file is the fleet's: b gets a's (same hash, same salt),
    // replaced atomically as `csms stations` would.
    let copy = b.data_dir().join("stations.json.copy");
    std::fs::copy(a.data_dir().join("stations.json"), &copy)?;
    std::fs::rename(&copy, b.data_dir().join("stations.json"))?;

    let creds = Some(("SHARED-1", "shared-pw-123"));
    let mut on_a = a.connect("SHARED-1", "ocpp1.6", creds).await?;
    on_a.heartbeat_ok("h1").await?;
    assert_eq!(via(&a, "argon2").await?, 1.0);
    drop(on_a);

    // a shares the tag in the background: wait until Redis has it.
    poll(Duration::from_secs(10), "a's tag in Redis", || async {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &redis.port.to_string(),
                "EXISTS",
                "csms:{SHARED-1}:auth",
            ])
            .output()?;
        Ok((String::from_utf8_lossy(&out.stdout).trim() == "1").then_some(()))
    })
    .await?;
    let mut on_b = b.connect("SHARED-1", "ocpp1.6", creds).await?;
    on_b.heartbeat_ok("h2").await?;
    assert_eq!(via(&b, "shared").await?, 1.0, "{}", b.metrics().await?);
    assert_eq!(via(&b, "argon2").await?, 0.0, "b ran argon2");
    drop(on_b);

    let mut again = b.connect("SHARED-1", "ocpp1.6", creds).await?;
    again.heartbeat_ok("h3").await?;
    assert_eq!(via(&b, "cache").await?, 1.0);
    assert_eq!(
        refused(
            &b.ocpp_url("SHARED-1"),
            &["ocpp1.6"],
            Some(("SHARED-1", "not-the-password"))
        )
        .await?,
        401,
        "wrong password on the node holding a shared tag"
    );
    assert_eq!(via(&b, "argon2").await?, 0.0);
    Ok(())
}

/// How many connections `server` let in by a verification of `how`.
async fn via(server: &TestServer, how: &str) -> Result<f64> {
    server
        .metric("csms_auth_verifications_total", &[("via", how)])
        .await
}
