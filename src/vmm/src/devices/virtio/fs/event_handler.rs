//! Event-loop glue. Always watched: the state eventfd and the backend's
//! call eventfds. While the backend lives: its socket (a hang-up means it
//! is gone). The queue eventfds are the backend's kick fds; husk watches
//! them only once the backend is gone and it answers requests itself.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{Fs, NUM_QUEUES};

const STATE: u32 = 0;
/// Queue i's kick eventfd is watched under `QUEUE_BASE + i`.
const QUEUE_BASE: u32 = 1;
/// Queue i's call eventfd is watched under `CALL_BASE + i`.
const CALL_BASE: u32 = QUEUE_BASE + NUM_QUEUES as u32;
const SOCKET: u32 = CALL_BASE + NUM_QUEUES as u32;

impl Fs {
    /// Makes the watched fds match the device state.
    fn sync_registration(&mut self, ops: &mut EventOps) {
        let want = self.backend.as_ref().map(|b| b.socket_fd());
        if self.socket_watched != want {
            if let Some(fd) = self.socket_watched.take() {
                if let Err(e) = ops.remove(Events::with_data_raw(fd, SOCKET, EventSet::IN)) {
                    tracing::error!("virtio-fs: cannot unwatch the backend socket: {e:?}");
                }
            }
            if let Some(fd) = want {
                let ev = Events::with_data_raw(fd, SOCKET, EventSet::IN | EventSet::HANG_UP);
                match ops.add(ev) {
                    Ok(()) => self.socket_watched = Some(fd),
                    Err(e) => tracing::error!("virtio-fs: cannot watch the backend socket: {e:?}"),
                }
            }
        }
        // Unwatched: the lost backend's socket may close now; its process
        // waits for the device's drop.
        if let Some(b) = self.lost.take() {
            if let Some(d) = b.into_daemon() {
                self.lost_daemon = Some(d);
            }
        }
        let serve_here = self.core.active.is_some() && self.backend.is_none();
        self.core.watch_queues(ops, QUEUE_BASE, serve_here);
    }

    /// The backend's socket is readable or hung up: outside a request
    /// husk sends, that only happens when the backend is gone or broke
    /// the protocol.
    pub(super) fn on_socket(&mut self, set: EventSet) {
        let Some(fd) = self.backend.as_ref().map(|b| b.socket_fd()) else {
            return;
        };
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.lose_backend("virtiofsd hung up");
            return;
        }
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a local buffer on a socket this
        // device owns.
        let n = unsafe {
            libc::recv(
                fd,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => self.lose_backend("virtiofsd closed the connection"),
            n if n > 0 => self.lose_backend("unexpected message from virtiofsd"),
            _ => {} // EAGAIN: spurious wake-up.
        }
    }
}

impl MutEventSubscriber for Fs {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STATE => {
                self.core.take_state_event();
                self.apply_state();
            }
            SOCKET => self.on_socket(events.event_set()),
            t if (CALL_BASE..SOCKET).contains(&t) => self.relay_call((t - CALL_BASE) as usize),
            t if (QUEUE_BASE..CALL_BASE).contains(&t) => {
                let i = (t - QUEUE_BASE) as usize;
                self.core.take_queue_event(i);
                self.serve_without_backend(i);
            }
            other => tracing::warn!("virtio-fs: unexpected event token {other}"),
        }
        self.sync_registration(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.core.watch_state(ops, STATE);
        for (i, call) in self.calls.iter().enumerate() {
            let ev = Events::with_data(call, CALL_BASE + i as u32, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                tracing::error!("virtio-fs: cannot watch call eventfd {i}: {e:?}");
            }
        }
        self.sync_registration(ops);
    }
}
