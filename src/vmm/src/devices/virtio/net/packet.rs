//! Frames as they cross the device: a 12-byte `virtio_net_hdr_v1`
//! followed by an Ethernet frame, the same layout on the tap (with
//! IFF_VNET_HDR and TUNSETVNETHDRSZ 12) and in guest buffers. With no
//! offload negotiated, a header must say "plain frame"; anything else is
//! refused rather than passed on.

/// Size of `virtio_net_hdr_v1` (with `num_buffers`, as VERSION_1 requires).
pub const VNET_HDR_LEN: usize = 12;
/// Smallest frame accepted: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Largest Ethernet frame accepted (without the virtio header).
pub const MAX_FRAME_LEN: usize = 65535;
/// Largest header + frame.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// `flags`: the checksum starting at csum_start must be completed.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was validated (RX only).
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `gso_type`: not a GSO frame.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;

/// A `virtio_net_hdr_v1`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// NEEDS_CSUM / DATA_VALID.
    pub flags: u8,
    /// GSO type.
    pub gso_type: u8,
    /// Length of the headers to copy per GSO segment.
    pub hdr_len: u16,
    /// GSO segment size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from csum_start.
    pub csum_offset: u16,
    /// Buffers the frame spans (RX).
    pub num_buffers: u16,
}

impl VnetHdr {
    /// Decodes the first `VNET_HDR_LEN` bytes (little endian, VERSION_1).
    pub fn read(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// Encodes the header.
    pub fn bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// Why a frame is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than a header plus an Ethernet header.
    #[error("frame of {0} bytes is too short")]
    TooShort(usize),
    /// Longer than `MAX_PACKET_LEN`.
    #[error("frame of {0} bytes is too long")]
    TooLong(usize),
    /// Asks for a checksum or segmentation offload nobody negotiated.
    #[error("offload requested without negotiation (flags {flags:#x}, gso_type {gso_type})")]
    Offload {
        /// Header flags.
        flags: u8,
        /// Header GSO type.
        gso_type: u8,
    },
}

fn check_len(len: usize) -> Result<(), FrameError> {
    if len < VNET_HDR_LEN + MIN_FRAME_LEN {
        return Err(FrameError::TooShort(len));
    }
    if len > MAX_PACKET_LEN {
        return Err(FrameError::TooLong(len));
    }
    Ok(())
}

fn header(packet: &[u8]) -> VnetHdr {
    let mut h = [0u8; VNET_HDR_LEN];
    h.copy_from_slice(&packet[..VNET_HDR_LEN]);
    VnetHdr::read(&h)
}

/// Checks a packet the guest sent (TX) and rewrites its header into the
/// canonical "plain frame" one the tap gets: a guest that asks for an
/// offload it did not negotiate, or leaves junk in unused fields, cannot
/// make the host kernel act on it.
pub fn prepare_tx(packet: &mut [u8]) -> Result<(), FrameError> {
    check_len(packet.len())?;
    let h = header(packet);
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || h.gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return Err(FrameError::Offload {
            flags: h.flags,
            gso_type: h.gso_type,
        });
    }
    packet[..VNET_HDR_LEN].copy_from_slice(&VnetHdr::default().bytes());
    Ok(())
}

/// Checks a packet read from the tap (RX) and rewrites its header for a
/// guest that negotiated no offload: no flags, one buffer.
pub fn prepare_rx(packet: &mut [u8]) -> Result<(), FrameError> {
    check_len(packet.len())?;
    let h = header(packet);
    // The tap was told to offload nothing, so a checksum left for the
    // receiver or a GSO frame would be a host bug: drop rather than
    // deliver a frame the guest cannot interpret. DATA_VALID is only a
    // hint, which the guest did not ask for.
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || h.gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return Err(FrameError::Offload {
            flags: h.flags,
            gso_type: h.gso_type,
        });
    }
    let fixed = VnetHdr {
        num_buffers: 1,
        ..VnetHdr::default()
    };
    packet[..VNET_HDR_LEN].copy_from_slice(&fixed.bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(hdr: VnetHdr, frame_len: usize) -> Vec<u8> {
        let mut p = hdr.bytes().to_vec();
        p.extend((0..frame_len).map(|i| i as u8));
        p
    }

    #[test]
    fn header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 3,
            hdr_len: 0x1234,
            gso_size: 0x5678,
            csum_start: 0x9abc,
            csum_offset: 0xdef0,
            num_buffers: 7,
        };
        assert_eq!(VnetHdr::read(&h.bytes()), h);
        assert_eq!(h.bytes()[2..4], [0x34, 0x12]);
    }

    #[test]
    fn tx_plain_frames_pass_with_a_clean_header() {
        let mut p = packet(
            VnetHdr {
                hdr_len: 9999,
                csum_start: 5,
                num_buffers: 3,
                ..Default::default()
            },
            60,
        );
        prepare_tx(&mut p).unwrap();
        assert_eq!(&p[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
        assert_eq!(p[VNET_HDR_LEN + 5], 5, "frame untouched");
    }

    #[test]
    fn tx_offloads_are_refused() {
        for (flags, gso_type) in [(1, 0), (0, 1), (0, 4), (3, 0x80)] {
            let mut p = packet(
                VnetHdr {
                    flags,
                    gso_type,
                    ..Default::default()
                },
                60,
            );
            assert_eq!(
                prepare_tx(&mut p),
                Err(FrameError::Offload { flags, gso_type })
            );
        }
        // DATA_VALID means nothing on TX: harmless, cleared.
        let mut p = packet(
            VnetHdr {
                flags: VIRTIO_NET_HDR_F_DATA_VALID,
                ..Default::default()
            },
            60,
        );
        prepare_tx(&mut p).unwrap();
        assert_eq!(p[0], 0);
    }

    #[test]
    fn lengths_are_bounded() {
        assert_eq!(prepare_tx(&mut [0u8; 25]), Err(FrameError::TooShort(25)));
        assert_eq!(prepare_tx(&mut []), Err(FrameError::TooShort(0)));
        assert!(prepare_tx(&mut [0u8; 26]).is_ok());
        assert!(prepare_rx(&mut vec![0u8; MAX_PACKET_LEN]).is_ok());
        assert_eq!(
            prepare_rx(&mut vec![0u8; MAX_PACKET_LEN + 1]),
            Err(FrameError::TooLong(MAX_PACKET_LEN + 1))
        );
    }

    #[test]
    fn rx_header_says_one_buffer_and_no_flags() {
        let mut p = packet(
            VnetHdr {
                flags: VIRTIO_NET_HDR_F_DATA_VALID,
                csum_start: 34,
                ..Default::default()
            },
            60,
        );
        prepare_rx(&mut p).unwrap();
        assert_eq!(
            VnetHdr::read(p[..VNET_HDR_LEN].try_into().unwrap()),
            VnetHdr {
                num_buffers: 1,
                ..Default::default()
            }
        );
        let mut gso = packet(
            VnetHdr {
                gso_type: 1,
                ..Default::default()
            },
            60,
        );
        assert!(prepare_rx(&mut gso).is_err());
    }
}
