//! OCPP 1.6 transaction ids: the CSMS assigns them, as positive 32-bit
//! integers, and they must never repeat: not after a restart, and not across
//! nodes. Either way a node reserves a block of ids at a time: from one
//! Redis counter shared by every node (`INCRBY`), or alone from a file it
//! fsyncs before handing any out. Blocks keep Redis off the answer path for
//! all but one StartTransaction in [`BLOCK`].

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use parking_lot::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum TxIdError {
    #[error("transaction id store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("transaction id counter in Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the 32-bit transaction id space is exhausted")]
    Exhausted,
}

/// Hands out unique 1.6 transaction ids.
#[derive(Clone)]
pub enum TxIdAllocator {
    File(Arc<FileAllocator>),
    Redis(Arc<RedisAllocator>),
}

impl TxIdAllocator {
    pub async fn next(&self) -> Result<i32, TxIdError> {
        match self {
            TxIdAllocator::File(f) => {
                let f = f.clone();
                // Reserving a block writes and fsyncs a file: off the async threads.
                tokio::task::spawn_blocking(move || f.next())
                    .await
                    .expect("txid task does not panic")
            }
            TxIdAllocator::Redis(r) => r.next().await,
        }
    }
}

/// Block-reserving allocator backed by a Redis counter: the counter holds the
/// highest id reserved by any node.
pub struct RedisAllocator {
    conn: redis::aio::ConnectionManager,
    state: tokio::sync::Mutex<(i64, i64)>, // (next id, end of reserved block, exclusive)
}

impl RedisAllocator {
    pub fn new(conn: redis::aio::ConnectionManager) -> Self {
        RedisAllocator {
            conn,
            state: tokio::sync::Mutex::new((0, 0)),
        }
    }

    pub async fn next(&self) -> Result<i32, TxIdError> {
        let mut st = self.state.lock().await;
        if st.0 >= st.1 {
            let mut conn = self.conn.clone();
            let high: i64 = redis::cmd("INCRBY")
                .arg("csms:txid")
                .arg(BLOCK)
                .query_async(&mut conn)
                .await?;
            if high > i64::from(i32::MAX) {
                return Err(TxIdError::Exhausted);
            }
            *st = (high - BLOCK + 1, high + 1);
        }
        let id = st.0;
        st.0 += 1;
        Ok(id as i32)
    }
}

/// Block-reserving allocator backed by one small file holding the highest
/// reserved id.
pub struct FileAllocator {
    path: PathBuf,
    state: Mutex<(i64, i64)>, // (next id, end of reserved block, exclusive)
}

/// Ids reserved at a time.
pub const BLOCK: i64 = 100;

impl FileAllocator {
    pub fn open(data_dir: &Path) -> Result<Self, TxIdError> {
        let path = data_dir.join("txid_reserved");
        let reserved = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<i64>().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(TxIdError::Io { path, source }),
        };
        // Everything up to `reserved` may have been handed out before a crash.
        Ok(FileAllocator {
            path,
            state: Mutex::new((reserved + 1, reserved + 1)),
        })
    }

    pub fn next(&self) -> Result<i32, TxIdError> {
        let mut st = self.state.lock();
        if st.0 >= st.1 {
            let end = st.1 + BLOCK;
            if end > i64::from(i32::MAX) {
                return Err(TxIdError::Exhausted);
            }
            self.persist(end - 1)?;
            st.1 = end;
        }
        let id = st.0;
        st.0 += 1;
        Ok(id as i32)
    }

    fn persist(&self, reserved: i64) -> Result<(), TxIdError> {
        let io = |source| TxIdError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(reserved.to_string().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_repeat_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileAllocator::open(dir.path()).unwrap();
        let first: Vec<i32> = (0..1500).map(|_| a.next().unwrap()).collect();
        assert_eq!(first[0], 1);
        assert!(first.windows(2).all(|w| w[1] == w[0] + 1));
        drop(a);
        let b = FileAllocator::open(dir.path()).unwrap();
        let next = b.next().unwrap();
        assert!(next > *first.last().unwrap(), "{next}");
    }
}

#[cfg(test)]
mod redis_tests {
    use super::*;
    use crate::test_redis::RedisServer;

    /// Two nodes drawing from one Redis never hand out the same id.
    #[tokio::test]
    async fn nodes_sharing_redis_never_collide() {
        let server = RedisServer::start();
        let conn = || async {
            let client = redis::Client::open(server.url()).unwrap();
            redis::aio::ConnectionManager::new(client).await.unwrap()
        };
        let a = RedisAllocator::new(conn().await);
        let b = RedisAllocator::new(conn().await);
        let mut ids = Vec::new();
        for _ in 0..250 {
            ids.push(a.next().await.unwrap());
            ids.push(b.next().await.unwrap());
        }
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate transaction ids");
        assert!(ids[0] > 0);
    }
}
