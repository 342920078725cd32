//! A container process's stdio and signals between the host's fds and the
//! agent's streams: output relayed in threads, stdin relayed, the
//! terminal's size passed on, signals forwarded. Used by `husk run`'s
//! session and by `husk exec`.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use husk_proto::{ResizeTty, Signal, StreamKind};

use crate::run::CONTAINER_ID;
use crate::RuntimeError;

/// Attaches a process's streams to fds 0-2: output relayed in threads,
/// fd 0 relayed when `interactive`; a pty when `tty` (fd 0 in raw mode
/// when `host_terminal`).
pub(crate) fn attach_stdio(
    open: &(dyn Fn(StreamKind) -> Result<UnixStream, RuntimeError> + Sync),
    tty: bool,
    interactive: bool,
    host_terminal: bool,
) -> Result<(Relays, Option<husk_vmm::event_loop::RawTerminal>), RuntimeError> {
    let mut relays = Relays::default();
    let mut raw_terminal = None;
    if tty {
        let s = open(StreamKind::Pty)?;
        if host_terminal {
            raw_terminal = husk_vmm::event_loop::RawTerminal::enter(libc::STDIN_FILENO);
        }
        relays.spawn(clone(&s)?, std::io::stdout());
        if interactive {
            spawn_stdin(s, false);
        }
    } else {
        // At once: each stream is a vsock connection and a hello, two round
        // trips through the guest, slow where its kernel is emulated.
        let (out, err, stdin) = std::thread::scope(|s| {
            let err = s.spawn(|| open(StreamKind::Stderr));
            let stdin = interactive.then(|| s.spawn(|| open(StreamKind::Stdin)));
            let out = open(StreamKind::Stdout);
            let join = |h: std::thread::ScopedJoinHandle<'_, _>| {
                h.join()
                    .unwrap_or_else(|_| Err(RuntimeError::Invalid("stream thread panicked".into())))
            };
            (out, join(err), stdin.map(join))
        });
        let (out, err) = (out?, err?);
        let stdin = stdin.transpose()?;
        relays.spawn(out, std::io::stdout());
        relays.spawn(err, std::io::stderr());
        if let Some(s) = stdin {
            spawn_stdin(s, true);
        }
    }
    Ok((relays, raw_terminal))
}

/// Streams opened while their container is still being created (the
/// agent answers their hellos once it exists): if the create fails, they
/// are cut short, so that none waits out its time for a container that
/// will not come.
#[derive(Default)]
pub(crate) struct Opening(Mutex<(bool, Vec<UnixStream>)>);

impl Opening {
    /// Notes a connected stream; refused once [`Self::abort`] ran.
    pub(crate) fn add(&self, s: &UnixStream) -> Result<(), RuntimeError> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 {
            return Err(RuntimeError::Invalid(
                "the container was not created".into(),
            ));
        }
        g.1.push(clone(s)?);
        Ok(())
    }

    /// Shuts down every stream noted, and any noted later.
    pub(crate) fn abort(&self) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = true;
        for s in g.1.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn clone(s: &UnixStream) -> Result<UnixStream, RuntimeError> {
    s.try_clone()
        .map_err(|e| RuntimeError::Io("vsock stream".into(), e))
}

/// Threads copying guest output streams to host writers until EOF.
pub(crate) struct Relays {
    tx: mpsc::Sender<()>,
    rx: mpsc::Receiver<()>,
    running: usize,
}

impl Default for Relays {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Relays { tx, rx, running: 0 }
    }
}

impl Relays {
    /// Copies `from` to `to` until EOF, in a thread.
    fn spawn<W: Write + Send + 'static>(&mut self, mut from: UnixStream, mut to: W) {
        let done = self.tx.clone();
        self.running += 1;
        std::thread::spawn(move || {
            let mut buf = [0u8; 32 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let _ = to.flush();
                    }
                }
            }
            let _ = done.send(());
        });
    }

    /// Waits up to `timeout` for every stream to end. Threads still
    /// running end when the VM stops (their sockets close).
    pub(crate) fn wait(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.rx.recv_timeout(left).is_err() {
                tracing::warn!("{} output stream(s) still open; not waiting", self.running);
                return;
            }
            self.running -= 1;
        }
    }
}

/// Copies husk's stdin to the stream; at EOF half-closes it (the
/// container sees EOF) when `eof_closes`.
fn spawn_stdin(mut to: UnixStream, eof_closes: bool) {
    // Not joined: a read on a terminal cannot be interrupted; the thread
    // ends with the process.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        if eof_closes {
            let _ = to.shutdown(Shutdown::Write);
        }
    });
}

pub(crate) fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data filled by the ioctl.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the pointer we pass.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Passes the size of the terminal at fd 1 on to the process's terminal
/// in the guest whenever it changes (checked every [`WINSIZE_POLL`]: a
/// caller's resize of a console socket's master raises no signal here),
/// until `done`.
pub(crate) fn watch_winsize(
    mut client: husk_proto::Client<UnixStream>,
    exec_id: Option<String>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut last = None;
        while !done.load(Ordering::SeqCst) {
            let now = terminal_size();
            if now.is_some() && now != last {
                let (rows, cols) = now.unwrap_or_default();
                let r = client.resize_tty(ResizeTty {
                    container_id: CONTAINER_ID.into(),
                    exec_id: exec_id.clone(),
                    rows,
                    cols,
                });
                if let Err(e) = r {
                    tracing::debug!("terminal resize: {e}");
                    return;
                }
                last = now;
            }
            std::thread::sleep(WINSIZE_POLL);
        }
    })
}

/// How often a terminal's size is checked.
const WINSIZE_POLL: Duration = Duration::from_millis(200);

/// Waits up to `timeout_ms` for signals meant for the container and
/// returns them: from `fd`, and with `relayed` (`husk run`'s VM process)
/// processes' signals from there instead, one byte each: `husk run`
/// relays what it is sent, and the copy a process-group kill also delivers
/// to `fd` is dropped, so the container gets one (a relayed copy sent here
/// as a signal could merge with it). `relayed` becomes None once `husk
/// run` is gone (its VM goes with it) or broke the channel.
pub(crate) fn next_signals(
    fd: &OwnedFd,
    relayed: &mut Option<&UnixStream>,
    timeout_ms: i32,
) -> Vec<i32> {
    let mut out = Vec::new();
    let mut pfds = [fd.as_raw_fd(), relayed.map_or(-1, |r| r.as_raw_fd())].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: two pollfds (a negative fd is skipped).
    if unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout_ms) } <= 0 {
        return out;
    }
    if pfds[0].revents != 0 {
        if let Some(info) = husk_vmm::event_loop::read_signal_info(fd) {
            if relayed.is_some() && crate::run_vm::sent_by_a_process(&info) {
                tracing::debug!(
                    "signal {} from pid {}: relayed instead",
                    info.signo,
                    info.pid
                );
            } else {
                out.push(info.signo);
            }
        }
    }
    if pfds[1].revents != 0 {
        let mut buf = [0u8; 64];
        match relayed.as_mut().map(|r| r.read(&mut buf)) {
            Some(Ok(n)) if n > 0 => out.extend(
                buf[..n]
                    .iter()
                    .map(|&b| i32::from(b))
                    .filter(|s| crate::run::FORWARDED.contains(s)),
            ),
            _ => *relayed = None,
        }
    }
    out
}

/// Forwards signals from `fd` (and `relayed`: see [`next_signals`]) to the
/// container until `done`.
pub(crate) fn forward_signals(
    fd: OwnedFd,
    mut client: husk_proto::Client<UnixStream>,
    relayed: Option<UnixStream>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut relayed = relayed.as_ref();
        while !done.load(Ordering::SeqCst) {
            for signal in next_signals(&fd, &mut relayed, 100) {
                if let Err(e) = client.signal(Signal {
                    container_id: CONTAINER_ID.into(),
                    exec_id: None,
                    signal,
                }) {
                    tracing::warn!("forwarding signal {signal}: {e}");
                }
            }
        }
    })
}

/// Until `done`, watches for a signal meant for the container (see
/// [`next_signals`]) while it is being set up: the first one is kept in
/// `caught` and `stop` is called (the VM stopped, so that whatever waits
/// on the guest ends at once). A container asked to stop before it
/// started is not started.
pub(crate) fn stop_on_signal(
    fd: &OwnedFd,
    mut relayed: Option<&UnixStream>,
    done: &AtomicBool,
    caught: &std::sync::atomic::AtomicI32,
    stop: &dyn Fn(),
) {
    while !done.load(Ordering::SeqCst) {
        if let Some(&signal) = next_signals(fd, &mut relayed, 100).first() {
            caught.store(signal, Ordering::SeqCst);
            stop();
            return;
        }
    }
}
