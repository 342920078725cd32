//! Event-loop glue: the state eventfd (activation/reset) is always
//! watched; the queue eventfd only while the driver runs the device.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::Block;

const STATE: u32 = 0;
const QUEUE: u32 = 1;

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STATE => {
                self.core.take_state_event();
                // The driver may have queued requests before we watched the queue.
                self.process_queue();
            }
            QUEUE => {
                self.core.take_queue_event(0);
                self.process_queue();
            }
            other => tracing::warn!("virtio-blk: unexpected event token {other}"),
        }
        self.core.sync_queues(ops, QUEUE);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.core.watch_state(ops, STATE);
    }
}
