//! Guest console output to a writer that may stall (a pipe nobody reads,
//! a suspended terminal). The UART is written by vCPU threads holding the
//! serial device's lock, which the event loop takes too: a blocking write
//! there would freeze the vCPU and then the event loop (SIGTERM, vsock,
//! disks). So bytes go into a bounded queue that a thread of its own
//! drains; when the queue is full the guest's bytes are dropped, as a UART
//! without flow control drops them, and a note says how many.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::seccomp::{self, SeccompMode, ThreadKind};

/// Bytes the queue holds before it drops.
pub const CONSOLE_QUEUE_CAP: usize = 1 << 20;
/// How long `flush` waits for the writer (at VM teardown).
pub const FLUSH_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    queue: VecDeque<u8>,
    /// Bytes dropped since the last note.
    dropped: u64,
    /// The writer holds bytes it took and has not written yet.
    writing: bool,
    /// The producer is gone: drain and stop.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    cap: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The producer side: never blocks on the writer.
pub struct QueuedConsole {
    shared: Arc<Shared>,
}

impl QueuedConsole {
    /// Starts the thread that writes queued bytes to `out`; it filters its
    /// syscalls per `seccomp`.
    pub fn spawn(
        mut out: Box<dyn Write + Send>,
        cap: usize,
        seccomp: SeccompMode,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            cap,
        });
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                block_all_signals();
                if let Err(e) = seccomp::install(ThreadKind::Console, seccomp) {
                    tracing::warn!("console output stops: {e}");
                    return;
                }
                writer(&s, out.as_mut())
            })?;
        Ok(Self { shared })
    }
}

/// Signals (SIGTERM and the like) are the event loop's to take, through
/// its signalfd: this thread, started before they are blocked, must not
/// take one and die of it.
fn block_all_signals() {
    // SAFETY: sigfillset initialises `set`; pthread_sigmask only changes
    // this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn writer(s: &Shared, out: &mut dyn Write) {
    loop {
        let (bytes, dropped) = {
            let mut st = s.lock();
            while st.queue.is_empty() && st.dropped == 0 && !st.closed {
                st = s.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.queue.is_empty() && st.dropped == 0 {
                return;
            }
            st.writing = true;
            let bytes: Vec<u8> = st.queue.drain(..).collect();
            (bytes, std::mem::take(&mut st.dropped))
        };
        s.changed.notify_all();
        let mut ok = out.write_all(&bytes).is_ok();
        if dropped > 0 {
            let note = format!("\n[husk: {dropped} console bytes dropped: output was not read]\n");
            ok &= out.write_all(note.as_bytes()).is_ok();
        }
        ok &= out.flush().is_ok();
        if !ok {
            tracing::debug!("console output failed; the bytes are lost");
        }
        s.lock().writing = false;
        s.changed.notify_all();
    }
}

impl Write for QueuedConsole {
    /// Queues what fits; the rest is counted as dropped. Claims every byte
    /// (the guest must not notice).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.shared.lock();
        let room = self.shared.cap.saturating_sub(st.queue.len());
        let take = room.min(buf.len());
        st.queue.extend(&buf[..take]);
        st.dropped += (buf.len() - take) as u64;
        drop(st);
        self.shared.changed.notify_all();
        Ok(buf.len())
    }

    /// Waits until the writer has written everything queued, at most
    /// `FLUSH_WAIT` (a stalled reader must not hold up the VM's teardown).
    fn flush(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + FLUSH_WAIT;
        let mut st = self.shared.lock();
        while !st.queue.is_empty() || st.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "console output is not being read",
                ));
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

impl Drop for QueuedConsole {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A writer that blocks until released, then records.
    struct Gate {
        open: mpsc::Receiver<()>,
        seen: Arc<Mutex<Vec<u8>>>,
    }
    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.open.recv();
            self.seen.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn gated(cap: usize) -> (QueuedConsole, mpsc::Sender<()>, Arc<Mutex<Vec<u8>>>) {
        let (tx, rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gate = Gate {
            open: rx,
            seen: seen.clone(),
        };
        let q = QueuedConsole::spawn(Box::new(gate), cap, SeccompMode::Off).unwrap();
        (q, tx, seen)
    }

    #[test]
    fn a_stalled_writer_never_blocks_the_guest_and_drops_are_counted() {
        let (mut q, release, seen) = gated(100);
        // The writer takes the first byte and blocks on the gate.
        q.write_all(b"a").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !q.shared.lock().writing {
            assert!(Instant::now() < deadline, "the writer never took the byte");
            std::thread::yield_now();
        }
        let t = Instant::now();
        for _ in 0..10_000 {
            q.write_all(b"0123456789").unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(5), "writes blocked");
        assert!(q.flush().is_err(), "a stalled writer times the flush out");
        drop(release);
        q.flush().unwrap();
        let out = String::from_utf8(seen.lock().unwrap().clone()).unwrap();
        assert!(out.starts_with("a0123456789"), "{out}");
        // 100 bytes queued, the other 99,900 dropped and reported.
        assert!(
            out.ends_with("\n[husk: 99900 console bytes dropped: output was not read]\n"),
            "{out}"
        );
        assert_eq!(out.matches("0123456789").count(), 10);
    }

    #[test]
    fn everything_queued_is_written_in_order_before_flush_returns() {
        let (mut q, release, seen) = gated(1 << 20);
        std::thread::spawn(move || while release.send(()).is_ok() {});
        let mut want = Vec::new();
        for i in 0..2000u32 {
            let line = format!("line {i}\n");
            q.write_all(line.as_bytes()).unwrap();
            want.extend_from_slice(line.as_bytes());
        }
        q.flush().unwrap();
        assert_eq!(*seen.lock().unwrap(), want);
    }
}
