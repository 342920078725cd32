//! Event-loop glue. Always watched: the state eventfd, the listening
//! socket and the muxer's timer. While the driver runs the device: the
//! three queue eventfds. Each connection's socket is watched for IN only
//! while its data can go to the guest, for OUT only while guest data
//! waits for it (the muxer decides, in `sync`).

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::muxer::{LISTENER_TOKEN, SOCKET_TOKEN, TIMER_TOKEN};
use super::{Vsock, EVENT_INDEX, RX_INDEX, TX_INDEX};
use crate::devices::virtio::VirtioDevice;

const STATE: u32 = 0;
const RX_QUEUE: u32 = 1;
const TX_QUEUE: u32 = 2;
const EVENT_QUEUE: u32 = 3;

impl Vsock {
    /// Makes the watched fds match the device state.
    fn sync_registration(&mut self, ops: &mut EventOps) {
        let want_queues = self.active.is_some();
        if want_queues != self.queues_registered {
            for (index, token) in [
                (RX_INDEX, RX_QUEUE),
                (TX_INDEX, TX_QUEUE),
                (EVENT_INDEX, EVENT_QUEUE),
            ] {
                let ev = Events::with_data(&self.queue_events()[index], token, EventSet::IN);
                let r = if want_queues {
                    ops.add(ev)
                } else {
                    ops.remove(ev)
                };
                if let Err(e) = r {
                    tracing::error!("virtio-vsock: cannot (un)watch a queue: {e:?}");
                }
            }
            self.queues_registered = want_queues;
        }
        self.muxer.sync(ops);
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STATE => {
                let _ = self.state_evt.read();
                self.apply_state_change();
                // Packets the driver queued before we watched the queues.
                self.process_queues();
            }
            RX_QUEUE => {
                let _ = self.queue_events()[RX_INDEX].read();
                self.rx_buffers_added();
                self.process_queues();
            }
            TX_QUEUE => {
                let _ = self.queue_events()[TX_INDEX].read();
                self.process_queues();
            }
            EVENT_QUEUE => {
                // Event buffers stay posted for events husk never sends.
                let _ = self.queue_events()[EVENT_INDEX].read();
            }
            LISTENER_TOKEN => self.muxer.accept_clients(),
            TIMER_TOKEN => {
                self.muxer.on_timer();
                self.process_host();
            }
            SOCKET_TOKEN => {
                self.muxer.on_socket(events.fd(), events.event_set());
                self.process_host();
            }
            other => tracing::warn!("virtio-vsock: unexpected event token {other}"),
        }
        self.sync_registration(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.state_evt, STATE, EventSet::IN)) {
            tracing::error!("virtio-vsock: cannot watch the state eventfd: {e:?}");
        }
        self.sync_registration(ops);
    }
}
