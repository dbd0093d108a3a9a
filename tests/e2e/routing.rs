//! Remote commands across nodes: two `csms ingest` processes share one real
//! redis-server; a command posted to either node reaches the charger on the
//! other one, and the caller gets the charger's answer. A charger that
//! reconnects to the other node takes its commands with it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tests::{
    HttpResponse, OcppClient, RedisServer, csms_bin, free_ports, http_request, poll, tail_file,
};

const TOKEN: &str = "secret";
const STATION: &str = "CP-ROUTE-1";

/// One `csms ingest` process with its own ports and data directory; killed
/// on drop (its log tail printed if the test is failing).
struct IngestNode {
    name: String,
    child: Child,
    ocpp: SocketAddr,
    http: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl IngestNode {
    async fn start(name: &str, redis_url: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("csms-routing-{name}-"))
            .tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let ports = free_ports(3);
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let (ocpp, http) = (at(ports[0]), at(ports[1]));
        let log = dir.path().join("csms.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(csms_bin());
        for (k, _) in std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
            .filter(|(k, _)| k.starts_with("CSMS_") || k == "REDIS_URL" || k == "SMTP_URL")
        {
            cmd.env_remove(k);
        }
        let child = cmd
            .arg("ingest")
            .env("CSMS_OCPP_ADDR", ocpp.to_string())
            .env("CSMS_HTTP_ADDR", http.to_string())
            .env("CSMS_PG_ADDR", at(ports[2]).to_string())
            .env("CSMS_DATA_DIR", data.display().to_string())
            .env("CSMS_NODE_ID", name)
            .env("CSMS_ADMIN_TOKEN", TOKEN)
            .env("CSMS_ALLOW_UNKNOWN", "true")
            .env("CSMS_LAKE__FLUSH_INTERVAL_SECS", "1")
            .env("REDIS_URL", redis_url)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .context("spawning csms ingest")?;
        let mut node = IngestNode {
            name: name.to_string(),
            child,
            ocpp,
            http,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = node.child.try_wait() {
                bail!(
                    "csms ingest {name} exited before ready ({status}):\n{}",
                    node.log_tail()
                );
            }
            if let Ok(r) = http_request(node.http, "GET", "/readyz", &[], None).await
                && r.status == 200
            {
                return Ok(node);
            }
            if Instant::now() > deadline {
                bail!("csms ingest {name} not ready:\n{}", node.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        tail_file(&self.log, 60)
    }

    async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Result<HttpResponse> {
        let auth = format!("Bearer {TOKEN}");
        let body = body.map(|b| b.to_string());
        http_request(
            self.http,
            method,
            path,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            body.as_deref().map(str::as_bytes),
        )
        .await
    }

    /// Connects a 1.6 charger and boots it.
    async fn charger(&self, station: &str) -> Result<OcppClient> {
        let url = format!("ws://{}/ocpp/{station}", self.ocpp);
        let mut c = OcppClient::connect(&url, &["ocpp1.6"], None)
            .await
            .map_err(|e| anyhow::anyhow!("connect {station} to {}: {e}", self.name))?;
        let boot = c
            .call(
                "boot-1",
                "BootNotification",
                json!({"chargePointVendor": "Routing", "chargePointModel": "E2E"}),
            )
            .await?;
        ensure!(
            boot.first() == Some(&json!(3)) && boot[2]["status"] == "Accepted",
            "BootNotification on {} answered {boot:?}",
            self.name
        );
        Ok(c)
    }

    /// Waits until this node reports `station` connected to `holder`.
    async fn wait_held_by(&self, station: &str, holder: &str) -> Result<()> {
        let path = format!("/api/stations/{station}");
        poll(
            Duration::from_secs(15),
            &format!("{} sees {station} on {holder}", self.name),
            || async {
                let r = self.admin("GET", &path, None).await?;
                if r.status == 200 {
                    let v = r.json()?;
                    if v["connected"] == true && v["node"] == holder {
                        return Ok(Some(()));
                    }
                }
                bail!("GET {path}: {} {}", r.status, r.text())
            },
        )
        .await
    }
}

impl Drop for IngestNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- csms ingest {} log tail ----\n{}\n----",
                self.name,
                self.log_tail()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Answers the next CALL the charger receives, which must be a
/// RemoteStartTransaction for TAG1, with Accepted.
async fn accept_remote_start(mut charger: OcppClient) -> Result<OcppClient> {
    let frame = charger
        .recv_frame()
        .await
        .context("waiting for the RemoteStartTransaction CALL")?;
    ensure!(
        frame.len() == 4 && frame[0] == 2 && frame[2] == "RemoteStartTransaction",
        "expected a RemoteStartTransaction CALL, got {frame:?}"
    );
    ensure!(
        frame[3] == json!({"connectorId": 1, "idTag": "TAG1"}),
        "payload changed on the way: {frame:?}"
    );
    let id = frame[1].as_str().context("CALL message id")?;
    charger
        .send_text(json!([3, id, {"status": "Accepted"}]).to_string())
        .await?;
    Ok(charger)
}

/// Posts RemoteStartTransaction for [`STATION`] to `via` while the charger
/// answers it, and checks the caller gets the charger's answer.
async fn remote_start_via(via: &IngestNode, charger: OcppClient) -> Result<OcppClient> {
    let answering = tokio::spawn(accept_remote_start(charger));
    let resp = via
        .admin(
            "POST",
            &format!("/api/stations/{STATION}/commands/RemoteStartTransaction"),
            Some(&json!({"connectorId": 1, "idTag": "TAG1"})),
        )
        .await;
    let resp = match resp {
        Ok(r) if r.status == 200 => r,
        other => {
            answering.abort();
            bail!(
                "POST via {} answered {:?}",
                via.name,
                other.map(|r| (r.status, r.text()))
            );
        }
    };
    let charger = answering.await.context("charger task")??;
    let body = resp.json()?;
    ensure!(
        body["status"] == "result" && body["payload"] == json!({"status": "Accepted"}),
        "unexpected command answer via {}: {body}",
        via.name
    );
    Ok(charger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_reaches_the_node_holding_the_station() {
    let redis = RedisServer::start().await.expect("redis-server");
    let a = IngestNode::start("node-a", &redis.url())
        .await
        .expect("node-a");
    let b = IngestNode::start("node-b", &redis.url())
        .await
        .expect("node-b");
    // Panicking while the nodes are alive prints their log tails.
    if let Err(e) = scenario(&a, &b).await {
        panic!("{e:#}");
    }
}

async fn scenario(a: &IngestNode, b: &IngestNode) -> Result<()> {
    // The charger is on B; the operator asks A.
    let charger = b.charger(STATION).await?;
    a.wait_held_by(STATION, "node-b").await?;
    let charger = remote_start_via(a, charger).await?;

    // It reconnects to A: commands posted to B now go through A.
    charger.close().await?;
    let charger = a.charger(STATION).await?;
    b.wait_held_by(STATION, "node-a").await?;
    let charger = remote_start_via(b, charger).await?;
    // And one posted to A itself stays local.
    let charger = remote_start_via(a, charger).await?;

    // A station connected nowhere: a client error, not a hang or a 5xx.
    for node in [a, b] {
        let r = node
            .admin(
                "POST",
                "/api/stations/CP-NOWHERE/commands/RemoteStartTransaction",
                Some(&json!({"connectorId": 1, "idTag": "TAG1"})),
            )
            .await?;
        ensure!(
            matches!(r.status, 404 | 409),
            "command for a station connected nowhere via {}: {} {}",
            node.name,
            r.status,
            r.text()
        );
    }
    charger.close().await?;
    Ok(())
}
