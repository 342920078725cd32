//! Event-loop glue: the state eventfd (activation/reset) is always
//! watched; the queue eventfd only while the driver runs the device.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::Block;
use crate::devices::virtio::VirtioDevice;

const STATE: u32 = 0;
const QUEUE: u32 = 1;

impl Block {
    fn sync_registration(&mut self, ops: &mut EventOps) {
        let want = self.active.is_some();
        let queue = Events::with_data(&self.queue_events()[0], QUEUE, EventSet::IN);
        if want && !self.registered {
            match ops.add(queue) {
                Ok(()) => self.registered = true,
                Err(e) => tracing::error!("virtio-blk: cannot watch the queue: {e:?}"),
            }
        } else if !want && self.registered {
            if let Err(e) = ops.remove(queue) {
                tracing::error!("virtio-blk: cannot unwatch the queue: {e:?}");
            }
            self.registered = false;
        }
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STATE => {
                let _ = self.state_evt.read();
                self.sync_registration(ops);
                // The driver may have queued requests before we watched the queue.
                self.process_queue();
            }
            QUEUE => {
                let _ = self.queue_events()[0].read();
                if self.active.is_some() {
                    self.process_queue();
                } else {
                    self.sync_registration(ops);
                }
            }
            other => tracing::warn!("virtio-blk: unexpected event token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.state_evt, STATE, EventSet::IN)) {
            tracing::error!("virtio-blk: cannot watch the state eventfd: {e:?}");
        }
    }
}
