//! virtio 1.x devices over the MMIO transport (version 2).
//!
//! The transport (`mmio`) owns the register file, the status state machine
//! and queue configuration; it talks to a device only through the
//! [`VirtioDevice`] trait. Devices (`block`, `net`, `vsock`, `fs`) own their
//! queues once activated and run on the event-loop thread; a vCPU thread
//! never does device work: queue notifications reach the event loop
//! through KVM ioeventfds, activation and reset through the device's
//! `state_evt`.

pub mod attach;
pub mod block;
pub mod device;
pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod vsock;

pub use device::{ActivateContext, ActivateError, DeviceFailure, VirtioDevice};
pub use interrupt::{InterruptKind, IrqfdInterrupt, VirtioInterrupt};
pub use mmio::MmioTransport;
pub use queue::{Chain, ChainError, QueueError, Segment};

/// Logs something a guest did wrong: a warning the first few times a
/// `counter` sees one, then at debug level, so that a guest that repeats
/// it in a loop cannot write to the host's log as fast as it can trap.
pub fn guest_warn(counter: &std::sync::atomic::AtomicU32, msg: std::fmt::Arguments<'_>) {
    const WARNINGS: u32 = 8;
    if counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < WARNINGS {
        tracing::warn!("{msg}");
    } else {
        tracing::debug!("{msg}");
    }
}

/// The type used for guest memory by every device.
pub type GuestMem = vm_memory::GuestMemoryMmap;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device may now use its queues.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Device-independent feature bits.
pub mod features {
    /// Indirect descriptor tables.
    pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
    /// used_event / avail_event notification suppression.
    pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
    /// virtio 1.x (non-legacy) device; husk's devices require it.
    pub const VIRTIO_F_VERSION_1: u32 = 32;
}

/// Device IDs (virtio 1.x, 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Socket device (vsock).
    pub const VSOCK: u32 = 19;
    /// File system device (virtio-fs).
    pub const FS: u32 = 26;
}

/// Largest queue any husk device offers.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// `1 << bit` as a feature mask.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}
