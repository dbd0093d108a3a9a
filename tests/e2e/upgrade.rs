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
