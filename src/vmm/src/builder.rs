//! Boot order: KVM, memory, VM, kernel and boot data, devices, vCPUs; then
//! the event loop runs until the guest stops.

use std::io::Write;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::api::ApiSocket;
use crate::arch::x86_64::{boot, layout, mptable, regs};
use crate::config::{self, Console, VmConfig};
use crate::devices::fill::FillDevice;
use crate::devices::legacy::console_log::{ConsoleLog, CONSOLE_LOG_CAP};
use crate::devices::legacy::console_queue::{QueuedConsole, CONSOLE_QUEUE_CAP};
use crate::devices::legacy::{SerialDevice, I8042};
use crate::devices::virtio::attach::{self as virtio, AttachError, Subscriber};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::MacAddr;
use crate::event_loop::{self};
use crate::seccomp::{self, SeccompMode};
use crate::vstate::bus::Bus;
use crate::vstate::profile::Profiler;
use crate::vstate::vcpu::{ExitLatch, Vcpu, VcpuHandle, VcpuIo, VcpuShared, VcpuThreads};
use crate::vstate::{kvm, memory, vm};

mod run;

/// Errors building a VM. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// No kernel given and none built.
    #[error("no guest kernel: pass --kernel PATH, or build the default one with tools/build-guest-kernel (expected at {0})")]
    NoKernel(String),
    /// The seccomp mode is invalid.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// KVM is unusable.
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// VM setup failed.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// Kernel, initrd or boot data failed to load.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Page tables or GDT could not be written.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// MP table failure.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// vCPU setup failed.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// Console file could not be created.
    #[error("cannot open console file {0}: {1}")]
    ConsoleFile(String, #[source] std::io::Error),
    /// Host resources (eventfds, epoll) could not be created.
    #[error("{0}: {1}")]
    Host(&'static str, #[source] std::io::Error),
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] crate::vstate::bus::BusError),
    /// A virtio device could not be set up.
    #[error(transparent)]
    Virtio(#[from] AttachError),
    /// The control socket could not be created.
    #[error(transparent)]
    Api(crate::api::ApiError),
    /// A snapshot could not be restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// The caller's work before the first thread failed.
    #[error("{0}")]
    BeforeThreads(String),
    /// The VMM could not enter its jail.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// A device's snapshot state does not fit it.
    #[error(transparent)]
    Transport(#[from] crate::devices::virtio::mmio::RestoreError),
}

/// husk's state directory: `$HUSK_ROOT`, default /var/lib/husk.
pub fn husk_root() -> PathBuf {
    std::env::var_os("HUSK_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/husk"))
}

/// The default guest kernel: `$HUSK_KERNEL`, else
/// `<husk_root>/kernel/vmlinux`, as installed by tools/build-guest-kernel.
pub fn default_kernel_path() -> PathBuf {
    std::env::var_os("HUSK_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| husk_root().join("kernel").join("vmlinux"))
}

/// Where the guest console input comes from.
pub enum ConsoleInputSource {
    /// No input.
    None,
    /// Read from this fd (not closed by husk), putting a tty in raw mode.
    Fd(RawFd),
}

/// Reads the time of a VM's first KVM_RUN.
pub struct FirstRunProbe(Arc<ExitLatch>);

impl FirstRunProbe {
    /// CLOCK_MONOTONIC ns of the first KVM_RUN, if it happened.
    pub fn get(&self) -> Option<u64> {
        match self.0.first_run_ns.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }
}

/// A built VM, vCPUs created and paused.
pub struct Vm {
    pub(crate) vm_fd: VmFd,
    // Dropped after the vCPU threads are joined (field order).
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) latch: Arc<ExitLatch>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) fifo_drained: EventFd,
    pub(crate) io: Arc<VcpuIo>,
    pub(crate) profiler: Arc<Profiler>,
    pub(crate) cmdline: String,
    // Device event handlers for the event loop (virtio devices).
    pub(crate) devices: Vec<Subscriber>,
    // Their register files, in slot order (snapshots).
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) seccomp: SeccompMode,
    // The config as built (random MACs resolved), for snapshots.
    pub(crate) config: VmConfig,
    pub(crate) api: Option<ApiSocket>,
    pub(crate) paused: AtomicBool,
}

/// A device to map on the MMIO bus: (device, base, length).
pub type MmioDevice = (crate::vstate::bus::SharedDevice, u64, u64);

/// Builds a VM from `cfg`.
pub fn build(cfg: &VmConfig) -> Result<Vm, BuildError> {
    build_with_mmio(cfg, Vec::new())
}

/// Builds a VM from `cfg` with extra devices on the MMIO bus.
pub fn build_with_mmio(cfg: &VmConfig, mmio_devices: Vec<MmioDevice>) -> Result<Vm, BuildError> {
    build_inner(cfg, mmio_devices, &mut || Ok(()))
}

/// Work the caller does once the VM's devices exist (its taps, say) and
/// before the VMM enters its jail and starts any thread.
pub type BeforeThreads<'a> = &'a mut dyn FnMut() -> Result<(), String>;

/// Builds a VM from `cfg`, running `before_threads` once its devices exist
/// and before the jail (if any) and the first thread.
pub fn build_then(cfg: &VmConfig, before_threads: BeforeThreads<'_>) -> Result<Vm, BuildError> {
    build_inner(cfg, Vec::new(), before_threads)
}

fn build_inner(
    cfg: &VmConfig,
    mmio_devices: Vec<MmioDevice>,
    before_threads: BeforeThreads<'_>,
) -> Result<Vm, BuildError> {
    check(cfg)?;
    let seccomp = cfg.seccomp.or_env()?;
    let kernel = match &cfg.kernel {
        Some(k) => k.clone(),
        None => {
            let k = default_kernel_path();
            if !k.exists() {
                return Err(BuildError::NoKernel(k.display().to_string()));
            }
            k
        }
    };
    // A snapshot must bring back the MAC the guest's driver read.
    let mut cfg = cfg.clone();
    for n in &mut cfg.net {
        n.mac.get_or_insert_with(MacAddr::random);
    }
    let pvm = kvm::is_pvm_host();
    let mut cmdline = config::guest_cmdline(&cfg, pvm);
    cmdline.push_str(&virtio::cmdline_entries(cfg.virtio_device_count()));
    let workarounds = pvm && cfg.pvm_workarounds;
    // The boot memmap is the guest's largest run of emulated stores on
    // kvm_pvm; only a booting guest uses the fill device.
    if workarounds {
        cmdline.push_str(&format!(" husk_fill={:#x}", layout::ports::FILL));
    }
    // Validate before any expensive work.
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(boot::BootError::Cmdline(format!(
            "{} bytes, the limit is {}",
            cmdline.len(),
            layout::CMDLINE_MAX_SIZE - 1
        ))
        .into());
    }
    let api = bind_api(&cfg)?;
    // Disks, taps and the vsock socket first: a user's mistake there is
    // reported before the console file or any KVM work, and nothing is
    // left behind.
    let virtio_devices = virtio::open_devices(&cfg)?;
    let console = open_console(&cfg)?;

    let kvm = kvm::open()?;
    // KVM_GET_SUPPORTED_CPUID is among the slowest calls before the first
    // KVM_RUN (0.3-0.6 ms on kvm_pvm hosts) and needs nothing else: a
    // thread of its own asks it meanwhile, joined before the jail (which
    // wants a single thread).
    let (guest, base_cpuid) = std::thread::scope(|s| {
        let cpuid = std::thread::Builder::new()
            .name("cpuid".into())
            .spawn_scoped(s, || supported_cpuid(&kvm));
        let guest = boot_guest(&cfg, &kvm, &kernel, &cmdline);
        let cpuid = match cpuid.map(|t| t.join()) {
            Ok(Ok(c)) => c,
            _ => supported_cpuid(&kvm),
        };
        (guest, cpuid)
    });
    let (mem, vm_fd, loaded) = guest?;
    let base_cpuid = base_cpuid?;

    let latch = Arc::new(ExitLatch::new().map_err(|e| BuildError::Host("eventfd", e))?);
    let fifo_drained = eventfd()?;
    enter_jail(&cfg, before_threads)?;
    // First once in the jail: each vCPU thread compiles its seccomp filter
    // while this one builds the devices and the vCPUs. They inherit a mask
    // without the stop signals (enter_jail blocked them), which the event
    // loop reads from a signalfd instead.
    let threads = VcpuThreads::spawn(cfg.vcpus, seccomp)?;
    let serial = SerialDevice::new(
        vm::irqfd(&vm_fd, layout::irq::COM1)?,
        clone_fd(&fifo_drained)?,
        console.start(seccomp)?,
    );
    let (serial, mut pio) = legacy_bus(serial, &latch)?;
    if workarounds {
        pio.insert(
            Arc::new(Mutex::new(FillDevice::new(
                mem.clone(),
                Some(serial.clone()),
            ))),
            u64::from(layout::ports::FILL),
            u64::from(layout::ports::FILL_LEN),
        )?;
    }
    let mut mmio = Bus::new();
    for (dev, base, len) in mmio_devices {
        mmio.insert(dev, base, len)?;
    }
    let attached = virtio::attach_all(virtio_devices, &vm_fd, &mem, &mut mmio)?;
    let io = Arc::new(VcpuIo::new(pio, mmio));

    let shared = vcpu_shared(&kvm, &io, &mem, &latch)?;
    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for index in 0..cfg.vcpus {
        let vcpu = Vcpu::new(
            &vm_fd,
            index,
            cfg.vcpus,
            &base_cpuid,
            workarounds,
            (index == 0).then_some(loaded.entry),
            shared.clone(),
        )?;
        vcpus.push(vcpu);
    }
    if workarounds {
        // A log line, not a print: a library must not write to stderr,
        // which is a container's own in the runtime's VMM process.
        tracing::info!(
            "/dev/kvm is kvm_pvm: added guest command-line workarounds (husk_pvm, clearcpuid, ...); --no-pvm-workarounds turns this off"
        );
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
        cmdline,
        devices,
        transports,
        seccomp,
        config: cfg,
        api,
        paused: AtomicBool::new(false),
    })
}

pub(crate) fn eventfd() -> Result<EventFd, BuildError> {
    crate::sys::eventfd().map_err(|e| BuildError::Host("eventfd", e))
}

pub(crate) fn clone_fd(evt: &EventFd) -> Result<EventFd, BuildError> {
    evt.try_clone().map_err(|e| BuildError::Host("eventfd", e))
}

/// The control socket, when the config asks for one.
pub(crate) fn bind_api(cfg: &VmConfig) -> Result<Option<ApiSocket>, BuildError> {
    cfg.api_sock
        .as_deref()
        .map(ApiSocket::bind)
        .transpose()
        .map_err(BuildError::Api)
}

/// Where the guest's console output goes, opened; the thread that writes
/// to stdout starts with `start`, once the VMM is in its jail.
pub(crate) enum PendingConsole {
    Stdout,
    Ready(Box<dyn Write + Send>),
}

/// Opens the guest's console destination.
pub(crate) fn open_console(cfg: &VmConfig) -> Result<PendingConsole, BuildError> {
    Ok(match &cfg.console {
        Console::Stdout => PendingConsole::Stdout,
        Console::None => PendingConsole::Ready(Box::new(std::io::sink())),
        Console::File(p) => PendingConsole::Ready(Box::new(
            ConsoleLog::create(p, CONSOLE_LOG_CAP)
                .map_err(|e| BuildError::ConsoleFile(p.display().to_string(), e))?,
        )),
    })
}

impl PendingConsole {
    /// The console's writer.
    pub(crate) fn start(self, seccomp: SeccompMode) -> Result<Box<dyn Write + Send>, BuildError> {
        Ok(match self {
            PendingConsole::Ready(w) => w,
            PendingConsole::Stdout => Box::new(
                QueuedConsole::spawn(Box::new(std::io::stdout()), CONSOLE_QUEUE_CAP, seccomp)
                    .map_err(|e| BuildError::Host("console thread", e))?,
            ),
        })
    }
}

/// Checks `cfg` before anything is opened or created: its values, and the
/// host side of its jail.
pub(crate) fn check(cfg: &VmConfig) -> Result<(), BuildError> {
    cfg.validate()?;
    if let Some(j) = &cfg.jail {
        j.precheck()?;
    }
    Ok(())
}

/// Runs the caller's `before_threads`, then enters the config's jail, if
/// any: after everything is open, before the first thread starts. The stop
/// signals are blocked first, so that every thread (the console's, the
/// vCPUs) inherits a mask without them and the event loop's signalfd sees
/// them: a thread that left them unblocked would take their default
/// action, ending the process instead of stopping the VM.
pub(crate) fn enter_jail(
    cfg: &VmConfig,
    before_threads: BeforeThreads<'_>,
) -> Result<(), BuildError> {
    event_loop::block_signals(&event_loop::STOP_SIGNALS)
        .map_err(|e| BuildError::Host("sigprocmask", e))?;
    before_threads().map_err(BuildError::BeforeThreads)?;
    let Some(jail) = &cfg.jail else {
        return Ok(());
    };
    let created: Vec<_> = cfg.jail_kept_paths().into_iter().map(|(_, p)| p).collect();
    jail.enter(&created)?;
    Ok(())
}

/// The port bus: COM1 and the i8042 (whose reset line stops the VM).
pub(crate) fn legacy_bus(
    serial: SerialDevice,
    latch: &Arc<ExitLatch>,
) -> Result<(Arc<Mutex<SerialDevice>>, Bus), BuildError> {
    let serial = Arc::new(Mutex::new(serial));
    let mut pio = Bus::new();
    pio.insert(
        serial.clone(),
        u64::from(layout::ports::COM1),
        u64::from(layout::ports::COM1_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(latch.clone()))),
        u64::from(layout::ports::I8042_DATA),
        u64::from(layout::ports::I8042_LEN),
    )?;
    Ok((serial, pio))
}

/// Guest memory, the VM on it, and the kernel, initrd, command line and
/// boot tables written there.
fn boot_guest(
    cfg: &VmConfig,
    kvm: &kvm_ioctls::Kvm,
    kernel: &std::path::Path,
    cmdline: &str,
) -> Result<(GuestMemoryMmap, VmFd, boot::LoadedKernel), BuildError> {
    let (mem, _) = memory::create_for(cfg)?;
    let vm_fd = vm::create(kvm, &mem)?;
    let loaded = boot::load_kernel(&mem, kernel)?;
    let initrd = match &cfg.initrd {
        Some(p) => Some(boot::load_initrd(&mem, p, loaded.end)?),
        None => None,
    };
    boot::write_cmdline(&mem, cmdline)?;
    let params = boot::build_boot_params(cfg.mem_mib << 20, cmdline.len(), initrd);
    boot::write_boot_params(&mem, &params)?;
    mptable::setup(&mem, cfg.vcpus)?;
    regs::write_boot_tables(&mem)?;
    Ok((mem, vm_fd, loaded))
}

/// The CPUID KVM supports on this host.
pub(crate) fn supported_cpuid(kvm: &kvm_ioctls::Kvm) -> Result<kvm_bindings::CpuId, BuildError> {
    Ok(kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| vm::VmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?)
}

/// What every vCPU of the VM shares.
pub(crate) fn vcpu_shared(
    kvm: &kvm_ioctls::Kvm,
    io: &Arc<VcpuIo>,
    mem: &GuestMemoryMmap,
    latch: &Arc<ExitLatch>,
) -> Result<VcpuShared, BuildError> {
    let msr_list = kvm
        .get_msr_index_list()
        .map_err(|e| vm::VmError::Ioctl("KVM_GET_MSR_INDEX_LIST", e))?;
    Ok(VcpuShared {
        io: io.clone(),
        mem: mem.clone(),
        latch: latch.clone(),
        profiler: Arc::new(Profiler::default()),
        msr_indices: Arc::new(msr_list.as_slice().to_vec()),
    })
}

impl Vm {
    /// The guest command line in use.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The seccomp mode its threads run under (config, flags and
    /// `HUSK_SECCOMP` taken into account).
    pub fn seccomp_mode(&self) -> SeccompMode {
        self.seccomp
    }

    /// A handle that reports the first KVM_RUN time after `run` consumed the VM.
    pub fn first_run_probe(&self) -> FirstRunProbe {
        FirstRunProbe(self.latch.clone())
    }

    /// The guest RIP sampler (off until `Profiler::enable`; see `husk vm --profile`).
    pub fn profiler(&self) -> Arc<Profiler> {
        self.profiler.clone()
    }

    /// A handle that can stop the VM from another thread.
    pub fn stop_handle(&self) -> Arc<ExitLatch> {
        self.latch.clone()
    }
}
