//! `csms serve --workers N`: several node processes share the OCPP and HTTP
//! ports (SO_REUSEPORT), each with its own WAL, and Redis ties their live
//! status together so any worker's API sees every station.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tests::{OcppClient, RedisServer, csms_bin, free_ports, http_request, poll};

#[tokio::test]
async fn workers_share_ports_and_status() {
    let redis = RedisServer::start().await.unwrap();
    let ports = free_ports(3);
    let data = tempfile::tempdir().unwrap();
    let ocpp = format!("127.0.0.1:{}", ports[0]);
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();
    let log = std::fs::File::create(data.path().join("serve.log")).unwrap();
    let mut parent = Command::new(csms_bin())
        .args(["serve", "--workers", "2"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CSMS_OCPP_ADDR", &ocpp)
        .env("CSMS_HTTP_ADDR", http.to_string())
        .env("CSMS_PG_ADDR", format!("127.0.0.1:{}", ports[2]))
        .env("CSMS_DATA_DIR", data.path())
        .env("CSMS_ALLOW_UNKNOWN", "true")
        .env("CSMS_ADMIN_TOKEN", "secret")
        .env("CSMS_NODE_ID", "box")
        .env("REDIS_URL", redis.url())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    // Both workers listening before the first connection, or the kernel
    // hands every connection to the one that bound first.
    let log_path = data.path().join("serve.log");
    poll(Duration::from_secs(60), "both workers listening", || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let up = ["box-w0", "box-w1"].iter().all(|w| {
            log.lines()
                .any(|l| l.contains("csms node listening") && l.contains(w))
        });
        async move { Ok(up.then_some(())) }
    })
    .await
    .unwrap();

    let boot = json!({"chargePointVendor": "V", "chargePointModel": "M"});
    let mut clients = Vec::new();
    for i in 0..16 {
        let url = format!("ws://{ocpp}/ocpp/W{i:02}");
        let mut c = poll(Duration::from_secs(60), "a worker accepting", || {
            let url = url.clone();
            async move { Ok(OcppClient::connect(&url, &["ocpp1.6"], None).await.ok()) }
        })
        .await
        .unwrap();
        let r = c
            .call(&format!("b{i}"), "BootNotification", boot.clone())
            .await
            .unwrap();
        assert_eq!(r[2]["status"], "Accepted", "{r:?}");
        clients.push(c);
    }

    // Any worker's API lists every station, held by both workers.
    let nodes: BTreeSet<String> = poll(
        Duration::from_secs(20),
        "status of all stations in Redis",
        || async {
            let auth = [("Authorization", "Bearer secret")];
            let r = http_request(http, "GET", "/api/stations", &auth, None).await?;
            let list: Value = r.json()?;
            let connected: Vec<&Value> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["connected"] == true)
                .collect();
            if connected.len() < 16 {
                return Ok(None);
            }
            Ok(Some(
                connected
                    .iter()
                    .filter_map(|s| s["node"].as_str().map(str::to_string))
                    .collect(),
            ))
        },
    )
    .await
    .unwrap();
    assert_eq!(
        nodes,
        BTreeSet::from(["box-w0".to_string(), "box-w1".to_string()]),
        "{nodes:?}"
    );
    assert!(data.path().join("wal-w0").is_dir() && data.path().join("wal-w1").is_dir());
    let log = std::fs::read_to_string(data.path().join("serve.log")).unwrap();
    assert!(!log.contains("worker exited"), "a worker died:\n{log}");

    // SIGTERM stops every worker gracefully.
    let _ = Command::new("kill")
        .args(["-TERM", &parent.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || parent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn workers_need_redis() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(csms_bin())
        .args(["serve", "--workers", "2"])
        .env_remove("REDIS_URL")
        .env("CSMS_DATA_DIR", data.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("REDIS_URL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
