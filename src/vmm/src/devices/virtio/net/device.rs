//! The virtio-net device: config space (MAC), and the RX and TX paths run
//! on the event-loop thread.
//!
//! RX: a packet is read from the tap only when it can be delivered; when
//! the guest has no receive buffer left, the packet waits in `rx_packet`
//! and the event loop stops watching the tap (back-pressure: the kernel
//! queues, then drops, further frames) until the guest adds buffers.

use std::io::ErrorKind;

use virtio_queue::QueueOwnedT;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::features::VIRTIO_NET_F_MAC;
use super::packet::{self, FrameError, MAX_PACKET_LEN};
use super::{MacAddr, NetError, Tap, MAX_DESCRIPTORS, QUEUE_SIZE, RX_INDEX, TX_INDEX};
use crate::devices::virtio::device::{
    read_config_bytes, ActivateContext, ActivateError, DeviceCore, VirtioDevice,
};
use crate::devices::virtio::features::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::devices::virtio::queue::{self, collect_chain, Chain, QueueError};
use crate::devices::virtio::{device_type, feature, GuestMem};

/// Packets handled per wake-up and direction before yielding to the rest
/// of the event loop (a flooding peer or guest cannot starve it).
const BUDGET: usize = 256;

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames from the tap that were dropped.
    pub rx_dropped: u64,
    /// Receive chains returned unused because they were malformed.
    pub rx_bad_chains: u64,
    /// Frames sent to the tap.
    pub tx_frames: u64,
    /// Guest frames dropped (malformed chain, bad header, tap error).
    pub tx_dropped: u64,
}

/// A virtio-net device on a tap.
pub struct Net {
    pub(super) tap: Tap,
    mac: MacAddr,
    pub(super) core: DeviceCore<2>,
    /// The guest had no receive buffer for `rx_packet`.
    pub(super) rx_stalled: bool,
    /// Whether the event loop watches the tap.
    pub(super) tap_registered: bool,
    /// The tap failed for good (e.g. the interface was deleted).
    pub(super) tap_broken: bool,
    rx_buf: Vec<u8>,
    rx_packet: Option<usize>,
    tx_buf: Vec<u8>,
    counters: NetCounters,
}

/// Why a receive chain could not take the pending packet.
enum RxFail {
    /// Malformed chain: give it back empty, keep the packet.
    BadChain,
    /// Fine chain, too small for this packet: drop the packet, keep the chain.
    TooSmall,
}

impl Net {
    /// A device on `tap` with `mac`.
    pub fn new(tap: Tap, mac: MacAddr) -> Result<Self, NetError> {
        let features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_NET_F_MAC);
        Ok(Self {
            tap,
            mac,
            core: DeviceCore::new("virtio-net", features, QUEUE_SIZE).map_err(NetError::EventFd)?,
            rx_stalled: false,
            tap_registered: false,
            tap_broken: false,
            rx_buf: vec![0u8; MAX_PACKET_LEN],
            rx_packet: None,
            tx_buf: Vec::with_capacity(MAX_PACKET_LEN),
            counters: NetCounters::default(),
        })
    }

    /// The MAC address the guest sees.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Frame counters so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Whether the device is running and healthy.
    pub(super) fn running(&self) -> bool {
        self.core.running()
    }

    /// Moves packets from the tap to the guest. Returns true when the tap
    /// may still hold packets but the budget ran out.
    pub fn process_rx(&mut self) -> bool {
        if !self.running() {
            return false;
        }
        match self.rx_loop() {
            Ok(true) => {
                // Budget spent: come back after the other event sources.
                self.core.requeue(RX_INDEX);
                true
            }
            Ok(false) => false,
            Err(e) => {
                if let Some(a) = &self.core.active {
                    a.failure.fail(&format!("virtio-net RX queue: {e}"));
                }
                false
            }
        }
    }

    fn rx_loop(&mut self) -> Result<bool, QueueError> {
        let Some(a) = self.core.active.as_mut() else {
            return Ok(false);
        };
        let mem = &a.mem;
        let mut used = false;
        let mut avail = queue::AvailWatch::default();
        let mut steps = 0usize;
        let more = loop {
            // Each step reads a packet or consumes a chain: bound both.
            steps += 1;
            if steps > 2 * BUDGET {
                break true;
            }
            if self.rx_packet.is_none() {
                match self.tap.read(&mut self.rx_buf) {
                    Ok(n) => match packet::prepare_rx(&mut self.rx_buf[..n]) {
                        Ok(()) => self.rx_packet = Some(n),
                        Err(e) => {
                            tracing::debug!("virtio-net: dropped a frame from the tap: {e}");
                            self.counters.rx_dropped += 1;
                            continue;
                        }
                    },
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(
                            "virtio-net: tap {} failed, no more receive: {e}",
                            self.tap.name()
                        );
                        self.tap_broken = true;
                        break false;
                    }
                }
            }
            let Some(len) = self.rx_packet else {
                continue;
            };
            let Some(chain) = avail.pop(&mut a.queues[RX_INDEX], mem)? else {
                if avail.recheck(&mut a.queues[RX_INDEX], mem)? {
                    continue;
                }
                // No buffer: hold the packet and stop reading the tap until
                // the guest adds buffers (RX queue notification).
                self.rx_stalled = true;
                break false;
            };
            let head = chain.head_index();
            let chain = collect_chain(chain, mem, MAX_DESCRIPTORS);
            match write_packet(mem, &chain, &self.rx_buf[..len]) {
                Ok(()) => {
                    queue::add_used(&mut a.queues[RX_INDEX], mem, head, len as u32)?;
                    used = true;
                    self.counters.rx_frames += 1;
                    self.rx_packet = None;
                }
                Err(RxFail::BadChain) => {
                    queue::add_used(&mut a.queues[RX_INDEX], mem, head, 0)?;
                    used = true;
                    self.counters.rx_bad_chains += 1;
                }
                Err(RxFail::TooSmall) => {
                    a.queues[RX_INDEX].go_to_previous_position();
                    tracing::debug!(
                        "virtio-net: {len}-byte frame larger than the guest's buffers, dropped"
                    );
                    self.counters.rx_dropped += 1;
                    self.rx_packet = None;
                }
            }
        };
        if used {
            queue::notify_used(&mut a.queues[RX_INDEX], mem, a.interrupt.as_ref())?;
        }
        Ok(more)
    }

    /// The guest added receive buffers.
    pub fn rx_buffers_added(&mut self) {
        self.rx_stalled = false;
    }

    /// Sends the guest's packets to the tap. Returns true when the budget
    /// ran out with packets left (the TX eventfd is re-armed).
    pub fn process_tx(&mut self) -> bool {
        if !self.running() {
            return false;
        }
        match self.tx_loop() {
            Ok(true) => {
                self.core.requeue(TX_INDEX);
                true
            }
            Ok(false) => false,
            Err(e) => {
                if let Some(a) = &self.core.active {
                    a.failure.fail(&format!("virtio-net TX queue: {e}"));
                }
                false
            }
        }
    }

    fn tx_loop(&mut self) -> Result<bool, QueueError> {
        let Some(a) = self.core.active.as_mut() else {
            return Ok(false);
        };
        let mem = &a.mem;
        let (tap, tx_buf, counters) = (&mut self.tap, &mut self.tx_buf, &mut self.counters);
        let drained = queue::drain(
            &mut a.queues[TX_INDEX],
            mem,
            a.interrupt.as_ref(),
            BUDGET,
            |chain| {
                let chain = collect_chain(chain, mem, MAX_DESCRIPTORS);
                match gather_packet(mem, &chain, tx_buf) {
                    Ok(()) => match tap.write(tx_buf) {
                        Ok(_) => counters.tx_frames += 1,
                        Err(e) => {
                            tracing::debug!("virtio-net: writing tap {}: {e}", tap.name());
                            counters.tx_dropped += 1;
                        }
                    },
                    Err(e) => {
                        tracing::debug!("virtio-net: dropped a guest frame: {e}");
                        counters.tx_dropped += 1;
                    }
                }
                queue::Served::written(0)
            },
        )?;
        Ok(drained == queue::Drained::BudgetSpent)
    }
}

/// Why a guest frame was not sent.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("{0}")]
    Chain(#[from] queue::ChainError),
    #[error("device-writable buffer in a transmit chain")]
    WrongDirection,
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Copies a transmit chain into `buf` and checks its header.
fn gather_packet(mem: &GuestMem, chain: &Chain, buf: &mut Vec<u8>) -> Result<(), TxError> {
    if let Some(e) = chain.error {
        return Err(e.into());
    }
    buf.clear();
    let mut total = 0usize;
    for s in &chain.segments {
        if s.writable {
            return Err(TxError::WrongDirection);
        }
        total += s.len as usize;
        if total > MAX_PACKET_LEN {
            return Err(FrameError::TooLong(total).into());
        }
    }
    buf.resize(total, 0);
    let mut off = 0usize;
    for s in &chain.segments {
        let n = s.len as usize;
        mem.read_slice(&mut buf[off..off + n], s.addr)?;
        off += n;
    }
    packet::prepare_tx(buf)?;
    Ok(())
}

/// Copies a received packet into a receive chain.
fn write_packet(mem: &GuestMem, chain: &Chain, pkt: &[u8]) -> Result<(), RxFail> {
    if let Some(e) = chain.error {
        tracing::debug!("virtio-net: bad receive chain: {e}");
        return Err(RxFail::BadChain);
    }
    if chain.segments.iter().any(|s| !s.writable) {
        tracing::debug!("virtio-net: device-readable buffer in a receive chain");
        return Err(RxFail::BadChain);
    }
    let room: u64 = chain.segments.iter().map(|s| u64::from(s.len)).sum();
    if room < pkt.len() as u64 {
        return Err(RxFail::TooSmall);
    }
    let mut off = 0usize;
    for s in &chain.segments {
        if off == pkt.len() {
            break;
        }
        let n = (pkt.len() - off).min(s.len as usize);
        mem.write_slice(&pkt[off..off + n], s.addr)
            .map_err(|_| RxFail::BadChain)?;
        off += n;
    }
    Ok(())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
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
        // mac[6], then status (not offered: reads 0).
        read_config_bytes(&self.mac.0, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.rx_stalled = false;
        self.core.activate(ctx)
    }

    fn is_activated(&self) -> bool {
        self.core.is_activated()
    }

    fn reset(&mut self) {
        self.rx_stalled = false;
        // A packet held for the old driver is stale.
        self.rx_packet = None;
        self.core.reset();
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.core.queue_positions()
    }
}
