//! Standard output that can never stop the ring buffer from draining.
//!
//! Lines are formatted into a buffer on the run loop's thread and handed, one buffer per loop
//! turn, to a writer thread through a queue bounded in bytes. When whatever reads our output
//! (a terminal scrolled back, a pipe into a slow program) stops taking it, the queue fills and
//! further buffers are dropped and counted, instead of the loop blocking in `write()` while the
//! kernel's ring buffer fills up and loses events for everyone.

use std::{
    io::{self, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Bytes waiting for the writer at most.
const QUEUE_BYTES: usize = tcpclose_common::OUTPUT_QUEUE_BYTES;
/// How long the final flush waits for a reader that does not read.
const FINAL_WAIT: Duration = Duration::from_secs(2);

/// The writer thread's end and what both ends share.
pub struct Output {
    /// Formatted lines not yet handed over.
    pub buf: Vec<u8>,
    queue: Option<SyncSender<Vec<u8>>>,
    queued: Arc<AtomicUsize>,
    /// Set by the writer when the reader went away (EPIPE).
    closed: Arc<AtomicBool>,
    writer: Option<JoinHandle<io::Result<()>>>,
    /// Lines dropped because the queue was full.
    pub lines_dropped: u64,
}

impl Output {
    /// Writes to standard output from a thread of its own.
    pub fn stdout() -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4096);
        let queued = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        let writer = {
            let (queued, closed) = (queued.clone(), closed.clone());
            thread::Builder::new()
                .name("tcpclose-output".into())
                .spawn(move || write_all(rx, io::stdout().lock(), &queued, &closed))?
        };
        Ok(Self {
            buf: Vec::with_capacity(64 << 10),
            queue: Some(tx),
            queued,
            closed,
            writer: Some(writer),
            lines_dropped: 0,
        })
    }

    /// Whether the reader is still there.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
    }

    /// Hands the buffered lines to the writer; drops and counts them if it is too far behind.
    pub fn hand_over(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(64 << 10));
        let len = chunk.len();
        let Some(queue) = &self.queue else {
            return;
        };
        if self.queued.load(Ordering::Relaxed) + len > QUEUE_BYTES {
            self.lines_dropped += lines(&chunk);
            return;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        match queue.try_send(chunk) {
            Ok(()) => {}
            Err(TrySendError::Full(chunk) | TrySendError::Disconnected(chunk)) => {
                self.queued.fetch_sub(len, Ordering::Relaxed);
                if self.is_open() {
                    self.lines_dropped += lines(&chunk);
                }
            }
        }
    }

    /// Hands over what is left, then waits (a little) for the writer to finish. Returns whether
    /// everything was written, or the writer's error if it had one other than the reader going
    /// away.
    pub fn finish(&mut self) -> io::Result<bool> {
        if !self.buf.is_empty()
            && let Some(queue) = &self.queue
        {
            let chunk = std::mem::take(&mut self.buf);
            // The run is over: waiting for room is fine, forever is not (see below).
            let _ = queue.send(chunk);
        }
        self.queue = None;
        let Some(writer) = self.writer.take() else {
            return Ok(false);
        };
        let deadline = Instant::now() + FINAL_WAIT;
        while !writer.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if !writer.is_finished() {
            // A reader that takes nothing: leave the thread to the process's exit.
            return Ok(false);
        }
        match writer.join() {
            Ok(Ok(())) => Ok(self.lines_dropped == 0),
            Ok(Err(err)) if err.kind() != io::ErrorKind::BrokenPipe => Err(err),
            _ => Ok(false),
        }
    }
}

fn lines(chunk: &[u8]) -> u64 {
    chunk.iter().filter(|&&b| b == b'\n').count() as u64
}

fn write_all(
    rx: Receiver<Vec<u8>>,
    mut out: impl Write,
    queued: &AtomicUsize,
    closed: &AtomicBool,
) -> io::Result<()> {
    for chunk in rx {
        let result = out.write_all(&chunk).and_then(|()| out.flush());
        queued.fetch_sub(chunk.len(), Ordering::Relaxed);
        if let Err(err) = result {
            closed.store(true, Ordering::Relaxed);
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lines() {
        assert_eq!(lines(b"a\nb\nc"), 2);
        assert_eq!(lines(b""), 0);
    }

    /// A writer that blocks until released, like a pipe nobody reads.
    struct Stuck(Arc<AtomicBool>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            while !self.0.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(1));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_reader_drops_and_counts_instead_of_blocking() {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4096);
        let queued = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        let writer = {
            let (queued, closed, release) = (queued.clone(), closed.clone(), release.clone());
            thread::spawn(move || write_all(rx, Stuck(release), &queued, &closed))
        };
        let mut out = Output {
            buf: Vec::new(),
            queue: Some(tx),
            queued,
            closed,
            writer: Some(writer),
            lines_dropped: 0,
        };
        let started = Instant::now();
        let line = vec![b'x'; 1023];
        for _ in 0..(QUEUE_BYTES / 1024) * 2 {
            out.buf.extend_from_slice(&line);
            out.buf.push(b'\n');
            out.hand_over();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "handing over must not wait for the reader"
        );
        assert!(
            out.lines_dropped >= (QUEUE_BYTES / 1024) as u64 - 1,
            "{}",
            out.lines_dropped
        );
        release.store(true, Ordering::Relaxed);
        assert!(!out.finish().unwrap(), "lines were dropped");
    }
}
