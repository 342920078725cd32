//! One connection between a guest port and a host Unix stream: its state,
//! credit-based flow control in both directions, the guest's bytes not yet
//! taken by the Unix peer, and the control packets owed to the guest.
//!
//! Guest to host: husk advertises `CONN_BUF_SIZE` and counts what it wrote
//! to the Unix socket in `fwd_cnt`; what the peer has not read waits in
//! `pending`. A guest that sends more than the space it was given is
//! reset. Since the guest sees the space shrink, a slow Unix reader slows
//! that connection's guest writer and nothing else.
//!
//! Host to guest: husk reads the Unix socket only as far as the guest's
//! last `buf_alloc` / `fwd_cnt` allow, straight into the packet it builds.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::Header;
use super::{op, shutdown, socket_type, unix, CONN_BUF_SIZE, CREDIT_UPDATE_THRESHOLD, HOST_CID};

/// A connection's ports: the host side's and the guest side's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ConnKey {
    /// Port on the host (CID 2) side.
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Host-initiated: the REQUEST is unanswered.
    Connecting,
    /// Data may flow.
    Established,
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    /// The guest sent more than the space it was given.
    #[error("guest sent {0} bytes over its credit")]
    Credit(usize),
    /// The guest broke the protocol (data before RESPONSE or after SHUTDOWN).
    #[error("{0}")]
    Protocol(&'static str),
    /// The Unix socket failed (peer gone).
    #[error("unix socket: {0}")]
    Io(#[source] io::Error),
}

/// What a connection has for the guest next.
#[derive(Debug)]
pub(super) enum RxItem {
    /// A packet; for RW, its `len` payload bytes are at the start of the
    /// caller's buffer.
    Packet(Header),
    /// Nothing now.
    Idle,
    /// The connection broke: reset it.
    Reset,
}

/// One connection.
pub(super) struct Connection {
    pub(super) stream: UnixStream,
    pub(super) key: ConnKey,
    pub(super) state: ConnState,
    /// Opened by a host client (its local port was allocated by husk).
    pub(super) host_initiated: bool,
    guest_cid: u64,
    // Guest to host.
    preamble: Vec<u8>,
    pending: VecDeque<u8>,
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// The Unix socket took less than offered: wait for EPOLLOUT.
    pub(super) write_blocked: bool,
    // Host to guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
    // Teardown.
    /// SHUTDOWN flags the guest sent, accumulated.
    pub(super) peer_shut: u32,
    shut_write_done: bool,
    /// The Unix peer will send no more (read returned 0).
    pub(super) host_eof: bool,
    /// epoll reported hang-up or error: the fd is no longer watched and
    /// is treated as readable until it says EOF.
    pub(super) hup: bool,
    /// The guest reset the connection after sending all its data: only
    /// the last bytes for the Unix peer remain, nothing goes to the guest.
    pub(super) guest_gone: bool,
    // Control packets owed to the guest.
    want_request: bool,
    want_response: bool,
    want_credit_update: bool,
    want_shutdown: u32,
    /// The Unix socket may have data for the guest.
    pub(super) data_ready: bool,
    // Muxer bookkeeping.
    /// In the muxer's queue of connections with something for the guest.
    pub(super) queued: bool,
    /// In the muxer's list of connections whose epoll interest may change.
    pub(super) dirty: bool,
    /// The epoll interest registered now; None: not registered.
    pub(super) registered: Option<EventSet>,
    /// When the connection is given up (no RESPONSE, or no final flush).
    pub(super) deadline: Option<Instant>,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, state: ConnState) -> Self {
        Self {
            stream,
            key,
            state,
            host_initiated: state == ConnState::Connecting,
            guest_cid,
            preamble: Vec::new(),
            pending: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            write_blocked: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            peer_shut: 0,
            shut_write_done: false,
            host_eof: false,
            hup: false,
            guest_gone: false,
            want_request: false,
            want_response: false,
            want_credit_update: false,
            want_shutdown: 0,
            data_ready: false,
            queued: false,
            dirty: false,
            registered: None,
            deadline: None,
        }
    }

    /// A host-initiated connection: a REQUEST goes to the guest.
    pub(super) fn new_local(stream: UnixStream, key: ConnKey, guest_cid: u64) -> Self {
        let mut c = Self::new(stream, key, guest_cid, ConnState::Connecting);
        c.want_request = true;
        c
    }

    /// A guest-initiated connection, from its REQUEST: a RESPONSE goes back.
    pub(super) fn new_peer(stream: UnixStream, key: ConnKey, guest_cid: u64, req: &Header) -> Self {
        let mut c = Self::new(stream, key, guest_cid, ConnState::Established);
        c.update_peer_credit(req);
        c.want_response = true;
        // Bytes may already be waiting on the Unix side.
        c.data_ready = true;
        c
    }

    /// Takes the guest's latest credit information (every packet has it).
    pub(super) fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Bytes the guest can take now. A guest claiming to have consumed
    /// more than it was sent gets no credit rather than a lot.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes not yet taken by the Unix peer.
    pub(super) fn pending_len(&self) -> usize {
        self.pending.len() + self.preamble.len()
    }

    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && self.peer_shut & shutdown::RCV == 0
            && !self.host_eof
            && self.peer_credit() > 0
    }

    fn needs_credit_request(&self) -> bool {
        self.state == ConnState::Established
            && self.data_ready
            && self.peer_shut & shutdown::RCV == 0
            && !self.host_eof
            && self.peer_credit() == 0
            && !self.credit_requested
    }

    /// Whether the connection has a packet for the guest.
    pub(super) fn has_rx_work(&self) -> bool {
        !self.guest_gone && self.has_packet()
    }

    fn has_packet(&self) -> bool {
        self.want_request
            || self.want_response
            || self.want_credit_update
            || self.want_shutdown != 0
            || (self.data_ready && self.can_send_data())
            || self.needs_credit_request()
    }

    /// Whether the guest knows the connection: a REQUEST went to it, and
    /// it did not reset the connection itself.
    pub(super) fn guest_knows(&self) -> bool {
        !self.want_request && !self.guest_gone
    }

    /// The guest reset the connection. A guest that had finished sending
    /// (Linux resets a connection whose close was not acknowledged in
    /// time) still has its last bytes delivered; returns whether any wait.
    pub(super) fn peer_reset(&mut self) -> bool {
        if self.peer_shut & shutdown::SEND == 0 || self.pending_len() == 0 {
            return false;
        }
        self.guest_gone = true;
        self.peer_shut = shutdown::BOTH;
        self.data_ready = false;
        true
    }

    /// Whether the guest closed both directions and its data reached the
    /// Unix peer: the connection can be reset and dropped.
    pub(super) fn finished(&self) -> bool {
        self.peer_shut == shutdown::BOTH && self.pending_len() == 0
    }

    /// The epoll interest the connection needs: IN while data can go to
    /// the guest (and the guest has receive buffers), OUT while guest data
    /// waits for the Unix peer. Registered with no interest at all, epoll
    /// still reports hang-ups. None once hung up.
    pub(super) fn interest(&self, rx_stalled: bool) -> Option<EventSet> {
        if self.hup {
            return None;
        }
        let mut s = EventSet::empty();
        if !self.data_ready && !rx_stalled && self.can_send_data() {
            s |= EventSet::IN;
        }
        if self.write_blocked {
            s |= EventSet::OUT;
        }
        Some(s)
    }

    /// The guest accepted a host-initiated connection: the host client
    /// gets `OK <port>\n`, then the connection's data.
    pub(super) fn accept(&mut self) -> Result<(), ConnError> {
        if self.state != ConnState::Connecting {
            return Err(ConnError::Protocol("RESPONSE on an established connection"));
        }
        self.state = ConnState::Established;
        self.deadline = None;
        self.preamble = format!("OK {}\n", self.key.local_port).into_bytes();
        self.data_ready = true;
        self.flush()
    }

    /// Takes RW payload from the guest: to the Unix socket, or into
    /// `pending` while the peer is not reading.
    pub(super) fn recv_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.state != ConnState::Established {
            return Err(ConnError::Protocol(
                "data before the connection was accepted",
            ));
        }
        if self.peer_shut & shutdown::SEND != 0 {
            return Err(ConnError::Protocol("data after SHUTDOWN(SEND)"));
        }
        let held = self.pending.len() + data.len();
        if held > CONN_BUF_SIZE as usize {
            return Err(ConnError::Credit(held - CONN_BUF_SIZE as usize));
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
        let mut rest = data;
        if self.pending_len() == 0 {
            let n = send_some(self.stream.as_raw_fd(), rest)?;
            self.forwarded(n);
            rest = &rest[n..];
        }
        self.pending.extend(rest);
        if !rest.is_empty() {
            self.write_blocked = true;
        }
        Ok(())
    }

    fn forwarded(&mut self, n: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.want_credit_update = true;
        }
    }

    /// Writes the preamble and pending guest data until the socket stops
    /// taking them; then applies a SHUTDOWN(SEND) that waited for them.
    pub(super) fn flush(&mut self) -> Result<(), ConnError> {
        let fd = self.stream.as_raw_fd();
        while !self.preamble.is_empty() {
            let n = send_some(fd, &self.preamble)?;
            if n == 0 {
                self.write_blocked = true;
                return Ok(());
            }
            self.preamble.drain(..n);
        }
        while !self.pending.is_empty() {
            let n = send_some(fd, self.pending.as_slices().0)?;
            if n == 0 {
                self.write_blocked = true;
                return Ok(());
            }
            self.pending.drain(..n);
            self.forwarded(n);
        }
        self.write_blocked = false;
        if self.peer_shut & shutdown::SEND != 0 && !self.shut_write_done {
            self.shut_write_done = true;
            // The peer may be gone already; then there is nobody to tell.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Applies SHUTDOWN flags from the guest: RCV stops reading the Unix
    /// socket (its writer then gets EPIPE), SEND ends the Unix peer's
    /// input once pending data is through.
    pub(super) fn peer_shutdown(&mut self, flags: u32) -> Result<(), ConnError> {
        let new = flags & shutdown::BOTH & !self.peer_shut;
        self.peer_shut |= flags & shutdown::BOTH;
        if new & shutdown::RCV != 0 {
            self.data_ready = false;
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if new & shutdown::SEND != 0 {
            self.flush()?;
        }
        Ok(())
    }

    /// The guest asked for our credit information.
    pub(super) fn credit_requested_by_peer(&mut self) {
        self.want_credit_update = true;
    }

    fn header(&mut self, op: u16, len: u32, flags: u32) -> Header {
        // Every packet tells the guest our credit: no update owed after it.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.want_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: socket_type::STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet for the guest, reading at most `room` bytes of data
    /// into `buf`: connection setup first, then data, then shutdown and
    /// credit information.
    pub(super) fn next_rx(&mut self, room: usize, buf: &mut [u8]) -> RxItem {
        if self.guest_gone {
            return RxItem::Idle;
        }
        if self.want_request {
            self.want_request = false;
            return RxItem::Packet(self.header(op::REQUEST, 0, 0));
        }
        if self.want_response {
            self.want_response = false;
            return RxItem::Packet(self.header(op::RESPONSE, 0, 0));
        }
        if self.data_ready && self.can_send_data() && room > 0 {
            let want = room.min(buf.len()).min(self.peer_credit() as usize);
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    self.host_eof = true;
                    self.data_ready = false;
                    self.want_shutdown |= shutdown::SEND;
                }
                Ok(n) => {
                    self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                    // A short read most likely emptied the socket: let
                    // epoll say when there is more.
                    if n < want && !self.hup {
                        self.data_ready = false;
                    }
                    return RxItem::Packet(self.header(op::RW, n as u32, 0));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.data_ready = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock: reading the unix socket of {:?}: {e}", self.key);
                    return RxItem::Reset;
                }
            }
        }
        if self.needs_credit_request() {
            self.credit_requested = true;
            return RxItem::Packet(self.header(op::CREDIT_REQUEST, 0, 0));
        }
        if self.want_shutdown != 0 {
            let flags = self.want_shutdown;
            self.want_shutdown = 0;
            return RxItem::Packet(self.header(op::SHUTDOWN, 0, flags));
        }
        if self.want_credit_update {
            return RxItem::Packet(self.header(op::CREDIT_UPDATE, 0, 0));
        }
        RxItem::Idle
    }
}

/// Sends what the socket takes; `WouldBlock` is 0 bytes.
fn send_some(fd: RawFd, buf: &[u8]) -> Result<usize, ConnError> {
    if buf.is_empty() {
        return Ok(0);
    }
    match unix::send(fd, buf) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(ConnError::Io(e)),
    }
}
