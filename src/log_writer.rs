//! Log lines leave the process on a thread of their own.
//!
//! `tracing`'s formatter writes each event with one `write` to stderr from
//! the thread that logged it. Under systemd or a container runtime stderr is
//! a pipe or socket; when the reader falls behind, that `write` blocks, and
//! a blocked runtime thread stalls every station whose task is queued on it.
//! A reconnect storm logs two lines per station (connected, disconnected),
//! hundreds of thousands in seconds. So events are handed over through a
//! bounded queue instead; when it is full a line is dropped and counted
//! (`csms_log_lines_dropped_total`, and a line saying how many once the
//! writer catches up): losing a log line is better than delaying an answer.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

/// Lines held while stderr is slow (at most ~100 bytes to 1 KiB each).
const QUEUE_LINES: usize = 65_536;
/// How long the end of `main` waits for queued lines to be written: a
/// stuck stderr must not keep the process from exiting.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// The `MakeWriter` for the formatter; cheap to clone.
#[derive(Clone)]
pub struct QueuedStderr {
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

/// Flushes what is queued when dropped (at the end of `main`), waiting at
/// most [`FLUSH_AT_EXIT`].
pub struct FlushOnDrop {
    tx: SyncSender<Vec<u8>>,
    finished: Receiver<()>,
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        // The formatter's senders live in the global subscriber, so the
        // writer is asked to stop with an empty line, queued behind the rest.
        let deadline = Instant::now() + FLUSH_AT_EXIT;
        let mut stop = Vec::new();
        loop {
            match self.tx.try_send(stop) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    stop = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = self
            .finished
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// Starts the writer thread, writing to `out`.
pub fn spawn(out: impl Write + Send + 'static) -> std::io::Result<(QueuedStderr, FlushOnDrop)> {
    spawn_with(out, QUEUE_LINES)
}

fn spawn_with(
    out: impl Write + Send + 'static,
    capacity: usize,
) -> std::io::Result<(QueuedStderr, FlushOnDrop)> {
    let (tx, rx) = sync_channel(capacity);
    let (done, finished) = sync_channel(1);
    let dropped = Arc::new(AtomicU64::new(0));
    let d = dropped.clone();
    std::thread::Builder::new()
        .name("csms-log".into())
        .spawn(move || {
            write_lines(rx, out, &d);
            let _ = done.send(());
        })?;
    Ok((
        QueuedStderr {
            tx: tx.clone(),
            dropped,
        },
        FlushOnDrop { tx, finished },
    ))
}

fn write_lines(rx: Receiver<Vec<u8>>, mut out: impl Write, dropped: &AtomicU64) {
    let mut reported = 0;
    while let Ok(line) = rx.recv() {
        if line.is_empty() {
            break;
        }
        let _ = out.write_all(&line);
        let lost = dropped.load(Ordering::Relaxed);
        if lost > reported {
            let _ = writeln!(
                out,
                "{} log lines dropped: stderr was slower than the node logged",
                lost - reported
            );
            reported = lost;
        }
    }
    let _ = out.flush();
}

/// One event's bytes, sent when the formatter is done with them.
pub struct Line<'a> {
    buf: Vec<u8>,
    queue: &'a QueuedStderr,
}

impl Write for Line<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self.queue.tx.try_send(std::mem::take(&mut self.buf)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.queue.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("csms_log_lines_dropped_total").increment(1);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueuedStderr {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            buf: Vec::new(),
            queue: self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An output that can be inspected, and held shut to act as a slow pipe.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log(w: &QueuedStderr, text: &str) {
        use tracing_subscriber::fmt::MakeWriter;
        let mut line = w.make_writer();
        line.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn lines_arrive_in_order_and_are_flushed_on_drop() {
        let sink = Sink::default();
        let (w, guard) = spawn_with(sink.clone(), 16).unwrap();
        for i in 0..10 {
            log(&w, &format!("line {i}\n"));
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let expected: String = (0..10).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
    }

    #[test]
    fn a_stuck_output_drops_lines_instead_of_blocking_the_logger() {
        let sink = Sink::default();
        let held = sink.0.lock().unwrap();
        let (w, guard) = spawn_with(sink.clone(), 4).unwrap();
        // The writer thread takes one line and blocks on the held output;
        // four more fill the queue; the rest must return at once, dropped.
        let started = std::time::Instant::now();
        for i in 0..100 {
            log(&w, &format!("line {i}\n"));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let dropped = w.dropped.load(Ordering::Relaxed);
        assert!((95..=96).contains(&dropped), "dropped {dropped}");
        drop(held);
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("line 0\n"), "{text}");
        assert!(
            text.contains(&format!("{dropped} log lines dropped")),
            "{text}"
        );
    }

    #[test]
    fn a_stuck_output_does_not_hold_up_the_exit() {
        let sink = Sink::default();
        let held = sink.0.lock().unwrap();
        let (w, guard) = spawn_with(sink.clone(), 4).unwrap();
        for i in 0..10 {
            log(
                &w,
                &format!(
                    "line {i}
"
                ),
            );
        }
        let started = Instant::now();
        drop(guard);
        let waited = started.elapsed();
        assert!(
            waited >= FLUSH_AT_EXIT && waited < FLUSH_AT_EXIT + Duration::from_secs(1),
            "{waited:?}"
        );
        drop(held);
    }
}
