//! Event-loop glue. The state eventfd (activation/reset) is always
//! watched; the queue eventfds while the driver runs the device; the tap
//! only while the guest has receive buffers (back-pressure).

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{Net, RX_INDEX, TX_INDEX};

const STATE: u32 = 0;
/// Queue i is watched under `QUEUE_BASE + i`.
const QUEUE_BASE: u32 = 1;
const RX_QUEUE: u32 = QUEUE_BASE + RX_INDEX as u32;
const TX_QUEUE: u32 = QUEUE_BASE + TX_INDEX as u32;
const TAP: u32 = 3;

impl Net {
    /// Makes the watched fds match the device state.
    fn sync_registration(&mut self, ops: &mut EventOps) {
        self.core.sync_queues(ops, QUEUE_BASE);
        let want_tap = self.running() && !self.rx_stalled && !self.tap_broken;
        if want_tap != self.tap_registered {
            let ev = Events::with_data(&self.tap, TAP, EventSet::IN);
            let r = if want_tap {
                ops.add(ev)
            } else {
                ops.remove(ev)
            };
            if let Err(e) = r {
                tracing::error!("virtio-net: cannot (un)watch the tap: {e:?}");
            }
            self.tap_registered = want_tap;
        }
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STATE => {
                self.core.take_state_event();
                // Frames the driver queued before we watched the queues.
                self.process_tx();
                self.process_rx();
            }
            RX_QUEUE => {
                self.core.take_queue_event(RX_INDEX);
                self.rx_buffers_added();
                self.process_rx();
            }
            TX_QUEUE => {
                self.core.take_queue_event(TX_INDEX);
                self.process_tx();
            }
            TAP => {
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                    && !events.event_set().contains(EventSet::IN)
                {
                    tracing::warn!("virtio-net: tap {} hung up", self.tap.name());
                    self.tap_broken = true;
                } else {
                    self.process_rx();
                }
            }
            other => tracing::warn!("virtio-net: unexpected event token {other}"),
        }
        self.sync_registration(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.core.watch_state(ops, STATE);
    }
}
