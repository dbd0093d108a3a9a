//! OCPP over TLS: security profile 2 (TLS + Basic auth) and 3 (mTLS, the
//! client certificate's CN names the station).

use anyhow::{Result, bail};
use tests::{OcppClient, TestPki, TestServer};

#[tokio::test]
async fn profile2_tls_with_basic_auth() -> Result<()> {
    let pki = TestPki::new()?;
    let server = TestServer::builder()
        .station("TLS1", Some("tls-pw"))
        .tls(&pki, false)
        .start()
        .await;
    let url = server.ocpp_tls_url("TLS1");

    let mut client =
        OcppClient::connect_tls(&url, &pki, None, &["ocpp2.0.1"], Some(("TLS1", "tls-pw"))).await?;
    assert_eq!(client.subprotocol.as_deref(), Some("ocpp2.0.1"));
    client.heartbeat_ok("hb-tls").await?;

    match OcppClient::connect_tls(&url, &pki, None, &["ocpp2.0.1"], Some(("TLS1", "bad"))).await {
        Ok(_) => bail!("wrong password accepted over TLS"),
        Err(e) => assert_eq!(e.status(), Some(401), "wrong password over TLS: {e}"),
    }
    // Plain ws keeps working beside wss.
    let mut plain = server
        .connect("TLS1", "ocpp1.6", Some(("TLS1", "tls-pw")))
        .await?;
    plain.heartbeat_ok("hb-plain").await?;
    Ok(())
}

#[tokio::test]
async fn profile3_client_certificate_names_the_station() -> Result<()> {
    let pki = TestPki::new()?;
    let server = TestServer::builder()
        .station("MTLS1", None)
        .station("MTLS2", None)
        .tls(&pki, true)
        .start()
        .await;
    let url = server.ocpp_tls_url("MTLS1");
    let cert1 = pki.issue("MTLS1", &[], true)?;

    let mut client =
        OcppClient::connect_tls(&url, &pki, Some(&cert1), &["ocpp2.0.1"], None).await?;
    client.heartbeat_ok("hb-mtls").await?;

    // A valid certificate of another station does not open MTLS1's socket.
    let cert2 = pki.issue("MTLS2", &[], true)?;
    if let Ok(c) = OcppClient::connect_tls(&url, &pki, Some(&cert2), &["ocpp2.0.1"], None).await {
        bail!(
            "certificate for MTLS2 opened MTLS1 (subprotocol {:?})",
            c.subprotocol
        );
    }
    // No client certificate: refused (TLS alert or HTTP 401).
    if let Ok(c) = OcppClient::connect_tls(&url, &pki, None, &["ocpp2.0.1"], None).await {
        bail!(
            "connection without client certificate accepted ({:?})",
            c.subprotocol
        );
    }
    // A certificate from a CA the server does not trust: refused.
    let rogue = TestPki::new()?.issue("MTLS1", &[], true)?;
    if let Ok(c) = OcppClient::connect_tls(&url, &pki, Some(&rogue), &["ocpp2.0.1"], None).await {
        bail!(
            "certificate from an untrusted CA accepted ({:?})",
            c.subprotocol
        );
    }
    Ok(())
}
