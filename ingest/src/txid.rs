//! OCPP 1.6 transaction ids: the CSMS assigns them, as positive 32-bit
//! integers, and they must never repeat: not after a restart, and not across
//! nodes. With Redis every node draws from one `INCR` counter; alone, a node
//! reserves blocks of ids in a file it fsyncs before handing any out.

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
    Redis(redis::aio::ConnectionManager),
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
            TxIdAllocator::Redis(conn) => {
                let mut conn = conn.clone();
                let id: i64 = redis::cmd("INCR")
                    .arg("csms:txid")
                    .query_async(&mut conn)
                    .await?;
                i32::try_from(id).map_err(|_| TxIdError::Exhausted)
            }
        }
    }
}

/// Block-reserving allocator backed by one small file holding the highest
/// reserved id.
pub struct FileAllocator {
    path: PathBuf,
    state: Mutex<(i64, i64)>, // (next id, end of reserved block, exclusive)
}

const BLOCK: i64 = 1000;

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
