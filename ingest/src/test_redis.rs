//! A throwaway redis-server for tests: on a free port, in a temporary
//! directory, killed on drop (`/usr/bin/redis-server`, installed by
//! `scripts/install-test-deps.sh`).

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A redis-server on a free port in a temporary directory, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    cluster: bool,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A one-node Redis Cluster owning every slot: the server still refuses
    /// cross-slot scripts, and the client goes through cluster routing.
    pub fn start_cluster() -> Self {
        let s = Self::start_with(true);
        let client = ::redis::Client::open(s.url()).unwrap();
        let mut c = client.get_connection().unwrap();
        let _: () = ::redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query(&mut c)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = ::redis::cmd("CLUSTER").arg("INFO").query(&mut c).unwrap();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster not ready: {info}");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn start_with(cluster: bool) -> Self {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut s = Self {
            child: None,
            port,
            cluster,
            dir: tempfile::tempdir().unwrap(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("/usr/bin/redis-server");
        cmd.args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(self.dir.path().join("nodes.conf"));
        }
        self.child = Some(cmd.spawn().expect("redis-server"));
        wait_listening(self.port, self.dir.path());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn raw(&self) -> ::redis::Connection {
        ::redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    pub fn keys(&self) -> Vec<String> {
        ::redis::cmd("KEYS")
            .arg("*")
            .query(&mut self.raw())
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_listening(port: u16, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server did not start on port {port} ({})",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
