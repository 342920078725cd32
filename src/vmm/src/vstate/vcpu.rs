//! vCPUs: creation, the run loop and its exits, and the kick signal that
//! takes a thread out of KVM_RUN (the threads: [`super::vcpu_thread`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_lapic_state, CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::bus::Bus;
use super::profile::Profiler;
use super::vcpu_state::{VcpuState, VcpuStateError};
use crate::arch::x86_64::{cpuid, msrs, regs};
use crate::exit::VmExit;
use crate::seccomp::SeccompError;

pub use super::vcpu_thread::{VcpuCommand, VcpuHandle, VcpuResponse, VcpuThreads};

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {0}: {1} failed: {2}")]
    Ioctl(u8, &'static str, #[source] kvm_ioctls::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The snapshot's state could not be written into the vCPU.
    #[error("vCPU {0}: restoring its state: {1}")]
    State(u8, #[source] VcpuStateError),
}

/// What the exit handler wants the run loop to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// Stop the VM for this reason.
    Stop(VmExit),
}

/// Rate limit for "unhandled access" log lines: the first few are logged,
/// then one in every `UNHANDLED_LOG_EVERY`.
const UNHANDLED_LOG_FIRST: u64 = 16;
const UNHANDLED_LOG_EVERY: u64 = 10_000;

/// Port and MMIO buses, shared by all vCPUs.
pub struct VcpuIo {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    unhandled: AtomicU64,
}

impl VcpuIo {
    /// Buses for the vCPUs.
    pub fn new(pio: Bus, mmio: Bus) -> Self {
        Self {
            pio,
            mmio,
            unhandled: AtomicU64::new(0),
        }
    }

    /// How many guest accesses no device claimed.
    pub fn unhandled_count(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    fn note_unhandled(&self, kind: &str, addr: u64, len: usize) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        if n < UNHANDLED_LOG_FIRST || n % UNHANDLED_LOG_EVERY == 0 {
            tracing::info!(
                "unhandled guest {kind} at {addr:#x} ({len} bytes), ignored (#{})",
                n + 1
            );
        }
    }
}

/// Handles one VM exit. A free function so tests can drive it.
pub fn handle_exit(exit: VcpuExit<'_>, io: &VcpuIo, vcpu: u8) -> ExitAction {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if !io.pio.write(u64::from(port), data) {
                io.note_unhandled("port write", u64::from(port), data.len());
            }
            ExitAction::Continue
        }
        VcpuExit::IoIn(port, data) => {
            if !io.pio.read(u64::from(port), data) {
                data.fill(0xff);
                io.note_unhandled("port read", u64::from(port), data.len());
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !io.mmio.write(addr, data) {
                io.note_unhandled("MMIO write", addr, data.len());
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !io.mmio.read(addr, data) {
                data.fill(0xff);
                io.note_unhandled("MMIO read", addr, data.len());
            }
            ExitAction::Continue
        }
        // Only reached without an in-kernel LAPIC: nothing can wake the vCPU.
        VcpuExit::Hlt => ExitAction::Stop(VmExit::GuestShutdown),
        VcpuExit::Shutdown => ExitAction::Stop(VmExit::TripleFault { vcpu }),
        VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_RESET => {
            ExitAction::Stop(VmExit::GuestReset)
        }
        VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
            ExitAction::Stop(VmExit::GuestShutdown)
        }
        VcpuExit::FailEntry(reason, _) => ExitAction::Stop(VmExit::FailEntry { vcpu, reason }),
        VcpuExit::InternalError => ExitAction::Stop(VmExit::InternalError {
            vcpu,
            suberror: 0,
            rip: 0,
            insn: Vec::new(),
        }),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitAction::Continue,
        other => ExitAction::Stop(VmExit::Unexpected {
            vcpu,
            what: format!("{other:?}"),
        }),
    }
}

/// Where a VM's stop reason is recorded: the first reason wins and wakes
/// the controller through `evt`.
pub struct ExitLatch {
    reason: Mutex<Option<VmExit>>,
    /// Written once when a reason is recorded.
    pub evt: EventFd,
    /// CLOCK_MONOTONIC nanoseconds of the first KVM_RUN (0 = not yet).
    pub first_run_ns: AtomicU64,
}

impl ExitLatch {
    /// A fresh latch.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: crate::sys::eventfd()?,
            first_run_ns: AtomicU64::new(0),
        })
    }

    /// Records `reason` unless one is already recorded.
    pub fn stop(&self, reason: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
            // A full eventfd counter still leaves it readable: nothing to do on error.
            let _ = self.evt.write(1);
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// CLOCK_MONOTONIC in nanoseconds (comparable across processes).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only to the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

thread_local! {
    /// The running vCPU's `kvm_run.immediate_exit`, for the kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = IMMEDIATE_EXIT.with(|c| c.get());
    if !ptr.is_null() {
        // SAFETY: the pointer targets this thread's kvm_run mapping, which
        // lives as long as the thread's VcpuFd; it is cleared before the
        // fd is dropped. A volatile byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(ptr, 1) };
    }
}

/// The signal that kicks vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: AtomicU32 = AtomicU32::new(0);
    if INSTALLED.swap(1, Ordering::SeqCst) == 0 {
        register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)?;
    }
    Ok(())
}

/// What every vCPU of a VM shares: its buses, memory, stop latch, RIP
/// sampler and the MSRs a snapshot reads.
#[derive(Clone)]
pub struct VcpuShared {
    /// Port and MMIO buses.
    pub io: Arc<VcpuIo>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Where a stop reason goes.
    pub latch: Arc<ExitLatch>,
    /// The RIP sampler.
    pub profiler: Arc<Profiler>,
    /// MSRs KVM can save (KVM_GET_MSR_INDEX_LIST).
    pub msr_indices: Arc<Vec<u32>>,
}

/// One vCPU, before its thread starts.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    cpuid: CpuId,
    io: Arc<VcpuIo>,
    mem: GuestMemoryMmap,
    latch: Arc<ExitLatch>,
    profiler: Arc<Profiler>,
    msr_indices: Arc<Vec<u32>>,
}

impl Vcpu {
    /// Creates vCPU `index` with normalised CPUID and boot MSRs; the boot
    /// vCPU (index 0) also gets the 64-bit entry state.
    pub fn new(
        vm: &VmFd,
        index: u8,
        count: u8,
        base_cpuid: &CpuId,
        no_hypercalls: bool,
        boot_entry: Option<GuestAddress>,
        shared: VcpuShared,
    ) -> Result<Self, VcpuError> {
        let err = |what| move |e| VcpuError::Ioctl(index, what, e);
        let mut cpuid = base_cpuid.clone();
        cpuid::normalize(&mut cpuid, index, count, no_hypercalls);
        let v = Self::create(vm, index, cpuid, shared)?;
        v.fd.set_msrs(&msrs::boot_msrs(&v.msr_indices))
            .map_err(err("KVM_SET_MSRS"))?;
        set_lint(&v.fd).map_err(err("KVM_SET_LAPIC"))?;
        if let Some(entry) = boot_entry {
            v.fd.set_regs(&regs::boot_regs(entry))
                .map_err(err("KVM_SET_REGS"))?;
            let mut sregs = v.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
            regs::configure_sregs(&mut sregs);
            v.fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
            v.fd.set_fpu(&regs::boot_fpu())
                .map_err(err("KVM_SET_FPU"))?;
        }
        Ok(v)
    }

    /// Creates vCPU `index` from a snapshot's `state`.
    pub fn restore(
        vm: &VmFd,
        index: u8,
        state: &VcpuState,
        shared: VcpuShared,
    ) -> Result<Self, VcpuError> {
        let cpuid = state.cpuid().map_err(|e| VcpuError::State(index, e))?;
        let v = Self::create(vm, index, cpuid, shared)?;
        state
            .restore(&v.fd)
            .map_err(|e| VcpuError::State(index, e))?;
        Ok(v)
    }

    fn create(vm: &VmFd, index: u8, cpuid: CpuId, shared: VcpuShared) -> Result<Self, VcpuError> {
        let err = |what| move |e| VcpuError::Ioctl(index, what, e);
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        Ok(Self {
            index,
            fd,
            cpuid,
            io: shared.io,
            mem: shared.mem,
            latch: shared.latch,
            profiler: shared.profiler,
            msr_indices: shared.msr_indices,
        })
    }

    /// The thread's loop: paused until `VcpuCommand::Resume`. Unfiltered
    /// (`filtered` is the error), the guest never runs: the VM stops with
    /// the reason and this thread only waits for its exit.
    pub(super) fn run(
        mut self,
        rx: Receiver<VcpuCommand>,
        resp: Sender<VcpuResponse>,
        filtered: Result<(), SeccompError>,
    ) {
        let ptr = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        IMMEDIATE_EXIT.with(|c| c.set(ptr));
        let mut running = false;
        let filtered = match filtered {
            Ok(()) => true,
            Err(e) => {
                self.latch.stop(VmExit::VmmError(e.to_string()));
                false
            }
        };
        loop {
            if !running {
                match rx.recv() {
                    Ok(VcpuCommand::Resume) => running = filtered,
                    Ok(VcpuCommand::Pause) => {
                        let _ = resp.send(VcpuResponse::Paused);
                    }
                    Ok(VcpuCommand::Save) => {
                        let saved = VcpuState::save(&self.fd, &self.cpuid, &self.msr_indices)
                            .map(Box::new)
                            .map_err(|e| format!("vCPU {}: {e}", self.index));
                        let _ = resp.send(VcpuResponse::Saved(saved));
                    }
                    Ok(VcpuCommand::Exit) | Err(_) => break,
                }
                continue;
            }
            match rx.try_recv() {
                Ok(VcpuCommand::Pause) => {
                    running = false;
                    self.settle();
                    let _ = resp.send(VcpuResponse::Paused);
                    continue;
                }
                Ok(VcpuCommand::Save) => {
                    let _ = resp.send(VcpuResponse::Saved(Err(format!(
                        "vCPU {} is running: pause the VM first",
                        self.index
                    ))));
                }
                Ok(VcpuCommand::Exit) | Err(TryRecvError::Disconnected) => break,
                Ok(VcpuCommand::Resume) | Err(TryRecvError::Empty) => {}
            }
            if self.latch.first_run_ns.load(Ordering::Relaxed) == 0 {
                let _ = self.latch.first_run_ns.compare_exchange(
                    0,
                    monotonic_ns(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(exit, &self.io, self.index),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    if self.profiler.hz() > 0 {
                        if let Ok(regs) = self.fd.get_regs() {
                            self.profiler.record(self.index, regs.rip);
                        }
                    }
                    ExitAction::Continue
                }
                Err(e) => ExitAction::Stop(VmExit::VmmError(format!(
                    "KVM_RUN failed on vCPU {}: {e}",
                    self.index
                ))),
            };
            if let ExitAction::Stop(reason) = action {
                let reason = self.complete(reason);
                tracing::debug!("vCPU {} stops the VM: {reason}", self.index);
                self.latch.stop(reason);
                running = false;
            }
        }
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }

    /// Completes a port or MMIO access KVM left half done (a read's value
    /// is only stored into the register on the next KVM_RUN) without
    /// running another guest instruction, so that the state a snapshot
    /// reads is consistent.
    fn settle(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => tracing::warn!("vCPU {}: settling before a pause: {e}", self.index),
            Ok(_) => tracing::debug!("vCPU {}: exit while settling", self.index),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Fills in what the exit handler could not see: KVM's internal error
    /// details and the bytes at RIP.
    fn complete(&mut self, reason: VmExit) -> VmExit {
        match reason {
            VmExit::InternalError { vcpu, .. } => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the union is the one KVM filled.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                let insn = self.bytes_at(rip);
                VmExit::InternalError {
                    vcpu,
                    suberror,
                    rip,
                    insn,
                }
            }
            other => other,
        }
    }

    fn bytes_at(&self, rip: u64) -> Vec<u8> {
        let Ok(tr) = self.fd.translate_gva(rip) else {
            return Vec::new();
        };
        if tr.valid == 0 {
            return Vec::new();
        }
        let mut buf = [0u8; 16];
        match self
            .mem
            .read_slice(&mut buf, GuestAddress(tr.physical_address))
        {
            Ok(()) => buf.to_vec(),
            Err(_) => Vec::new(),
        }
    }
}

/// Routes LINT0 to ExtINT and LINT1 to NMI, as the MP table says.
fn set_lint(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = fd.get_lapic()?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let v = lapic_reg(&lapic, reg);
        set_lapic_reg(&mut lapic, reg, (v & !0x700) | (mode << 8));
    }
    fd.set_lapic(&lapic)
}

fn lapic_reg(l: &kvm_lapic_state, reg: usize) -> u32 {
    let b: Vec<u8> = l.regs[reg..reg + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, reg: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        l.regs[reg + i] = *byte as _;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::bus::BusDevice;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(0x42);
        }
        fn write(&mut self, _o: u64, d: &[u8]) {
            self.0.extend_from_slice(d);
        }
    }

    #[test]
    fn io_exits_go_through_the_buses() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut pio = Bus::new();
        pio.insert(dev.clone(), 0x3f8, 8).unwrap();
        let io = VcpuIo::new(pio, Bus::new());
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"h"), &io, 0),
            ExitAction::Continue
        );
        assert_eq!(dev.lock().unwrap().0, b"h");
        let mut d = [0u8; 1];
        handle_exit(VcpuExit::IoIn(0x3f9, &mut d), &io, 0);
        assert_eq!(d[0], 0x42);
        // Unclaimed reads float high and are counted, never fatal.
        let mut d = [0u8; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x80, &mut d), &io, 0),
            ExitAction::Continue
        );
        assert_eq!(d, [0xff, 0xff]);
        let mut d = [0u8; 4];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut d), &io, 0),
            ExitAction::Continue
        );
        assert_eq!(io.unhandled_count(), 2);
    }

    #[test]
    fn fatal_exits_stop_with_the_right_reason() {
        let io = VcpuIo::new(Bus::new(), Bus::new());
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &io, 1),
            ExitAction::Stop(VmExit::TripleFault { vcpu: 1 })
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), &io, 0),
            ExitAction::Stop(VmExit::GuestReset)
        );
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &io, 0),
            ExitAction::Stop(VmExit::InternalError { .. })
        ));
        assert!(matches!(
            handle_exit(VcpuExit::Unknown, &io, 0),
            ExitAction::Stop(VmExit::Unexpected { .. })
        ));
    }

    #[test]
    fn latch_keeps_the_first_reason() {
        let l = ExitLatch::new().unwrap();
        assert!(l.reason().is_none());
        l.stop(VmExit::GuestReset);
        l.stop(VmExit::TripleFault { vcpu: 0 });
        assert_eq!(l.reason(), Some(VmExit::GuestReset));
        assert_eq!(l.evt.read().unwrap(), 1);
    }
}
