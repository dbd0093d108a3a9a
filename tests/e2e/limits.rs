//! Protective limits: bad-frame floods, oversized frames, message rate.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use tests::{TestServer, poll};

#[tokio::test]
async fn bad_frame_flood_closes_connection() -> Result<()> {
    let server = TestServer::builder()
        .station("FLOOD1", Some("pw"))
        .env("CSMS_LIMITS__BAD_FRAMES_BEFORE_CLOSE", "5")
        .start()
        .await;
    let mut client = server
        .connect("FLOOD1", "ocpp2.0.1", Some(("FLOOD1", "pw")))
        .await?;
    client.heartbeat_ok("hb-0").await?;
    let mut sent = 0;
    for i in 0..50 {
        // Once the server has closed, sends fail: that is the expected end.
        if client.send_text(format!("garbage {i}")).await.is_err() {
            break;
        }
        sent += 1;
    }
    let closed = client.wait_closed(Duration::from_secs(15)).await?;
    ensure!(
        closed.texts.len() < 50,
        "server answered all {} bad frames ({} sent) before closing",
        closed.texts.len(),
        sent
    );
    for text in &closed.texts {
        let frame: Value = serde_json::from_str(text)?;
        ensure!(
            frame[0] == 4,
            "answer to a bad frame is not a CALLERROR: {text}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() -> Result<()> {
    let server = TestServer::builder()
        .station("BIG1", Some("pw"))
        .env("CSMS_LIMITS__MAX_FRAME_BYTES", "4096")
        .start()
        .await;
    let mut client = server
        .connect("BIG1", "ocpp1.6", Some(("BIG1", "pw")))
        .await?;
    // Below the limit: answered normally.
    let answer = client
        .call(
            "dt-small",
            "DataTransfer",
            json!({"vendorId": "com.example", "data": "x".repeat(3000)}),
        )
        .await?;
    ensure!(
        answer[0] == 3 && answer[1] == "dt-small",
        "DataTransfer of ~3 KB answered {answer:?}"
    );
    client
        .send_text(
            json!([2, "dt-big", "DataTransfer", {"vendorId": "com.example", "data": "x".repeat(8000)}])
                .to_string(),
        )
        .await?;
    let closed = client.wait_closed(Duration::from_secs(10)).await?;
    ensure!(
        closed.code == Some(1009),
        "expected close code 1009 after an 8 KB frame, got {:?} (reason {:?}, texts {:?})",
        closed.code,
        closed.reason,
        closed.texts
    );
    Ok(())
}

#[tokio::test]
async fn message_rate_limit_answers_everything_and_counts() -> Result<()> {
    let server = TestServer::builder()
        .station("RATE1", Some("pw"))
        .env("CSMS_LIMITS__MESSAGES_PER_STATION_PER_SEC", "2")
        .env("CSMS_LIMITS__MESSAGE_BURST_PER_STATION", "2")
        .env("CSMS_LIMITS__BAD_FRAMES_BEFORE_CLOSE", "1000")
        .start()
        .await;
    let before = server
        .metric("csms_limit_triggered_total", &[("limit", "message_rate")])
        .await?;
    let mut client = server
        .connect("RATE1", "ocpp2.0.1", Some(("RATE1", "pw")))
        .await?;
    let n = 12;
    for i in 0..n {
        client
            .send_text(json!([2, format!("hb-{i}"), "Heartbeat", {}]).to_string())
            .await?;
    }
    // Each CALL gets exactly one answer: a result, or a CALLERROR if the
    // server rejects rather than delays. At 2/s, delaying takes ~6 s.
    let mut answers: HashMap<String, Value> = HashMap::new();
    for _ in 0..n {
        let text = client.recv_text_timeout(Duration::from_secs(30)).await?;
        let frame: Value = serde_json::from_str(&text)?;
        ensure!(
            frame[0] == 3 || frame[0] == 4,
            "unexpected frame while rate limited: {text}"
        );
        let id = frame[1].as_str().unwrap_or_default().to_string();
        ensure!(
            answers.insert(id.clone(), frame).is_none(),
            "two answers for {id}"
        );
    }
    for i in 0..n {
        ensure!(
            answers.contains_key(&format!("hb-{i}")),
            "no answer for hb-{i}"
        );
    }
    poll(
        Duration::from_secs(10),
        "message_rate limit counted",
        || async {
            let now = server
                .metric("csms_limit_triggered_total", &[("limit", "message_rate")])
                .await?;
            Ok((now > before).then_some(()))
        },
    )
    .await?;
    // Once the bucket refills, the station is served normally again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let id = format!("hb-after-{attempt}");
        let answer = client.call(&id, "Heartbeat", json!({})).await?;
        if answer[0] == 3 && answer[1] == id.as_str() {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "still limited after 10 s: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
