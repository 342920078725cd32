//! Event-loop glue. The state eventfd (activation/reset) is always
//! watched; the queue eventfds while the driver runs the device; the tap
//! only while the guest has receive buffers (back-pressure).

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{Net, RX_INDEX, TX_INDEX};
use crate::devices::virtio::VirtioDevice;

const STATE: u32 = 0;
const RX_QUEUE: u32 = 1;
const TX_QUEUE: u32 = 2;
const TAP: u32 = 3;

impl Net {
    fn queue_event(&self, index: usize, token: u32) -> Events {
        Events::with_data(&self.queue_events()[index], token, EventSet::IN)
    }

    /// Makes the watched fds match the device state.
    fn sync_registration(&mut self, ops: &mut EventOps) {
        let want_queues = self.active.is_some();
        if want_queues != self.queues_registered {
            let evs = [
                self.queue_event(RX_INDEX, RX_QUEUE),
                self.queue_event(TX_INDEX, TX_QUEUE),
            ];
            for ev in evs {
                let r = if want_queues {
                    ops.add(ev)
                } else {
                    ops.remove(ev)
                };
                if let Err(e) = r {
                    tracing::error!("virtio-net: cannot (un)watch a queue: {e:?}");
                }
            }
            self.queues_registered = want_queues;
        }
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
                let _ = self.state_evt.read();
                // Frames the driver queued before we watched the queues.
                self.process_tx();
                self.process_rx();
            }
            RX_QUEUE => {
                let _ = self.queue_events()[RX_INDEX].read();
                self.rx_buffers_added();
                self.process_rx();
            }
            TX_QUEUE => {
                let _ = self.queue_events()[TX_INDEX].read();
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
        if let Err(e) = ops.add(Events::with_data(&self.state_evt, STATE, EventSet::IN)) {
            tracing::error!("virtio-net: cannot watch the state eventfd: {e:?}");
        }
    }
}
