//! Event-loop glue. Always watched: the state eventfd, the listening
//! socket and the muxer's timer. While the driver runs the device: the
//! three queue eventfds. Each connection's socket is watched for IN only
//! while its data can go to the guest, for OUT only while guest data
//! waits for it (the muxer decides, in `sync`).

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::muxer::{LISTENER_TOKEN, SOCKET_TOKEN, TIMER_TOKEN};
use super::{Vsock, EVENT_INDEX, RX_INDEX, TX_INDEX};

const STATE: u32 = 0;
/// Queue i is watched under `QUEUE_BASE + i`.
const QUEUE_BASE: u32 = 1;
const RX_QUEUE: u32 = QUEUE_BASE + RX_INDEX as u32;
const TX_QUEUE: u32 = QUEUE_BASE + TX_INDEX as u32;
const EVENT_QUEUE: u32 = QUEUE_BASE + EVENT_INDEX as u32;

impl Vsock {
    /// Makes the watched fds match the device state.
    fn sync_registration(&mut self, ops: &mut EventOps) {
        self.core.sync_queues(ops, QUEUE_BASE);
        self.muxer.sync(ops);
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STATE => {
                self.core.take_state_event();
                self.apply_state_change();
                // Packets the driver queued before we watched the queues.
                self.process_queues();
            }
            RX_QUEUE => {
                self.core.take_queue_event(RX_INDEX);
                self.rx_buffers_added();
                self.process_queues();
            }
            TX_QUEUE => {
                self.core.take_queue_event(TX_INDEX);
                self.process_queues();
            }
            EVENT_QUEUE => {
                // Event buffers stay posted for events husk never sends.
                self.core.take_queue_event(EVENT_INDEX);
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
        self.core.watch_state(ops, STATE);
        self.sync_registration(ops);
    }
}
