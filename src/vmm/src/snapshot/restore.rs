//! Building a VM from a snapshot directory: the same devices as the saved
//! VM, guest RAM mapped copy-on-write from the memory file, every piece of
//! state written back before any vCPU thread starts.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{load_memory, map_memory, Snapshot, SnapshotError, MEMORY_FILE, STATE_FILE};
use crate::arch::x86_64::layout;
use crate::builder::{
    bind_api, check, clone_fd, enter_jail, eventfd, legacy_bus, open_console, supported_cpuid,
    vcpu_shared, BeforeThreads, BuildError, Vm,
};
use crate::config::{Console, FsConfig, NetConfig};
use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::attach as virtio;
use crate::seccomp::SeccompMode;
use crate::vstate::bus::Bus;
use crate::vstate::vcpu::{ExitLatch, Vcpu, VcpuIo, VcpuThreads};
use crate::vstate::vm;
use crate::vstate::{kvm, memory};

/// What a restored VM takes from its caller instead of the snapshot.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Where its console goes.
    pub console: Console,
    /// Its control socket.
    pub api_sock: Option<PathBuf>,
    /// Its vsock device's host socket (the saved one may still be in use).
    pub vsock_uds: Option<PathBuf>,
    /// Its seccomp filters.
    pub seccomp: SeccompMode,
    /// Disks whose image changes: (index among the disks, new path). The
    /// guest hears of each through a configuration-change interrupt; what
    /// it cached of the old image is its own to drop.
    pub disks: Vec<(usize, PathBuf)>,
    /// NICs on another tap: (index among the NICs, its tap and MAC). The
    /// driver read the saved MAC at boot and keeps using it until the
    /// guest sets the new one (husk's agent does, `Interface::device_mac`).
    pub nics: Vec<(usize, NetConfig)>,
    /// Shares of another directory: (index among the shares, the new
    /// share). The tag must be the saved one (the guest read it at boot),
    /// and the guest must not have used the share before the snapshot
    /// (which `snapshot` makes sure of): a new virtiofsd serves it.
    pub shares: Vec<(usize, FsConfig)>,
    /// What the guest's clock does.
    pub clock: ClockMode,
    /// The jail the VMM enters (see `jail`).
    pub jail: Option<crate::jail::JailConfig>,
}

/// The guest's clock after a restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClockMode {
    /// It steps forward by the real time since the snapshot: the guest's
    /// monotonic and wall clocks are right at once. Linux then catches up
    /// on every second in between (`second_overflow` per second in
    /// `timekeeping_advance`): on kvm_pvm hosts, where guest kernel code is
    /// emulated, ~0.3 s per hour the snapshot is old (seen: 0.9 s of
    /// guest time in those two functions for a 3-hour-old one).
    #[default]
    Step,
    /// It goes on from where it stopped, as after a pause: nothing to catch
    /// up, the wall clock is as old as the snapshot until someone sets it
    /// (husk's agent does, for warm templates).
    Continue,
}

/// Builds a paused VM from the snapshot in `dir`; `run` resumes it.
pub fn build_restored(dir: &Path, opts: &RestoreOptions) -> Result<Vm, BuildError> {
    build_restored_then(dir, opts, &mut || Ok(()))
}

/// `build_restored`, running `before_threads` once the devices exist and
/// before the jail (if any) and the first thread.
pub fn build_restored_then(
    dir: &Path,
    opts: &RestoreOptions,
    before_threads: BeforeThreads<'_>,
) -> Result<Vm, BuildError> {
    let snap = Snapshot::read(&dir.join(STATE_FILE))?;
    let mem_path = dir.join(MEMORY_FILE);
    let mem_file = std::fs::File::open(&mem_path)
        .map_err(|e| SnapshotError::Io(mem_path.display().to_string(), e))?;
    let mut cfg = snap.config.clone();
    cfg.console = opts.console.clone();
    cfg.api_sock = opts.api_sock.clone();
    cfg.seccomp = opts.seccomp;
    cfg.jail = opts.jail.clone();
    if let (Some(v), Some(uds)) = (cfg.vsock.as_mut(), &opts.vsock_uds) {
        v.uds_path = uds.clone();
    }
    for (index, path) in &opts.disks {
        slot(&mut cfg.disks, *index, "disk", "replace")?.path = path.clone();
    }
    for (index, nic) in &opts.nics {
        *slot(&mut cfg.net, *index, "NIC", "attach")? = nic.clone();
    }
    for (index, share) in &opts.shares {
        let slot = slot(&mut cfg.fs, *index, "share", "replace")?;
        if slot.tag != share.tag {
            return Err(SnapshotError::Inconsistent(format!(
                "share {index} is tagged {:?} in the snapshot, not {:?} (the guest knows it by its tag)",
                slot.tag, share.tag
            ))
            .into());
        }
        *slot = share.clone();
    }
    check(&cfg)?;
    let seccomp = cfg.seccomp.or_env()?;
    let kvm = kvm::open()?;
    let host_cpuid = supported_cpuid(&kvm)?;
    snap.check_cpu(&host_cpuid)?;

    let api = bind_api(&cfg)?;
    let virtio_devices = virtio::open_devices(&cfg)?;
    let console = open_console(&cfg)?;
    // Memory a vhost-user backend maps gets a copy of the snapshot's: a
    // copy-on-write mapping's private pages would be the VMM's alone.
    let (mem, shared) = memory::create_for(&cfg)?;
    if shared {
        load_memory(&mem, &mem_file, &mem_path)?;
    } else {
        map_memory(&mem, &mem_file, &mem_path)?;
    }
    drop(mem_file);
    let vm_fd = vm::create(&kvm, &mem)?;

    let latch = Arc::new(ExitLatch::new().map_err(|e| BuildError::Host("eventfd", e))?);
    let fifo_drained = eventfd()?;
    enter_jail(&cfg, before_threads)?;
    let count = u8::try_from(snap.vcpus.len())
        .map_err(|_| SnapshotError::Inconsistent("too many vCPUs".into()))?;
    // As when booting: filtered while the vCPUs are restored.
    let threads = VcpuThreads::spawn(count, seccomp)?;
    let serial = SerialDevice::from_state(
        &snap.serial,
        vm::irqfd(&vm_fd, layout::irq::COM1)?,
        clone_fd(&fifo_drained)?,
        console.start(seccomp)?,
    )
    .map_err(SnapshotError::Inconsistent)?;
    let (serial, pio) = legacy_bus(serial, &latch)?;
    let mut mmio = Bus::new();
    let attached = virtio::attach_all(virtio_devices, &vm_fd, &mem, &mut mmio)?;
    let io = Arc::new(VcpuIo::new(pio, mmio));

    let shared = vcpu_shared(&kvm, &io, &mem, &latch)?;
    let mut vcpus = Vec::with_capacity(snap.vcpus.len());
    for (index, state) in (0..count).zip(&snap.vcpus) {
        vcpus.push(Vcpu::restore(&vm_fd, index, state, shared.clone())?);
    }
    snap.vm.restore(&vm_fd, opts.clock == ClockMode::Step)?;
    // Devices last: a restored vsock device posts its reset event into
    // guest memory, and every device is kicked once to pick up work the
    // driver had posted.
    for (a, state) in attached.iter().zip(&snap.devices) {
        a.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(state)?;
    }
    // Disks come first in slot order: disk i is transport i.
    for (index, _) in &opts.disks {
        attached[*index]
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_changed()
            .map_err(|e| BuildError::Host("config interrupt", e))?;
    }
    let vcpus = threads.attach(vcpus);
    let (devices, transports) = attached
        .into_iter()
        .map(|a| (a.subscriber, a.transport))
        .unzip();
    Ok(Vm {
        vm_fd,
        mem,
        vcpus,
        latch,
        serial,
        fifo_drained,
        io,
        profiler: shared.profiler,
        cmdline: snap.cmdline,
        devices,
        transports,
        seccomp,
        config: cfg,
        api,
        paused: AtomicBool::new(false),
    })
}

/// Device `index` of the saved `devices` (`what`: "disk", "NIC", ...), to
/// `verb` at restore; an index the snapshot does not have is refused.
fn slot<'a, T>(
    devices: &'a mut [T],
    index: usize,
    what: &str,
    verb: &str,
) -> Result<&'a mut T, SnapshotError> {
    let count = devices.len();
    devices.get_mut(index).ok_or_else(|| {
        SnapshotError::Inconsistent(format!(
            "no {what} {index} to {verb} (the snapshot has {count})"
        ))
    })
}
