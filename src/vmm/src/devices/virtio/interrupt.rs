//! The device-to-driver interrupt: InterruptStatus bits plus a line raised
//! through a KVM irqfd. The transport reads and acknowledges the bits; the
//! device sets them from the event-loop thread.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Why the device interrupts (InterruptStatus bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// Buffers were added to a used ring.
    UsedBuffer,
    /// The configuration (or the device status, e.g. DEVICE_NEEDS_RESET) changed.
    ConfigChange,
}

impl InterruptKind {
    /// The InterruptStatus bit.
    pub const fn bit(self) -> u32 {
        match self {
            InterruptKind::UsedBuffer => 1,
            InterruptKind::ConfigChange => 2,
        }
    }
}

/// A virtio interrupt as the transport and devices see it.
pub trait VirtioInterrupt: Send + Sync {
    /// Sets `kind`'s status bit and raises the line.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
    /// Current InterruptStatus.
    fn status(&self) -> u32;
    /// Clears `bits` (InterruptACK).
    fn ack(&self, bits: u32);
    /// Sets InterruptStatus to `bits` without raising the line (restoring
    /// a snapshot: the irqchip's own state is restored apart).
    fn set_status(&self, bits: u32);
    /// Clears every bit (device reset).
    fn clear(&self) {
        self.ack(u32::MAX);
    }
}

/// Status bits plus an irqfd wired to the device's GSI.
pub struct IrqfdInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl IrqfdInterrupt {
    /// An interrupt that raises `irqfd` (from `vm::irqfd`).
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }
}

impl VirtioInterrupt for IrqfdInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        // The bit must be visible before the guest's handler reads
        // InterruptStatus, hence SeqCst ahead of the eventfd write.
        self.status.fetch_or(kind.bit(), Ordering::SeqCst);
        self.irqfd.write(1)
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_sets_bits_and_signals_ack_clears_them() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = IrqfdInterrupt::new(fd.try_clone().unwrap());
        irq.trigger(InterruptKind::UsedBuffer).unwrap();
        irq.trigger(InterruptKind::ConfigChange).unwrap();
        assert_eq!(irq.status(), 3);
        assert_eq!(fd.read().unwrap(), 2);
        irq.ack(1);
        assert_eq!(irq.status(), 2);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }
}
