//! What the transport needs from a device, and what a device gets when the
//! driver brings it up.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
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
        // A guest can fail and reset a device in a loop.
        static WARNED: AtomicU32 = AtomicU32::new(0);
        if !self.flag.swap(true, Ordering::SeqCst) {
            super::guest_warn(&WARNED, format_args!("virtio device needs a reset: {why}"));
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
    /// Each queue's (next_avail, next_used) while activated, else empty:
    /// what a snapshot needs besides the transport's registers.
    fn queue_positions(&self) -> Vec<(u16, u16)>;
    /// What a snapshot keeps of the device beyond its queues, if anything.
    fn save_extra(&self) -> Option<serde_json::Value> {
        None
    }
    /// Called once after a snapshot's state was restored into this
    /// (activated) device, with what `save_extra` gave, before the guest
    /// runs again: the device tells the driver what it lost (vsock: its
    /// connections, if it had any).
    fn restored(&mut self, _extra: Option<&serde_json::Value>) {}
}

/// What the device holds while the driver runs it: the queues in index
/// order and what came with them at DRIVER_OK.
pub struct Active<const N: usize> {
    /// Guest memory.
    pub mem: GuestMem,
    /// The driver's queues, in queue index order.
    pub queues: [Queue; N],
    /// The device's interrupt.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Puts the device in DEVICE_NEEDS_RESET.
    pub failure: DeviceFailure,
}

/// The part every husk virtio device shares: the features it offers, one
/// eventfd per queue (a KVM ioeventfd), the state eventfd that carries
/// activation and reset from the vCPU thread to the event loop, the queues
/// while the driver runs the device, and whether the event loop watches
/// them. A device keeps one and adds only what is its own.
pub struct DeviceCore<const N: usize> {
    name: &'static str,
    avail_features: u64,
    queue_sizes: [u16; N],
    queue_evts: Vec<EventFd>,
    state_evt: EventFd,
    /// The queues while the driver runs the device.
    pub active: Option<Active<N>>,
    queues_watched: bool,
}

impl<const N: usize> DeviceCore<N> {
    /// A core for the device `name` (used in logs) offering
    /// `avail_features`, with `N` queues of `queue_size` entries at most.
    pub fn new(name: &'static str, avail_features: u64, queue_size: u16) -> std::io::Result<Self> {
        let evt = crate::sys::eventfd;
        Ok(Self {
            name,
            avail_features,
            queue_sizes: [queue_size; N],
            queue_evts: (0..N).map(|_| evt()).collect::<Result<_, _>>()?,
            state_evt: evt()?,
            active: None,
            queues_watched: false,
        })
    }

    /// The same core with queue `i` offering at most `sizes[i]` entries.
    pub fn with_queue_sizes(mut self, sizes: [u16; N]) -> Self {
        self.queue_sizes = sizes;
        self
    }

    /// The device's name in logs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Features offered to the driver.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Largest size of each queue.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// One eventfd per queue.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Whether the driver runs the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Whether the driver runs the device and it has not failed.
    pub fn running(&self) -> bool {
        self.active.as_ref().is_some_and(|a| !a.failure.failed())
    }

    /// Takes the driver's queues and wakes the event loop.
    pub fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let queues: [Queue; N] = ctx
            .queues
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: N, got })?;
        self.active = Some(Active {
            mem: ctx.mem,
            queues,
            interrupt: ctx.interrupt,
            failure: ctx.failure,
        });
        signal_state(&self.state_evt)
    }

    /// Each queue's (next_avail, next_used) while activated.
    pub fn queue_positions(&self) -> Vec<(u16, u16)> {
        use virtio_queue::QueueT;
        self.active.as_ref().map_or_else(Vec::new, |a| {
            a.queues
                .iter()
                .map(|q| (q.next_avail(), q.next_used()))
                .collect()
        })
    }

    /// Drops the queues and wakes the event loop.
    pub fn reset(&mut self) {
        self.active = None;
        if let Err(e) = signal_state(&self.state_evt) {
            tracing::warn!("{}: {e}", self.name);
        }
    }

    /// Asks the event loop to serve queue `index` again (work was left
    /// over when a budget ran out).
    pub fn requeue(&self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            let _ = evt.write(1);
        }
    }

    /// Watches the state eventfd under `token`, for `init`.
    pub fn watch_state(&self, ops: &mut EventOps, token: u32) {
        if let Err(e) = ops.add(Events::with_data(&self.state_evt, token, EventSet::IN)) {
            tracing::error!("{}: cannot watch the state eventfd: {e:?}", self.name);
        }
    }

    /// Consumes a state-eventfd wake-up.
    pub fn take_state_event(&self) {
        let _ = self.state_evt.read();
    }

    /// Consumes a wake-up of queue `index`.
    pub fn take_queue_event(&self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            let _ = evt.read();
        }
    }

    /// Watches the queue eventfds (queue i under `first_token + i`) while
    /// `want`, else stops watching them.
    pub fn watch_queues(&mut self, ops: &mut EventOps, first_token: u32, want: bool) {
        if want == self.queues_watched {
            return;
        }
        for (index, evt) in self.queue_evts.iter().enumerate() {
            let ev = Events::with_data(evt, first_token + index as u32, EventSet::IN);
            let r = if want { ops.add(ev) } else { ops.remove(ev) };
            if let Err(e) = r {
                tracing::error!("{}: cannot (un)watch queue {index}: {e:?}", self.name);
            }
        }
        self.queues_watched = want;
    }

    /// Watches the queue eventfds exactly while the driver runs the device.
    pub fn sync_queues(&mut self, ops: &mut EventOps, first_token: u32) {
        let want = self.active.is_some();
        self.watch_queues(ops, first_token, want);
    }
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
