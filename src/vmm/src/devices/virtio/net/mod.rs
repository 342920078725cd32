//! virtio-net over a Linux tap.
//!
//! `packet.rs` checks and fixes the virtio-net header of frames in both
//! directions (pure, fuzzed), `tap.rs` opens the tap (the FFI lives
//! there), `device.rs` is the virtio device with its RX and TX paths,
//! `event_handler.rs` its event-loop glue.
//!
//! No offload feature is offered: the tap is told to deliver plain frames
//! (TUNSETOFFLOAD 0) and the guest computes its own checksums. The 12-byte
//! `virtio_net_hdr_v1` still travels with every frame, in both directions.

mod device;
mod event_handler;
pub mod packet;
pub mod tap;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

pub use device::{Net, NetCounters};
pub use tap::Tap;

/// Queue size offered for RX and TX.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_INDEX: usize = 0;
/// Index of the transmit queue.
pub const TX_INDEX: usize = 1;
/// Most descriptors accepted in one chain.
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// Feature bits (virtio 1.x, 5.1.3).
pub mod features {
    /// The device has a MAC address in config space.
    pub const VIRTIO_NET_F_MAC: u32 = 5;
}

/// Errors setting up a network device. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Not a usable interface name.
    #[error("invalid tap name {0:?}: 1 to 15 characters, no '/', ':' or whitespace")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    /// A tap ioctl failed.
    #[error("tap {0}: {1} failed: {2}")]
    Ioctl(String, &'static str, #[source] std::io::Error),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// An Ethernet MAC address (`aa:bb:cc:dd:ee:ff` in configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl MacAddr {
    /// A random locally administered unicast address.
    pub fn random() -> Self {
        let mut b = [0u8; 6];
        if crate::sys::fill_random(&mut b).is_err() {
            // Unlikely; fall back to something that still differs per process.
            let pid = std::process::id().to_le_bytes();
            let t = crate::vstate::vcpu::monotonic_ns().to_le_bytes();
            b = [0, pid[0], pid[1], t[0], t[1], t[2]];
        }
        b[0] = (b[0] & 0xfc) | 0x02;
        MacAddr(b)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid MAC address {s:?}: expected six hex bytes like 02:00:00:00:00:01");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut b = [0u8; 6];
        for (o, p) in b.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if b[0] & 1 != 0 {
            return Err(format!(
                "invalid MAC address {s:?}: multicast addresses cannot name a NIC"
            ));
        }
        if b == [0; 6] {
            return Err(format!("invalid MAC address {s:?}: all zero"));
        }
        Ok(MacAddr(b))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}
