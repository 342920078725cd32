//! The host side of the vsock device: the listening Unix socket and the
//! `CONNECT <port>` handshake of its clients, connections to
//! `<uds_path>_<port>` for the guest (those two in `muxer/host.rs`), the
//! connection table keyed by port pair, and the choice of what goes to
//! the guest next.
//!
//! Everything here runs on the event-loop thread. epoll registrations
//! change only in `sync`, the one place with access to the event loop: a
//! connection whose interest may have changed is marked dirty, and a dead
//! connection's socket waits in `graveyard` until it is unwatched, so that
//! no fd is ever closed while epoll (or event-manager's fd table) still
//! refers to it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnError, ConnKey, ConnState, Connection, RxItem};
use super::packet::{Header, PacketError};
use super::{
    op, shutdown, socket_type, unix, VsockCounters, VsockError, CLOSE_TIMEOUT, CONNECT_TIMEOUT,
    FIRST_HOST_PORT, HANDSHAKE_TIMEOUT, HOST_CID, MAX_QUEUED_RESETS,
};

mod host;

use host::Handshake;

/// Event token of the listening socket.
pub(super) const LISTENER_TOKEN: u32 = 4;
/// Event token of the timer.
pub(super) const TIMER_TOKEN: u32 = 5;
/// Event token of connection and handshake sockets (told apart by fd).
pub(super) const SOCKET_TOKEN: u32 = 6;

/// The host side: Unix sockets in, packets for the guest out.
pub(super) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    listener_registered: bool,
    listener_paused_until: Option<Instant>,
    timer: TimerFd,
    timer_at: Option<Instant>,
    timer_registered: bool,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    new_handshakes: Vec<RawFd>,
    host_ports: HashSet<u32>,
    next_port: u32,
    /// Connections with something for the guest, in turn.
    ready: VecDeque<ConnKey>,
    /// Resets owed to the guest.
    resets: VecDeque<ConnKey>,
    dirty: Vec<ConnKey>,
    graveyard: Vec<UnixStream>,
    /// The guest has no receive buffer: stop reading Unix sockets.
    rx_stalled: bool,
    /// The guest's driver is running the device.
    driver_ready: bool,
    handshake_timeout: Duration,
    connect_timeout: Duration,
    close_timeout: Duration,
    pub(super) counters: VsockCounters,
}

impl Muxer {
    /// Listens on `uds_path` for a guest with `guest_cid`.
    pub(super) fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let timer = TimerFd::new().map_err(|e| VsockError::Host("timerfd", e.into()))?;
        // Never block the event loop on a timer that was re-armed after it fired.
        unix::set_nonblocking(timer.as_raw_fd()).map_err(|e| VsockError::Host("timerfd", e))?;
        let listener = unix::listen(uds_path)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            listener_registered: false,
            listener_paused_until: None,
            timer,
            timer_at: None,
            timer_registered: false,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            new_handshakes: Vec::new(),
            host_ports: HashSet::new(),
            next_port: FIRST_HOST_PORT,
            ready: VecDeque::new(),
            resets: VecDeque::new(),
            dirty: Vec::new(),
            graveyard: Vec::new(),
            rx_stalled: false,
            driver_ready: false,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            close_timeout: CLOSE_TIMEOUT,
            counters: VsockCounters::default(),
        })
    }

    /// The listening socket's path.
    pub(super) fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Live connections.
    pub(super) fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host clients still in their handshake.
    #[cfg(test)]
    pub(super) fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// Sockets waiting to be unwatched and closed.
    #[cfg(test)]
    pub(super) fn graveyard_len(&self) -> usize {
        self.graveyard.len()
    }

    /// Whether the guest has no receive buffers (Unix sockets are not read).
    #[cfg(test)]
    pub(super) fn rx_stalled(&self) -> bool {
        self.rx_stalled
    }

    /// Guest bytes held for the Unix peer of guest port `peer_port` (tests).
    #[cfg(test)]
    pub(super) fn pending_of(&self, peer_port: u32) -> usize {
        self.conns
            .values()
            .filter(|c| c.key.peer_port == peer_port)
            .map(Connection::pending_len)
            .sum()
    }

    /// Shortens the handshake, connect and close timeouts (tests).
    #[cfg(test)]
    pub(super) fn set_timeouts(&mut self, handshake: Duration, connect: Duration, close: Duration) {
        self.handshake_timeout = handshake;
        self.connect_timeout = connect;
        self.close_timeout = close;
    }

    /// Sets whether the guest driver runs the device. Host clients are
    /// turned away while it does not.
    pub(super) fn set_driver_ready(&mut self, ready: bool) {
        self.driver_ready = ready;
    }

    /// Forgets every connection (the driver was reset and forgot them too).
    pub(super) fn reset_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.kill(k, false);
        }
        self.resets.clear();
        self.ready.clear();
        self.rx_stalled = false;
    }

    /// Whether the guest has receive buffers; while it has none, no Unix
    /// socket is read.
    pub(super) fn set_rx_stalled(&mut self, stalled: bool) {
        if stalled == self.rx_stalled {
            return;
        }
        self.rx_stalled = stalled;
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.touch(k);
        }
    }

    /// Whether something may be waiting for the guest.
    pub(super) fn has_rx(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// Whether so many resets wait for the guest that its packets must
    /// wait too (a guest cannot grow the queue without bound).
    pub(super) fn rx_backlog_full(&self) -> bool {
        self.resets.len() >= MAX_QUEUED_RESETS
    }

    fn reset_header(&self, key: ConnKey) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: socket_type::STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// The next packet for the guest, with at most `room` payload bytes
    /// read into `buf`; None when nothing can go now.
    pub(super) fn next_rx(&mut self, room: usize, buf: &mut [u8]) -> Option<Header> {
        // One pass over the queue: a connection that cannot use this
        // buffer (e.g. too small for data) keeps its turn for the next.
        let mut turns = self.ready.len();
        loop {
            if let Some(key) = self.resets.pop_front() {
                self.counters.resets_sent += 1;
                return Some(self.reset_header(key));
            }
            if turns == 0 {
                return None;
            }
            turns -= 1;
            let key = self.ready.pop_front()?;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            match c.next_rx(room, buf) {
                RxItem::Packet(h) => {
                    self.touch(key);
                    return Some(h);
                }
                RxItem::Idle => self.touch(key),
                RxItem::Reset => self.kill(key, true),
            }
        }
    }

    /// Marks `key` for an epoll update and queues it if it has something
    /// for the guest.
    fn touch(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(key);
        }
        if !c.queued && c.has_rx_work() {
            c.queued = true;
            self.ready.push_back(key);
        }
    }

    fn push_reset(&mut self, key: ConnKey) {
        self.resets.push_back(key);
    }

    /// Removes a connection, resetting it on the guest side if `rst` and
    /// the guest knows it. Its socket closes now if it was never watched,
    /// else after `sync` unwatches it.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        self.by_fd.remove(&c.stream.as_raw_fd());
        if c.host_initiated {
            self.host_ports.remove(&key.local_port);
        }
        if c.queued {
            self.ready.retain(|k| *k != key);
        }
        if rst && c.guest_knows() {
            self.push_reset(key);
        }
        self.counters.connections_closed += 1;
        if c.registered.is_some() {
            self.graveyard.push(c.stream);
        }
    }

    fn insert(&mut self, c: Connection) {
        let key = c.key;
        if let Some(at) = c.deadline {
            self.arm_timer(at);
        }
        self.by_fd.insert(c.stream.as_raw_fd(), key);
        self.conns.insert(key, c);
        self.counters.connections_opened += 1;
        self.touch(key);
    }

    /// Handles a well-formed packet from the guest.
    pub(super) fn on_guest_packet(&mut self, h: &Header, payload: &[u8]) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            // Nobody to answer: the guest may only speak as itself, to the host.
            self.counters.tx_bad_packets += 1;
            tracing::debug!(
                "vsock: dropped a packet from CID {} to CID {}",
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if self.conns.get(&key).is_some_and(|c| c.guest_gone) {
            // The guest has moved on (e.g. reuses the port): stop
            // delivering the old connection's last bytes.
            self.kill(key, false);
        }
        let known_op = (op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op);
        if h.type_ != socket_type::STREAM || !known_op {
            self.counters.tx_bad_packets += 1;
        }
        if h.type_ != socket_type::STREAM {
            if h.op != op::RST {
                self.refuse(key);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            match h.op {
                op::REQUEST => self.connect_for_guest(key, h),
                op::RST => {}
                _ => self.push_reset(key),
            }
            return;
        };
        c.update_peer_credit(h);
        let connecting = c.state == ConnState::Connecting;
        let result = match h.op {
            op::RESPONSE => c.accept(),
            op::RST => {
                if c.peer_reset() {
                    self.after_change(key);
                } else {
                    self.kill(key, false);
                }
                return;
            }
            op::CREDIT_UPDATE => Ok(()),
            op::CREDIT_REQUEST => {
                c.credit_requested_by_peer();
                Ok(())
            }
            _ if connecting => Err(ConnError::Protocol("packet before RESPONSE")),
            op::RW => c.recv_data(payload),
            op::SHUTDOWN => c.peer_shutdown(h.flags),
            op::REQUEST => Err(ConnError::Protocol("REQUEST for an existing connection")),
            _ => Err(ConnError::Protocol("unknown operation")),
        };
        match result {
            Ok(()) => self.after_change(key),
            Err(e) => {
                if matches!(e, ConnError::Credit(_)) {
                    self.counters.credit_violations += 1;
                }
                tracing::debug!("vsock: resetting {key:?}: {e}");
                self.kill(key, true);
            }
        }
    }

    /// Resets `key` on the guest side, and drops it here if it exists.
    fn refuse(&mut self, key: ConnKey) {
        if self.conns.contains_key(&key) {
            self.kill(key, true);
        } else {
            self.push_reset(key);
        }
    }

    /// Handles a guest packet that failed to parse.
    pub(super) fn on_bad_packet(&mut self, header: Option<Header>, error: PacketError) {
        self.counters.tx_bad_packets += 1;
        tracing::debug!("vsock: dropped a guest packet: {error}");
        let Some(h) = header else {
            return;
        };
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID || h.op == op::RST {
            return;
        }
        // Part of a stream was lost: that connection cannot go on.
        self.refuse(ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        });
    }

    /// A packet for the guest could not be delivered: its connection
    /// lost bytes or a control message, so it is reset.
    pub(super) fn on_lost_rx(&mut self, h: &Header) {
        if h.op != op::RST {
            self.refuse(ConnKey {
                local_port: h.src_port,
                peer_port: h.dst_port,
            });
        }
    }

    /// Closes a connection whose both sides are done, or waits (bounded)
    /// for its last bytes to reach the Unix peer; otherwise re-queues it.
    fn after_change(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.finished() {
            self.kill(key, true);
            return;
        }
        if c.peer_shut == shutdown::BOTH && c.deadline.is_none() {
            let at = Instant::now() + self.close_timeout;
            c.deadline = Some(at);
            self.arm_timer(at);
        }
        self.touch(key);
    }

    /// epoll reported `events` on connection or handshake socket `fd`.
    pub(super) fn on_socket(&mut self, fd: RawFd, events: EventSet) {
        if let Some(&key) = self.by_fd.get(&fd) {
            self.on_conn_event(key, events);
        } else if self.handshakes.contains_key(&fd) {
            self.on_handshake_event(fd);
        }
    }

    fn on_conn_event(&mut self, key: ConnKey, events: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let hup = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if hup {
            if c.state == ConnState::Connecting {
                // The host client gave up before the guest answered.
                let knows = c.guest_knows();
                self.kill(key, knows);
                return;
            }
            // Not watched from now on: read what is left until EOF.
            c.hup = true;
            c.data_ready = true;
        }
        if events.contains(EventSet::IN) {
            c.data_ready = true;
        }
        if events.contains(EventSet::OUT) || (hup && c.pending_len() > 0) {
            if let Err(e) = c.flush() {
                tracing::debug!("vsock: resetting {key:?}: {e}");
                self.kill(key, true);
                return;
            }
        }
        self.after_change(key);
    }

    fn arm_timer(&mut self, at: Instant) {
        if self.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        // A zero duration would disarm the timer.
        let dur = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(dur, None) {
            Ok(()) => self.timer_at = Some(at),
            Err(e) => tracing::warn!("vsock: cannot arm the timer: {e}"),
        }
    }

    /// Gives up on whatever ran out of time.
    pub(super) fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.timer_at = None;
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut later = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for h in self.handshakes.values().filter(|h| h.deadline > now) {
            later(h.deadline);
        }
        let mut expired = Vec::new();
        for c in self.conns.values() {
            match c.deadline {
                Some(t) if t <= now => expired.push((c.key, c.guest_knows())),
                Some(t) => later(t),
                None => {}
            }
        }
        match self.listener_paused_until {
            Some(t) if t <= now => self.listener_paused_until = None,
            Some(t) => later(t),
            None => {}
        }
        for fd in late {
            tracing::debug!("vsock: host client sent no CONNECT line in time");
            self.drop_handshake(fd);
        }
        for (key, knows) in expired {
            tracing::debug!("vsock: {key:?} timed out");
            self.kill(key, knows);
        }
        if let Some(t) = next {
            self.arm_timer(t);
        }
    }

    /// Brings epoll in line with the state: unwatches and closes dead
    /// sockets, watches new ones, updates changed interests.
    pub(super) fn sync(&mut self, ops: &mut EventOps) {
        for s in self.graveyard.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&s)) {
                tracing::warn!("vsock: cannot unwatch a socket: {e:?}");
            }
        }
        if !self.timer_registered {
            match ops.add(Events::with_data(&self.timer, TIMER_TOKEN, EventSet::IN)) {
                Ok(()) => self.timer_registered = true,
                Err(e) => tracing::error!("vsock: cannot watch the timer: {e:?}"),
            }
        }
        let want_listener = self.listener_paused_until.is_none();
        if want_listener != self.listener_registered {
            let ev = Events::with_data(&self.listener, LISTENER_TOKEN, EventSet::IN);
            let r = if want_listener {
                ops.add(ev)
            } else {
                ops.remove(ev)
            };
            match r {
                Ok(()) => self.listener_registered = want_listener,
                Err(e) => tracing::error!("vsock: cannot (un)watch the listener: {e:?}"),
            }
        }
        for fd in std::mem::take(&mut self.new_handshakes) {
            let Some(h) = self.handshakes.get_mut(&fd) else {
                continue;
            };
            if h.registered {
                continue;
            }
            match ops.add(Events::with_data(&h.stream, SOCKET_TOKEN, EventSet::IN)) {
                Ok(()) => h.registered = true,
                Err(e) => {
                    tracing::warn!("vsock: cannot watch a host client: {e:?}");
                    self.handshakes.remove(&fd);
                }
            }
        }
        let mut broken = Vec::new();
        for key in std::mem::take(&mut self.dirty) {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.dirty = false;
            let want = c.interest(self.rx_stalled);
            if want == c.registered {
                continue;
            }
            let r = match (c.registered, want) {
                (None, Some(s)) => ops.add(Events::with_data(&c.stream, SOCKET_TOKEN, s)),
                (Some(_), Some(s)) => ops.modify(Events::with_data(&c.stream, SOCKET_TOKEN, s)),
                (Some(_), None) => ops.remove(Events::empty(&c.stream)),
                (None, None) => Ok(()),
            };
            match r {
                Ok(()) => c.registered = want,
                Err(e) => {
                    tracing::warn!("vsock: cannot watch the socket of {key:?}: {e:?}");
                    broken.push(key);
                }
            }
        }
        for key in broken {
            self.kill(key, true);
        }
        // Sockets of connections killed just now.
        for s in self.graveyard.drain(..) {
            let _ = ops.remove(Events::empty(&s));
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours: leave nothing behind.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
