//! Closing finished connections off the session runtime.
//!
//! When a power cut drops a node's whole fleet, every one of its sockets
//! reports end-of-file at once and every session ends together. Most of
//! what an ended session costs is closing its socket: the epoll
//! deregistration, `close(2)` with its FIN, the kernel's socket teardown
//! and the buffers freed. Done on the session runtime, ~16,700 of those in
//! a row held each of a 6-worker box's runtimes for 0.5-1.2 s, and every
//! frame of a station still (or again) connected waited behind them. A
//! session therefore hands its socket to the [`Closer`], a thread of the
//! node's own that drops what it is given, and the runtime goes on with
//! the next ready task.
//!
//! The socket's [`ConnGuard`](crate::server::ConnGuard) travels with it, so
//! `limits.max_connections` keeps counting the descriptor until it is
//! really closed.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
    mpsc,
};

/// Hands things to be dropped (closed) to the node's closer thread.
/// Cloneable; the thread ends once every clone is gone and it has dropped
/// everything it was given.
#[derive(Clone)]
pub struct Closer {
    tx: mpsc::Sender<Box<dyn Send>>,
    /// Handed over, not yet dropped.
    pending: Arc<AtomicUsize>,
}

impl Closer {
    /// Starts the closer thread.
    pub fn spawn() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Box<dyn Send>>();
        let pending = Arc::new(AtomicUsize::new(0));
        let count = pending.clone();
        std::thread::Builder::new()
            .name("csms-closer".into())
            .spawn(move || {
                while let Ok(item) = rx.recv() {
                    drop(item);
                    count.fetch_sub(1, Ordering::Relaxed);
                    metrics::gauge!("csms_connections_closing").decrement(1.0);
                }
            })?;
        Ok(Closer { tx, pending })
    }

    /// Drops `item` on the closer thread (here, should the thread be gone).
    pub fn close<T: Send + 'static>(&self, item: T) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("csms_connections_closing").increment(1.0);
        if let Err(mpsc::SendError(item)) = self.tx.send(Box::new(item)) {
            drop(item);
            self.pending.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("csms_connections_closing").decrement(1.0);
        }
    }

    /// Items handed over and not yet dropped.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        thread::ThreadId,
        time::{Duration, Instant},
    };

    use super::*;

    /// Reports the thread it is dropped on.
    struct Probe(mpsc::Sender<ThreadId>);

    impl Drop for Probe {
        fn drop(&mut self) {
            let _ = self.0.send(std::thread::current().id());
        }
    }

    #[test]
    fn drops_on_its_own_thread_and_counts_what_is_pending() {
        let closer = Closer::spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        for _ in 0..100 {
            closer.close(Probe(tx.clone()));
        }
        for _ in 0..100 {
            let on = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_ne!(on, std::thread::current().id());
        }
        let until = Instant::now() + Duration::from_secs(5);
        while closer.pending() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(closer.pending(), 0);
    }

    #[tokio::test]
    async fn closes_a_tokio_socket_from_its_thread() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let closer = Closer::spawn().unwrap();
        closer.close(server);
        // The peer sees the close: end-of-file, not a hang.
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut client, &mut buf),
        )
        .await
        .expect("the closed socket's FIN arrives")
        .unwrap();
        assert_eq!(n, 0);
    }
}
