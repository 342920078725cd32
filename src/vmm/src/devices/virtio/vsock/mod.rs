//! virtio-vsock with the host side on Unix sockets.
//!
//! `packet.rs` reads and writes the 44-byte packet header and checks
//! descriptor chains (pure, fuzzed), `connection.rs` is one connection's
//! state and its credit-based flow control, `muxer.rs` the host side (the
//! listening socket, the `CONNECT <port>` handshake, connections by port
//! pair, what goes to the guest next), `unix.rs` the few socket calls std
//! lacks, `device.rs` the virtio device with its RX and TX paths and
//! `event_handler.rs` its event-loop glue.
//!
//! Host protocol: a host client connects to the VM's socket and writes
//! `CONNECT <port>\n`; once the guest accepts, it reads `OK <hostport>\n`
//! and the stream carries the connection's bytes. If the guest refuses,
//! the client's socket is closed. A guest connecting to host port P
//! reaches the Unix socket `<socket>_P`, or is reset if nothing listens.
//! Only stream sockets exist (no SEQPACKET).

mod connection;
mod device;
mod event_handler;
mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;
mod unix;

use std::time::Duration;

pub use device::Vsock;
pub use packet::{Header, PacketError};

/// Queue size offered for the transmit and event queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue size offered for the receive queue. Linux fills the whole
/// receive queue with 4 KiB packet buffers (an 8 KiB allocation each)
/// when the device probes: 256 of them were ~2 MiB of guest memory and,
/// on kvm_pvm, ~0.15 s of every boot. 64 buffers (256 KiB in flight) keep
/// host-to-guest streams at the same rate, which the guest's per-packet
/// cost bounds, not the ring.
pub const RX_QUEUE_SIZE: u16 = 64;
/// The size offered for each queue, by index (receive, transmit, event).
pub const QUEUE_SIZES: [u16; 3] = [RX_QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE];
/// Index of the receive (host to guest) queue.
pub const RX_INDEX: usize = 0;
/// Index of the transmit (guest to host) queue.
pub const TX_INDEX: usize = 1;
/// Index of the event queue (transport resets after a restore).
pub const EVENT_INDEX: usize = 2;
/// Most descriptors accepted in one chain.
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// The host's well-known CID.
pub const HOST_CID: u64 = 2;
/// Smallest CID a guest may have (0 and 1 are reserved, 2 is the host).
pub const MIN_GUEST_CID: u32 = 3;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Largest payload accepted or sent in one packet (Linux uses the same cap).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Receive buffer per connection, advertised to the guest as `buf_alloc`:
/// guest data the Unix peer has not read yet stays in it, and a guest that
/// sends more than this before it is read is reset.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// A credit update goes to the guest each time this much of its data has
/// been forwarded since the guest last heard the count.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// First port handed out for host-initiated connections.
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// Most live connections (each holds a Unix socket).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients that have connected but not yet sent their
/// `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// Most resets queued for the guest; past this the device stops reading
/// the guest's packets until the guest takes them (it must post RX
/// buffers to make progress).
pub const MAX_QUEUED_RESETS: usize = 256;
/// Longest `CONNECT <port>` line accepted, newline included.
pub const MAX_CONNECT_LINE: usize = 32;
/// A host client must send its `CONNECT` line within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The guest must answer a host-initiated connection request within this time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the guest closed a connection, its last bytes have this long to
/// reach the Unix peer.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `uds_path`, so that `<uds_path>_<port>` always fits in a
/// `sockaddr_un` (108 bytes with the NUL).
pub const MAX_UDS_PATH: usize = 107 - 11;

/// Packet types (`virtio_vsock_hdr.type`).
pub mod socket_type {
    /// Stream socket, the only type husk offers.
    pub const STREAM: u16 = 1;
}

/// Operations (`virtio_vsock_hdr.op`).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection refused or torn down.
    pub const RST: u16 = 3;
    /// The sender will not receive and/or send any more (see `shutdown`).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's `buf_alloc` / `fwd_cnt` changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` of a SHUTDOWN packet.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    /// Both.
    pub const BOTH: u32 = RCV | SEND;
}

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockCounters {
    /// Packets delivered to the guest.
    pub rx_packets: u64,
    /// Receive chains returned unused because they were malformed.
    pub rx_bad_chains: u64,
    /// Guest packets taken from the transmit queue.
    pub tx_packets: u64,
    /// Guest packets refused (malformed, misaddressed, unknown op or type).
    pub tx_bad_packets: u64,
    /// Resets sent to the guest.
    pub resets_sent: u64,
    /// Connections reset because the guest sent more than its credit.
    pub credit_violations: u64,
    /// Connections established (either direction).
    pub connections_opened: u64,
    /// Connections removed.
    pub connections_closed: u64,
}

/// Errors setting up a vsock device. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The socket path is taken.
    #[error("vsock socket {0} already exists (remove it, or pick another path)")]
    PathInUse(String),
    /// The listening socket could not be created.
    #[error("cannot listen on vsock socket {0}: {1}")]
    Bind(String, #[source] std::io::Error),
    /// An eventfd or timerfd could not be created.
    #[error("vsock: {0}: {1}")]
    Host(&'static str, #[source] std::io::Error),
}
