//! What the transport needs from a device, and what a device gets when the
//! driver brings it up.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::{InterruptKind, VirtioInterrupt};
use super::GuestMem;

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// The device could not signal the event loop.
    #[error("cannot signal the event loop: {0}")]
    Signal(#[source] std::io::Error),
}

/// Lets a device put itself in DEVICE_NEEDS_RESET: sets the flag the
/// transport ORs into the Status register and raises a config interrupt.
#[derive(Clone)]
pub struct DeviceFailure {
    flag: Arc<AtomicBool>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl DeviceFailure {
    /// A handle over the transport's flag and the device's interrupt.
    pub fn new(flag: Arc<AtomicBool>, interrupt: Arc<dyn VirtioInterrupt>) -> Self {
        Self { flag, interrupt }
    }

    /// Marks the device broken until the driver resets it.
    pub fn fail(&self, why: &str) {
        // A guest can fail and reset a device in a loop: warn a few times only.
        static WARNED: AtomicU32 = AtomicU32::new(0);
        if !self.flag.swap(true, Ordering::SeqCst) {
            if WARNED.fetch_add(1, Ordering::Relaxed) < 8 {
                tracing::warn!("virtio device needs a reset: {why}");
            } else {
                tracing::debug!("virtio device needs a reset: {why}");
            }
            if let Err(e) = self.interrupt.trigger(InterruptKind::ConfigChange) {
                tracing::warn!("cannot raise the config interrupt: {e}");
            }
        }
    }

    /// Whether the device is broken.
    pub fn failed(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// Everything a device needs to run, handed over at DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMem,
    /// The configured queues, in queue index order, validated.
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Puts the device in DEVICE_NEEDS_RESET.
    pub failure: DeviceFailure,
}

/// A virtio device behind a transport. Every call comes from a vCPU thread
/// (with the transport locked), so each must be quick: real work happens on
/// the event-loop thread, which `activate` and `reset` wake through
/// `state_event`.
pub trait VirtioDevice: Send {
    /// virtio device ID (`device_type::*`).
    fn device_type(&self) -> u32;
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled when the driver notifies that queue
    /// (by a KVM ioeventfd, or by the transport).
    fn queue_events(&self) -> &[EventFd];
    /// Reads device configuration space at `offset`. Bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; husk's devices have no writable fields.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "ignored virtio config write at {offset:#x} ({} bytes)",
            data.len()
        );
    }
    /// Takes the queues and starts serving them (on the event loop).
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Whether `activate` succeeded and no reset followed.
    fn is_activated(&self) -> bool;
    /// Stops using the queues and drops them (driver wrote 0 to Status).
    fn reset(&mut self);
}

/// Copies the window of `config` at `offset` into `data`; bytes past the
/// end read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Wakes the event loop after a state change (activation or reset).
pub fn signal_state(evt: &EventFd) -> Result<(), ActivateError> {
    evt.write(1).map_err(ActivateError::Signal)
}

/// Checks that the transport handed over one queue per expected queue.
pub fn check_queue_count(expected: usize, got: usize) -> Result<(), ActivateError> {
    if expected == got {
        Ok(())
    } else {
        Err(ActivateError::QueueCount { expected, got })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_window_is_clipped_and_zero_filled() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 10, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
