//! The transport's part of a snapshot: the register file as the driver
//! left it, each queue's ring positions, and whether the device runs; and
//! putting that back into a new transport over the same kind of device.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

use super::{status, MmioTransport, QueueConfig};

/// One queue: its registers and, while the device runs, its positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

/// A transport's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// virtio device ID: a snapshot only goes back onto the same kind.
    pub device_type: u32,
    /// Status register (without DEVICE_NEEDS_RESET).
    pub status: u32,
    /// DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The driver accepted bits past 64.
    pub acked_beyond_64: bool,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device ran its queues.
    pub activated: bool,
    /// Every queue, in index order.
    pub queues: Vec<QueueSnapshot>,
    /// What the device keeps beyond its queues (`VirtioDevice::save_extra`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<serde_json::Value>,
}

/// Why a transport state does not fit.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Another kind of device, or another queue layout.
    #[error("the snapshot has a device of type {saved} with {saved_queues} queues here, the VM has type {actual} with {actual_queues}")]
    Mismatch {
        /// Saved device type.
        saved: u32,
        /// Saved queue count.
        saved_queues: usize,
        /// This device's type.
        actual: u32,
        /// This device's queue count.
        actual_queues: usize,
    },
    /// A queue cannot be rebuilt, or the device refused its queues.
    #[error("device of type {0}: {1}")]
    Queue(u32, String),
}

impl MmioTransport {
    /// Tells the driver the device's configuration changed (a restored
    /// disk of another size): ConfigGeneration moves on and a
    /// configuration-change interrupt is raised.
    pub fn config_changed(&mut self) -> std::io::Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt
            .trigger(crate::devices::virtio::InterruptKind::ConfigChange)
    }

    /// The transport's state; the device must not be serving its queues
    /// meanwhile (vCPUs paused, the event loop is the caller).
    pub fn save(&self) -> TransportState {
        let (activated, positions, device) = {
            let d = self.device();
            (d.is_activated(), d.queue_positions(), d.save_extra())
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (next_avail, next_used) = positions.get(i).copied().unwrap_or((0, 0));
                QueueSnapshot {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    next_avail,
                    next_used,
                }
            })
            .collect();
        TransportState {
            device_type: self.device_id,
            status: self.status,
            needs_reset: self.needs_reset.load(Ordering::SeqCst),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            acked_beyond_64: self.acked_beyond_64,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated,
            queues,
            device,
        }
    }

    /// Puts `state` into this fresh transport and, if the device ran,
    /// hands it its queues at the saved positions. Every queue is then
    /// signalled once, so work the driver had posted is not left waiting.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        if state.device_type != self.device_id || state.queues.len() != self.queues.len() {
            return Err(RestoreError::Mismatch {
                saved: state.device_type,
                saved_queues: state.queues.len(),
                actual: self.device_id,
                actual_queues: self.queues.len(),
            });
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.acked_beyond_64 = state.acked_beyond_64;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        for (q, s) in self.queues.iter_mut().zip(&state.queues) {
            *q = QueueConfig {
                max_size: q.max_size,
                size: s.size,
                ready: s.ready,
                desc: s.desc,
                avail: s.avail,
                used: s.used,
            };
        }
        self.interrupt.set_status(state.interrupt_status);
        self.needs_reset.store(state.needs_reset, Ordering::SeqCst);
        if !state.activated || state.status & status::DRIVER_OK == 0 {
            return Ok(());
        }
        let mut queues = self
            .build_queues()
            .map_err(|(i, why)| RestoreError::Queue(self.device_id, format!("queue {i}: {why}")))?;
        for (q, s) in queues.iter_mut().zip(&state.queues) {
            q.set_next_avail(s.next_avail);
            q.set_next_used(s.next_used);
        }
        let ctx = self.activate_context(queues);
        let mut dev = self.device();
        dev.activate(ctx)
            .map_err(|e| RestoreError::Queue(self.device_id, e.to_string()))?;
        dev.restored(state.device.as_ref());
        drop(dev);
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
        Ok(())
    }
}
