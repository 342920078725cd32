//! The virtio-vsock device: config space (the guest's CID), and the RX and
//! TX paths, run on the event-loop thread.
//!
//! TX: every guest packet is taken off the ring at once and handed to the
//! muxer (credit keeps a guest from sending more than a connection can
//! hold). The one exception: while too many resets wait for the guest,
//! TX pauses until the guest takes them.
//!
//! RX: a packet is built only into a buffer the guest gave, so a Unix
//! socket is read only when its data can go somewhere. When the guest has
//! no buffer left, the muxer stops watching Unix sockets until the guest
//! adds buffers (the RX queue notification).

use std::path::Path;

use virtio_queue::QueueOwnedT;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet;
use super::{
    VsockCounters, VsockError, EVENT_INDEX, MAX_DESCRIPTORS, MAX_PAYLOAD, QUEUE_SIZE, QUEUE_SIZES,
    RX_INDEX, TX_INDEX,
};
use crate::devices::virtio::device::{
    read_config_bytes, ActivateContext, ActivateError, DeviceCore, VirtioDevice,
};
use crate::devices::virtio::features::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::devices::virtio::queue::{self, collect_chain, QueueError};
use crate::devices::virtio::{device_type, feature};

/// Packets handled per wake-up and direction before yielding to the rest
/// of the event loop.
const BUDGET: usize = 256;

/// A virtio-vsock device whose host side is a Unix socket.
pub struct Vsock {
    guest_cid: u64,
    // Boxed: the connection tables would make the device large to move.
    pub(super) muxer: Box<Muxer>,
    // The event queue holds the driver's event buffers; husk's only event
    // is the transport reset after a snapshot is restored.
    pub(super) core: DeviceCore<3>,
    /// The driver was (re)activated or reset since the event loop last looked.
    pub(super) state_changed: bool,
    /// TX waits for the guest to take queued resets.
    pub(super) tx_paused: bool,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening on `uds_path`.
    pub fn new(guest_cid: u32, uds_path: &Path) -> Result<Self, VsockError> {
        let guest_cid = u64::from(guest_cid);
        Ok(Self {
            guest_cid,
            muxer: Box::new(Muxer::new(guest_cid, uds_path)?),
            core: DeviceCore::new(
                "virtio-vsock",
                feature(VIRTIO_F_VERSION_1)
                    | feature(VIRTIO_RING_F_EVENT_IDX)
                    | feature(VIRTIO_RING_F_INDIRECT_DESC),
                QUEUE_SIZE,
            )
            .map_err(|e| VsockError::Host("eventfd", e))?
            .with_queue_sizes(QUEUE_SIZES),
            state_changed: false,
            tx_paused: false,
            rx_buf: vec![0u8; MAX_PAYLOAD],
            tx_buf: Vec::with_capacity(MAX_PAYLOAD),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The socket host clients connect to.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Packet and connection counters so far.
    pub fn counters(&self) -> VsockCounters {
        self.muxer.counters
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Whether the device is running and healthy.
    pub(super) fn running(&self) -> bool {
        self.core.running()
    }

    /// Applies an activation or reset the vCPU thread announced: the
    /// connections of a previous driver are forgotten either way.
    pub(super) fn apply_state_change(&mut self) {
        if !self.state_changed {
            return;
        }
        self.state_changed = false;
        self.muxer.reset_all();
        self.tx_paused = false;
        self.muxer.set_driver_ready(self.core.active.is_some());
    }

    /// Tells the driver that every connection is gone
    /// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in its first event buffer): after
    /// a restore, the host ends of the guest's connections do not exist.
    /// Returns whether the event was delivered (the driver may have posted
    /// no buffer).
    pub fn send_transport_reset(&mut self) -> Result<bool, QueueError> {
        /// `struct virtio_vsock_event { le32 id; }`, id 0: transport reset.
        const TRANSPORT_RESET: [u8; 4] = 0u32.to_le_bytes();
        let Some(a) = self.core.active.as_mut() else {
            return Ok(false);
        };
        let mem = &a.mem;
        let Some(chain) = queue::pop_chain(&mut a.queues[EVENT_INDEX], mem)? else {
            return Ok(false);
        };
        let head = chain.head_index();
        let c = collect_chain(chain, mem, MAX_DESCRIPTORS);
        let written = match c.segments.first() {
            Some(seg) if c.error.is_none() && seg.writable && seg.len >= 4 => {
                use vm_memory::Bytes;
                mem.write_slice(&TRANSPORT_RESET, seg.addr).is_ok()
            }
            _ => false,
        };
        let len = if written { 4 } else { 0 };
        queue::add_used(&mut a.queues[EVENT_INDEX], mem, head, len)?;
        queue::notify_used(&mut a.queues[EVENT_INDEX], mem, a.interrupt.as_ref())?;
        Ok(written)
    }

    /// Moves guest packets to the muxer, then host packets to the guest.
    pub fn process_queues(&mut self) {
        self.process_tx();
        self.process_host();
    }

    /// Moves host packets to the guest, and resumes TX if that made room.
    pub fn process_host(&mut self) {
        self.process_rx();
        if self.tx_paused && !self.muxer.rx_backlog_full() {
            self.tx_paused = false;
            self.process_tx();
            self.process_rx();
        }
    }

    /// Delivers packets to the guest. Returns true when the budget ran out
    /// with packets left (the RX eventfd is re-armed).
    pub fn process_rx(&mut self) -> bool {
        if !self.running() {
            return false;
        }
        match self.rx_loop() {
            Ok(true) => {
                self.core.requeue(RX_INDEX);
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.fail(&format!("virtio-vsock RX queue: {e}"));
                false
            }
        }
    }

    fn fail(&self, why: &str) {
        if let Some(a) = &self.core.active {
            a.failure.fail(why);
        }
    }

    fn rx_loop(&mut self) -> Result<bool, QueueError> {
        let Some(a) = self.core.active.as_mut() else {
            return Ok(false);
        };
        let mem = &a.mem;
        let mut used = false;
        let mut avail = queue::AvailWatch::default();
        let mut budget = BUDGET;
        let more = loop {
            if !self.muxer.has_rx() {
                break false;
            }
            if budget == 0 {
                break true;
            }
            let Some(chain) = avail.pop(&mut a.queues[RX_INDEX], mem)? else {
                if avail.recheck(&mut a.queues[RX_INDEX], mem)? {
                    continue;
                }
                // Hold what is queued and stop reading Unix sockets until
                // the guest adds buffers.
                self.muxer.set_rx_stalled(true);
                break false;
            };
            budget -= 1;
            let head = chain.head_index();
            let chain = collect_chain(chain, mem, MAX_DESCRIPTORS);
            let room = match packet::rx_room(&chain) {
                Ok(room) => room,
                Err(e) => {
                    tracing::debug!("virtio-vsock: bad receive chain: {e}");
                    self.muxer.counters.rx_bad_chains += 1;
                    queue::add_used(&mut a.queues[RX_INDEX], mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let Some(h) = self.muxer.next_rx(room, &mut self.rx_buf) else {
                a.queues[RX_INDEX].go_to_previous_position();
                break false;
            };
            let payload = &self.rx_buf[..h.len as usize];
            match packet::write_rx(mem, &chain, &h, payload) {
                Ok(n) => {
                    queue::add_used(&mut a.queues[RX_INDEX], mem, head, n)?;
                    self.muxer.counters.rx_packets += 1;
                }
                Err(e) => {
                    // Checked above: only a memory fault gets here. The
                    // packet is lost, so is its connection's integrity.
                    tracing::warn!("virtio-vsock: cannot write a receive chain: {e}");
                    self.muxer.counters.rx_bad_chains += 1;
                    queue::add_used(&mut a.queues[RX_INDEX], mem, head, 0)?;
                    self.muxer.on_lost_rx(&h);
                }
            }
            used = true;
        };
        if used {
            queue::notify_used(&mut a.queues[RX_INDEX], mem, a.interrupt.as_ref())?;
        }
        Ok(more)
    }

    /// The guest added receive buffers.
    pub fn rx_buffers_added(&mut self) {
        self.muxer.set_rx_stalled(false);
    }

    /// Takes the guest's packets. Returns true when the budget ran out
    /// with packets left (the TX eventfd is re-armed).
    pub fn process_tx(&mut self) -> bool {
        if !self.running() || self.tx_paused {
            return false;
        }
        match self.tx_loop() {
            Ok(true) => {
                self.core.requeue(TX_INDEX);
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.fail(&format!("virtio-vsock TX queue: {e}"));
                false
            }
        }
    }

    fn tx_loop(&mut self) -> Result<bool, QueueError> {
        let Some(a) = self.core.active.as_mut() else {
            return Ok(false);
        };
        // Resumed by RX progress, not by a guest notification: checked
        // before draining and after every packet, never with a chain popped
        // and unserved.
        if self.muxer.rx_backlog_full() {
            self.tx_paused = true;
            return Ok(false);
        }
        let mem = &a.mem;
        let (muxer, tx_buf) = (&mut self.muxer, &mut self.tx_buf);
        let drained = queue::drain(
            &mut a.queues[TX_INDEX],
            mem,
            a.interrupt.as_ref(),
            BUDGET,
            |chain| {
                let chain = collect_chain(chain, mem, MAX_DESCRIPTORS);
                match packet::parse_tx(mem, &chain) {
                    Ok(p) => match packet::read_payload(mem, &p.payload, tx_buf) {
                        Ok(()) => {
                            muxer.counters.tx_packets += 1;
                            muxer.on_guest_packet(&p.header, tx_buf);
                        }
                        Err(e) => muxer.on_bad_packet(Some(p.header), e),
                    },
                    Err(bad) => muxer.on_bad_packet(bad.header, bad.error),
                }
                queue::Served {
                    len: 0,
                    stop: muxer.rx_backlog_full(),
                }
            },
        )?;
        if drained == queue::Drained::Stopped {
            self.tx_paused = true;
        }
        Ok(drained == queue::Drained::BudgetSpent)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn avail_features(&self) -> u64 {
        self.core.avail_features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.core.queue_max_sizes()
    }

    fn queue_events(&self) -> &[EventFd] {
        self.core.queue_events()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // le64 guest_cid.
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state_changed = true;
        self.core.activate(ctx)
    }

    fn is_activated(&self) -> bool {
        self.core.is_activated()
    }

    fn reset(&mut self) {
        self.state_changed = true;
        self.core.reset();
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.core.queue_positions()
    }

    fn save_extra(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "connections": self.connection_count() }))
    }

    fn restored(&mut self, extra: Option<&serde_json::Value>) {
        // Without connections the guest has nothing to lose, and a reset
        // handled late would break the first connections made after the
        // restore (it resets every socket it finds).
        let connections = extra
            .and_then(|e| e.get("connections"))
            .and_then(serde_json::Value::as_u64);
        if connections == Some(0) {
            return;
        }
        match self.send_transport_reset() {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "virtio-vsock: the driver left no event buffer: its connections will time out"
            ),
            Err(e) => self
                .core
                .active
                .as_ref()
                .map_or((), |a| a.failure.fail(&format!("event queue: {e}"))),
        }
    }
}
