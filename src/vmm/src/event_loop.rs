//! The VMM's event loop (one thread, event-manager): console input, the
//! VM's stop latch and termination signals.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::legacy::SerialDevice;
use crate::exit::VmExit;
use crate::sys::{sigmask, sigset};
use crate::vstate::vcpu::ExitLatch;

/// Signals that stop the VM when sent to the VMM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Sets `done` when the VM's latch fires.
pub struct ExitWatcher {
    latch: Arc<ExitLatch>,
    done: Arc<AtomicBool>,
}

impl ExitWatcher {
    /// Watches `latch`.
    pub fn new(latch: Arc<ExitLatch>, done: Arc<AtomicBool>) -> Self {
        Self { latch, done }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.latch.evt.read();
        self.done.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.latch.evt, EventSet::IN)) {
            tracing::error!("cannot watch the VM exit event: {e:?}");
        }
    }
}

/// Blocks `signals` in the calling thread and in the threads it spawns
/// afterwards (vCPUs), so they are only seen through a signalfd.
pub fn block_signals(signals: &[libc::c_int]) -> std::io::Result<()> {
    sigmask(libc::SIG_BLOCK, &sigset(signals), None)
}

/// Blocks `signals` and returns a non-blocking signalfd that reports them.
pub fn signalfd(signals: &[libc::c_int]) -> std::io::Result<OwnedFd> {
    block_signals(signals)?;
    let set = sigset(signals);
    // SAFETY: -1 asks for a new fd; `set` is initialised.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A signal read from a signalfd: its number, and who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalInfo {
    /// The signal number.
    pub signo: i32,
    /// `si_code`: > 0 when the kernel sent it (e.g. a terminal's ^C),
    /// <= 0 when a process did (kill(2), sigqueue(3), tgkill(2)).
    pub code: i32,
    /// The sending process, when a process sent it.
    pub pid: u32,
}

/// Reads one signal number from a signalfd; None if none is pending.
pub fn read_signal(fd: &OwnedFd) -> Option<i32> {
    read_signal_info(fd).map(|i| i.signo)
}

/// Reads one signal and its sender from a signalfd; None if none is
/// pending.
pub fn read_signal_info(fd: &OwnedFd) -> Option<SignalInfo> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: we read at most `size` bytes into `info`.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n as usize == size).then_some(SignalInfo {
        signo: info.ssi_signo as i32,
        code: info.ssi_code,
        pid: info.ssi_pid,
    })
}

/// Stops the VM when a stop signal arrives.
pub struct SignalWatcher {
    fd: OwnedFd,
    latch: Arc<ExitLatch>,
}

impl SignalWatcher {
    /// Watches `fd` (from `stop_signalfd`).
    pub fn new(fd: OwnedFd, latch: Arc<ExitLatch>) -> Self {
        Self { fd, latch }
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(sig) = read_signal(&self.fd) {
            self.latch.stop(VmExit::Killed(sig));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!("cannot watch signals: {e:?}");
        }
    }
}

/// A terminal in raw mode, its settings put back when dropped.
pub struct RawTerminal {
    _restore: SavedTerminal,
}

impl RawTerminal {
    /// Puts `fd` in raw mode if it is a terminal.
    pub fn enter(fd: RawFd) -> Option<Self> {
        let saved = SavedTerminal::save(fd)?;
        let mut raw = saved.saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so the host terminal renders "\n" sanely.
        raw.c_oflag = saved.saved.c_oflag;
        // SAFETY: `raw` is a valid termios for this fd.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { _restore: saved })
    }
}

/// A terminal's settings, put back when dropped.
pub struct SavedTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl SavedTerminal {
    /// The settings of `fd`, if it is a terminal.
    pub fn save(fd: RawFd) -> Option<Self> {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data, filled by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for SavedTerminal {
    fn drop(&mut self) {
        // SAFETY: restoring the settings read from the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Feeds host input (stdin) to the guest's UART, pausing while the UART's
/// receive FIFO is full.
pub struct ConsoleInput {
    input: RawFd,
    serial: Arc<Mutex<SerialDevice>>,
    fifo_drained: EventFd,
    input_registered: bool,
    eof: bool,
}

impl ConsoleInput {
    /// Reads `input` (not owned; usually stdin) into `serial`.
    pub fn new(input: RawFd, serial: Arc<Mutex<SerialDevice>>, fifo_drained: EventFd) -> Self {
        Self {
            input,
            serial,
            fifo_drained,
            input_registered: false,
            eof: false,
        }
    }

    fn register_input(&mut self, ops: &mut EventOps) {
        if self.eof || self.input_registered {
            return;
        }
        match ops.add(Events::with_data_raw(self.input, 0, EventSet::IN)) {
            Ok(()) => self.input_registered = true,
            // Regular files cannot be polled: no console input then.
            Err(e) => {
                tracing::debug!("console input not pollable: {e:?}");
                self.eof = true;
            }
        }
    }

    fn unregister_input(&mut self, ops: &mut EventOps) {
        if self.input_registered {
            let _ = ops.remove(Events::with_data_raw(self.input, 0, EventSet::IN));
            self.input_registered = false;
        }
    }

    fn pump(&mut self, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.fifo_capacity();
        if room == 0 {
            drop(serial);
            self.unregister_input(ops);
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        // SAFETY: reading at most `want` bytes into `buf`.
        let n = unsafe { libc::read(self.input, buf.as_mut_ptr() as *mut libc::c_void, want) };
        let gone = match n {
            0 => true,
            n if n < 0 => !matches!(
                std::io::Error::last_os_error().kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
            _ => false,
        };
        if gone {
            drop(serial);
            self.eof = true;
            self.unregister_input(ops);
            return;
        }
        if n > 0 {
            serial.enqueue(&buf[..n as usize]);
        }
        if serial.fifo_capacity() == 0 {
            drop(serial);
            self.unregister_input(ops);
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.fifo_drained.as_raw_fd() {
            let _ = self.fifo_drained.read();
            self.register_input(ops);
        } else if events.event_set().contains(EventSet::IN) {
            self.pump(ops);
        } else {
            // HUP/ERR without data: the input is gone.
            self.eof = true;
            self.unregister_input(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fifo_drained, EventSet::IN)) {
            tracing::error!("cannot watch the serial FIFO: {e:?}");
        }
        self.register_input(ops);
    }
}
