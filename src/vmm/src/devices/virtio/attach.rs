//! Putting virtio devices on a VM: open their backends from the config,
//! then give each an MMIO slot, an irqfd, one KVM ioeventfd per queue and
//! a `virtio_mmio.device=` entry on the kernel command line.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};

use super::block::{Block, BlockError, Disk};
use super::fs::{Backend, Fs, FsError, DEFAULT_VIRTIOFSD};
use super::mmio::{regs, MmioTransport};
use super::net::{MacAddr, Net, NetError, Tap};
use super::vsock::{Vsock, VsockError};
use super::{GuestMem, IrqfdInterrupt, VirtioDevice};
use crate::arch::x86_64::layout;
use crate::config::VmConfig;
use crate::vstate::bus::{Bus, BusError};
use crate::vstate::vm;

/// Errors attaching virtio devices. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A disk could not be set up.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A NIC could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A shared directory could not be set up.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// No virtiofsd to serve a shared directory.
    #[error("virtiofsd not found at {0} (install qemu-system-common, or set HUSK_VIRTIOFSD)")]
    NoVirtiofsd(String),
    /// More devices than interrupt lines.
    #[error("no virtio-mmio slot left for device {0}")]
    NoSlot(usize),
    /// The irqfd could not be created.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// A queue ioeventfd or eventfd could not be set up.
    #[error("virtio device {0}: {1}: {2}")]
    Host(usize, &'static str, #[source] std::io::Error),
    /// The MMIO window is taken.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A device whose backend is open, not yet on a VM.
pub enum PendingDevice {
    /// A disk.
    Block(Block),
    /// A NIC.
    Net(Net),
    /// The vsock device.
    Vsock(Vsock),
    /// A shared directory.
    Fs(Fs),
}

/// Opens every disk, tap, vsock socket and shared directory in `cfg`, in
/// order: disks first (vda, vdb, ...), then NICs (eth0, ...), then vsock,
/// then shares (a virtiofsd each). Nothing is left behind on error: files
/// close, taps husk created vanish, the vsock socket file is removed and
/// virtiofsd processes are killed when dropped.
pub fn open_devices(cfg: &VmConfig) -> Result<Vec<PendingDevice>, AttachError> {
    let mut out = Vec::with_capacity(cfg.virtio_device_count());
    for d in &cfg.disks {
        let disk = Disk::open(&d.path, d.read_only, d.direct)?;
        out.push(PendingDevice::Block(Block::new(
            disk,
            d.id.as_deref().unwrap_or(""),
        )?));
    }
    for n in &cfg.net {
        let tap = Tap::open(&n.tap)?;
        let mac = n.mac.unwrap_or_else(MacAddr::random);
        out.push(PendingDevice::Net(Net::new(tap, mac)?));
    }
    if let Some(v) = &cfg.vsock {
        out.push(PendingDevice::Vsock(Vsock::new(v.guest_cid, &v.uds_path)?));
    }
    if !cfg.fs.is_empty() {
        let virtiofsd = virtiofsd_path();
        if !virtiofsd.is_file() {
            return Err(AttachError::NoVirtiofsd(virtiofsd.display().to_string()));
        }
        for f in &cfg.fs {
            let backend = Backend::start(&virtiofsd, &f.dir, f.read_only)?;
            out.push(PendingDevice::Fs(Fs::new(&f.tag, backend)?));
        }
    }
    Ok(out)
}

/// The virtiofsd husk starts: `$HUSK_VIRTIOFSD`, else Debian's.
pub fn virtiofsd_path() -> std::path::PathBuf {
    std::env::var_os("HUSK_VIRTIOFSD")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| DEFAULT_VIRTIOFSD.into())
}

/// The kernel command-line entries announcing `count` devices.
pub fn cmdline_entries(count: usize) -> String {
    (0..count)
        .filter_map(layout::virtio_mmio_slot)
        .map(|(base, gsi)| format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"))
        .collect()
}

/// An event-loop subscriber.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A device on the MMIO bus: its event-loop side and its transport.
pub struct Attached {
    /// The device, for the event loop.
    pub subscriber: Subscriber,
    /// Its register file (for snapshots).
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Puts `devices` in their slots on `mmio`.
pub fn attach_all(
    devices: Vec<PendingDevice>,
    vm_fd: &VmFd,
    mem: &GuestMem,
    mmio: &mut Bus,
) -> Result<Vec<Attached>, AttachError> {
    let mut subs = Vec::with_capacity(devices.len());
    for (index, dev) in devices.into_iter().enumerate() {
        let sub = match dev {
            PendingDevice::Block(b) => attach(index, b, vm_fd, mem, mmio)?,
            PendingDevice::Net(n) => attach(index, n, vm_fd, mem, mmio)?,
            PendingDevice::Vsock(v) => attach(index, v, vm_fd, mem, mmio)?,
            PendingDevice::Fs(f) => attach(index, f, vm_fd, mem, mmio)?,
        };
        subs.push(sub);
    }
    Ok(subs)
}

fn attach<D>(
    index: usize,
    dev: D,
    vm_fd: &VmFd,
    mem: &GuestMem,
    mmio: &mut Bus,
) -> Result<Attached, AttachError>
where
    D: VirtioDevice + MutEventSubscriber + Send + 'static,
{
    let (base, gsi) = layout::virtio_mmio_slot(index).ok_or(AttachError::NoSlot(index))?;
    let irq = Arc::new(IrqfdInterrupt::new(vm::irqfd(vm_fd, gsi)?));
    let dev = Arc::new(Mutex::new(dev));
    let transport = MmioTransport::new(dev.clone(), mem.clone(), irq)
        .map_err(|e| AttachError::Host(index, "eventfd", e))?;
    let notify = IoEventAddress::Mmio(base + regs::QUEUE_NOTIFY);
    for (queue, evt) in transport.queue_events().iter().enumerate() {
        vm_fd
            .register_ioevent(evt, &notify, queue as u32)
            .map_err(|e| AttachError::Host(index, "KVM_IOEVENTFD", e.into()))?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), base, layout::VIRTIO_MMIO_SIZE)?;
    Ok(Attached {
        subscriber: dev,
        transport,
    })
}
