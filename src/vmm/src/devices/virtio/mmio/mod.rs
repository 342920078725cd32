//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2): the register
//! file, the device status state machine, feature negotiation and queue
//! configuration. It knows nothing about what the device does.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::device::{ActivateContext, DeviceFailure, VirtioDevice};
use super::features::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use super::interrupt::VirtioInterrupt;
use super::{feature, status, GuestMem};
use crate::vstate::bus::BusDevice;

mod state;
#[cfg(test)]
mod tests;

pub use state::{QueueSnapshot, RestoreError, TransportState};

/// "virt", little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The non-legacy register layout.
pub const VERSION: u32 = 2;
/// husk's vendor ID ("husk", little endian).
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"husk");

/// Register offsets.
pub mod regs {
    /// Magic value "virt".
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Transport version (2).
    pub const VERSION: u64 = 0x004;
    /// virtio device ID.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor ID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// 32 feature bits, selected by DEVICE_FEATURES_SEL.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32 device feature bits DEVICE_FEATURES shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// 32 feature bits accepted by the driver.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32 bits DRIVER_FEATURES writes.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue the QUEUE_* registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// The selected queue is configured.
    pub const QUEUE_READY: u64 = 0x044;
    /// Driver notification: the value is the queue index.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt reasons.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt reasons.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status; writing 0 resets the device.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low 32 bits.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high 32 bits.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low 32 bits.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Shared memory region length, low 32 bits (no regions: all ones).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Changes whenever the configuration space changes.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// One queue's registers as the driver wrote them.
#[derive(Debug, Clone, Copy)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// A virtio-queue `Queue` from the registers, or why it is unusable.
    fn build(&self, mem: &GuestMem, event_idx: bool) -> Result<Queue, String> {
        if !self.ready {
            return Err("not ready".into());
        }
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        q.try_set_size(self.size)
            .map_err(|_| format!("size {} (max {})", self.size, self.max_size))?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| e.to_string())?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(|e| e.to_string())?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(|e| e.to_string())?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(format!(
                "rings outside guest memory (desc {:#x}, avail {:#x}, used {:#x}, size {})",
                self.desc, self.avail, self.used, self.size
            ));
        }
        Ok(q)
    }
}

/// Sets the low or high half of `v`.
fn set_half(v: &mut u64, high: bool, half: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(half);
    }
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMem,
    interrupt: Arc<dyn VirtioInterrupt>,
    needs_reset: Arc<AtomicBool>,
    queue_evts: Vec<EventFd>,
    device_id: u32,
    avail_features: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    acked_beyond_64: bool,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    config_generation: u32,
}

impl MmioTransport {
    /// Puts `device` behind a register file. `interrupt` raises its GSI.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let (device_id, avail_features, queues, queue_evts) = {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            let evts = d
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            let queues: Vec<QueueConfig> = d
                .queue_max_sizes()
                .iter()
                .map(|&m| QueueConfig::new(m))
                .collect();
            (d.device_type(), d.avail_features(), queues, evts)
        };
        Ok(Self {
            device,
            mem,
            interrupt,
            needs_reset: Arc::new(AtomicBool::new(false)),
            queue_evts,
            device_id,
            avail_features,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_beyond_64: false,
            queue_sel: 0,
            queues,
            config_generation: 0,
        })
    }

    /// The device's queue eventfds, in queue order, for KVM ioeventfds on
    /// `regs::QUEUE_NOTIFY` with the queue index as datamatch.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.needs_reset.load(Ordering::SeqCst) {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failure(&self) -> DeviceFailure {
        DeviceFailure::new(self.needs_reset.clone(), self.interrupt.clone())
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MAGIC_VALUE,
            regs::VERSION => VERSION,
            regs::DEVICE_ID => self.device_id,
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status(),
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES => self.write_driver_features(v),
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM
            | regs::QUEUE_READY
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_AVAIL_LOW
            | regs::QUEUE_AVAIL_HIGH
            | regs::QUEUE_USED_LOW
            | regs::QUEUE_USED_HIGH => self.write_queue_reg(offset, v),
            regs::QUEUE_NOTIFY => self.notify(v),
            regs::INTERRUPT_ACK => self.interrupt.ack(v),
            regs::STATUS => self.set_status(v),
            _ => tracing::debug!("virtio-mmio: write of {v:#x} to unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        // Features are accepted only while negotiating.
        if self.status & (status::DRIVER | status::FEATURES_OK | status::FAILED) != status::DRIVER {
            tracing::debug!("virtio-mmio: DriverFeatures write outside negotiation ignored");
            return;
        }
        match self.driver_features_sel {
            0 => set_half(&mut self.acked_features, false, v),
            1 => set_half(&mut self.acked_features, true, v),
            // No feature bits up there: a driver accepting any is refused at FEATURES_OK.
            _ => self.acked_beyond_64 |= v != 0,
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.queue_config_allowed() {
            tracing::debug!(
                "virtio-mmio: queue register {offset:#x} written outside setup, ignored"
            );
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        if q.ready && offset != regs::QUEUE_READY {
            tracing::debug!("virtio-mmio: queue register {offset:#x} written while ready, ignored");
            return;
        }
        match offset {
            // Validated at DRIVER_OK; keep what was written so a bad size
            // shows up as a device error rather than silently changing.
            regs::QUEUE_NUM => q.size = u16::try_from(v).unwrap_or(0),
            regs::QUEUE_READY => q.ready = v == 1,
            regs::QUEUE_DESC_LOW => set_half(&mut q.desc, false, v),
            regs::QUEUE_DESC_HIGH => set_half(&mut q.desc, true, v),
            regs::QUEUE_AVAIL_LOW => set_half(&mut q.avail, false, v),
            regs::QUEUE_AVAIL_HIGH => set_half(&mut q.avail, true, v),
            regs::QUEUE_USED_LOW => set_half(&mut q.used, false, v),
            regs::QUEUE_USED_HIGH => set_half(&mut q.used, true, v),
            _ => {}
        }
    }

    fn notify(&mut self, v: u32) {
        // KVM normally catches these writes with an ioeventfd; this path
        // serves a KVM without it, and ignores notifications for queues
        // that do not exist or a device that is not running.
        if self.status & status::DRIVER_OK == 0 {
            return;
        }
        if let Some(evt) = self.queue_evts.get(v as usize) {
            if let Err(e) = evt.write(1) {
                tracing::warn!("virtio-mmio: cannot signal queue {v}: {e}");
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        let extra = self.acked_features & !self.avail_features;
        // A guest can retry FEATURES_OK in a loop.
        static WARNED: AtomicU32 = AtomicU32::new(0);
        if extra != 0 || self.acked_beyond_64 {
            super::guest_warn(&WARNED, format_args!(
                "virtio-mmio: driver accepted features the device did not offer ({extra:#x}); refusing FEATURES_OK"
            ));
            return false;
        }
        if self.acked_features & feature(VIRTIO_F_VERSION_1) == 0 {
            super::guest_warn(&WARNED, format_args!(
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported); refusing FEATURES_OK"
            ));
            return false;
        }
        true
    }

    /// The status state machine: bits are only ever added, in order
    /// ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK; FAILED at any time;
    /// 0 resets. Anything else is ignored.
    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            tracing::debug!(
                "virtio-mmio: driver tried to clear status bits ({old:#x} -> {v:#x}), ignored"
            );
            return;
        }
        let mut new = old;
        let added = v & !old;
        if added & status::ACKNOWLEDGE != 0 {
            new |= status::ACKNOWLEDGE;
        }
        if added & status::DRIVER != 0 && new & status::ACKNOWLEDGE != 0 {
            new |= status::DRIVER;
        }
        if added & status::FEATURES_OK != 0
            && new & status::DRIVER != 0
            && self.features_acceptable()
        {
            new |= status::FEATURES_OK;
        }
        let activate = added & status::DRIVER_OK != 0 && new & status::FEATURES_OK != 0;
        if activate {
            new |= status::DRIVER_OK;
        }
        if added & status::FAILED != 0 {
            new |= status::FAILED;
        }
        if new | status::DEVICE_NEEDS_RESET != v | status::DEVICE_NEEDS_RESET {
            tracing::debug!(
                "virtio-mmio: status {v:#x} after {old:#x} partly refused: now {new:#x}"
            );
        }
        self.status = new;
        if activate {
            self.activate();
        }
    }

    /// The driver's queues from the registers, or the first unusable one
    /// (its index) and why.
    fn build_queues(&self) -> Result<Vec<Queue>, (usize, String)> {
        let event_idx = self.acked_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        self.queues
            .iter()
            .enumerate()
            .map(|(i, qc)| qc.build(&self.mem, event_idx).map_err(|why| (i, why)))
            .collect()
    }

    /// What the device gets when it is activated with `queues`.
    fn activate_context(&self, queues: Vec<Queue>) -> ActivateContext {
        ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
            failure: self.failure(),
        }
    }

    fn activate(&mut self) {
        let queues = match self.build_queues() {
            Ok(q) => q,
            Err((i, why)) => {
                self.failure()
                    .fail(&format!("queue {i} is unusable: {why}"));
                return;
            }
        };
        let ctx = self.activate_context(queues);
        let result = self.device().activate(ctx);
        if let Err(e) = result {
            self.failure().fail(&format!("activation failed: {e}"));
        }
    }

    fn reset(&mut self) {
        self.device().reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_beyond_64 = false;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.interrupt.clear();
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.device().read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                "virtio-mmio: {}-byte read at {offset:#x}: registers are 32-bit",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            self.device().write_config(offset - regs::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte write at {offset:#x}: registers are 32-bit",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}
