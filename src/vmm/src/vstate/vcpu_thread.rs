//! vCPU threads: started before their vCPUs exist, so that the slowest
//! part of a thread's start, the kernel compiling its seccomp filter,
//! overlaps the caller creating the vCPUs; then driven over a channel
//! (paused → running → exited) and kicked out of KVM_RUN by a signal.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use super::vcpu::{install_kick_handler, kick_signal, Vcpu, VcpuError};
use super::vcpu_state::VcpuState;
use crate::seccomp::{self, SeccompMode, ThreadKind};

/// Commands to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave KVM_RUN, finish any half-done I/O, wait; answered `Paused`.
    Pause,
    /// Run the guest.
    Resume,
    /// Read the vCPU's state (paused only); answered `Saved`.
    Save,
    /// Leave the thread.
    Exit,
}

/// A vCPU thread's answers to `Pause` and `Save`.
#[derive(Debug)]
pub enum VcpuResponse {
    /// Out of KVM_RUN, state consistent, waiting.
    Paused,
    /// The state, or why it could not be read.
    Saved(Result<Box<VcpuState>, String>),
}

/// A started thread waiting for its vCPU.
struct Waiting {
    handle: VcpuHandle,
    vcpu: Sender<Vcpu>,
}

/// vCPU threads started ahead of their vCPUs. Each filters its syscalls
/// at once (the filter only names ioctl requests, not fds), then waits
/// for [`VcpuThreads::attach`]; dropped before that (the VM failed to
/// build), the threads end and are joined, so none is left behind.
pub struct VcpuThreads {
    waiting: Vec<Waiting>,
}

impl VcpuThreads {
    /// Starts `count` threads, named vcpu0.., filtered by `seccomp`.
    pub fn spawn(count: u8, seccomp: SeccompMode) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let mut threads = Self {
            waiting: Vec::with_capacity(usize::from(count)),
        };
        for index in 0..count {
            let (tx, rx) = channel();
            let (resp_tx, resp_rx) = channel();
            let (vcpu_tx, vcpu_rx) = channel::<Vcpu>();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let filtered = seccomp::install(ThreadKind::Vcpu, seccomp);
                    // No vCPU: the VM was not built.
                    if let Ok(vcpu) = vcpu_rx.recv() {
                        vcpu.run(rx, resp_tx, filtered);
                    }
                })
                .map_err(VcpuError::Spawn)?;
            threads.waiting.push(Waiting {
                handle: VcpuHandle {
                    index,
                    thread,
                    tx,
                    rx: Mutex::new(resp_rx),
                },
                vcpu: vcpu_tx,
            });
        }
        Ok(threads)
    }

    /// Hands vCPU i to thread i. The threads stay paused until
    /// `VcpuCommand::Resume`; one per vCPU is expected (extra threads end).
    pub fn attach(mut self, vcpus: Vec<Vcpu>) -> Vec<VcpuHandle> {
        let waiting = std::mem::take(&mut self.waiting);
        let mut handles = Vec::with_capacity(vcpus.len());
        let mut unused = Vec::new();
        let mut vcpus = vcpus.into_iter();
        for w in waiting {
            match vcpus.next() {
                Some(v) => {
                    // A thread that is gone (it panicked) is found when
                    // joined.
                    let _ = w.vcpu.send(v);
                    handles.push(w.handle);
                }
                None => unused.push(w),
            }
        }
        self.waiting = unused;
        handles
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        for w in std::mem::take(&mut self.waiting) {
            drop(w.vcpu);
            w.handle.join();
        }
    }
}

/// The controller's side of a vCPU thread.
pub struct VcpuHandle {
    index: u8,
    pub(crate) thread: JoinHandle<()>,
    tx: Sender<VcpuCommand>,
    rx: Mutex<Receiver<VcpuResponse>>,
}

impl VcpuHandle {
    /// Sends `cmd` and waits up to `timeout` for its answer; answers left
    /// over from an earlier command that timed out are dropped first.
    fn ask(&self, cmd: VcpuCommand, timeout: Duration) -> Result<VcpuResponse, String> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        while rx.try_recv().is_ok() {}
        self.send(cmd);
        let deadline = Instant::now() + timeout;
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "vCPU {} did not answer {cmd:?} within {} ms",
                self.index,
                timeout.as_millis()
            )),
            Err(RecvTimeoutError::Disconnected) => Err(format!("vCPU {} has stopped", self.index)),
        }
    }

    /// Pauses the vCPU and waits until it is out of the guest.
    pub fn pause(&self, timeout: Duration) -> Result<(), String> {
        match self.ask(VcpuCommand::Pause, timeout)? {
            VcpuResponse::Paused => Ok(()),
            other => Err(format!("vCPU {}: unexpected answer {other:?}", self.index)),
        }
    }

    /// Reads the state of the paused vCPU.
    pub fn save(&self, timeout: Duration) -> Result<Box<VcpuState>, String> {
        match self.ask(VcpuCommand::Save, timeout)? {
            VcpuResponse::Saved(r) => r,
            other => Err(format!("vCPU {}: unexpected answer {other:?}", self.index)),
        }
    }

    /// Sends a command and kicks the thread out of KVM_RUN.
    pub fn send(&self, cmd: VcpuCommand) {
        // A thread that already left has nothing to be told.
        let _ = self.tx.send(cmd);
        let _ = self.thread.kill(kick_signal());
    }

    /// Waits for the thread to end.
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads whose VM was not built end, and are joined, when dropped.
    fn ends_when_dropped(count: u8, mode: SeccompMode) {
        let threads = VcpuThreads::spawn(count, mode).unwrap();
        assert_eq!(threads.waiting.len(), usize::from(count));
        let (done_tx, done_rx) = channel();
        std::thread::spawn(move || {
            drop(threads);
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("unattached vCPU threads were not joined");
    }

    #[test]
    fn unattached_threads_end_when_dropped() {
        ends_when_dropped(2, SeccompMode::Off);
    }

    #[test]
    fn unattached_filtered_threads_end_when_dropped() {
        ends_when_dropped(1, SeccompMode::On);
    }

    #[test]
    fn attaching_no_vcpu_ends_the_threads() {
        let threads = VcpuThreads::spawn(2, SeccompMode::Off).unwrap();
        let handles = threads.attach(Vec::new());
        assert!(handles.is_empty());
    }
}
