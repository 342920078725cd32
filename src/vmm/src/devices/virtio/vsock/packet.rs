//! Packets as they cross the device: a 44-byte little-endian
//! `virtio_vsock_hdr`, then `len` bytes of payload, spread over a
//! descriptor chain in any way the driver likes. Everything here is pure
//! (guest memory in, values out) and fuzzed.

use vm_memory::{Bytes, GuestAddress};

use super::{HDR_LEN, MAX_PAYLOAD};
use crate::devices::virtio::queue::{Chain, ChainError, Segment};
use crate::devices::virtio::GuestMem;

/// A `virtio_vsock_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's CID.
    pub src_cid: u64,
    /// Receiver's CID.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`socket_type::*`).
    pub type_: u16,
    /// Operation (`op::*`).
    pub op: u16,
    /// Operation flags (SHUTDOWN: `shutdown::*`).
    pub flags: u32,
    /// The sender's receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from that buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header.
    pub fn read(b: &[u8; HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header.
    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a chain cannot carry a packet. Each fails only its own packet (and,
/// when the header could be read, that packet's connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The descriptor chain itself is malformed.
    #[error("{0}")]
    Chain(#[from] ChainError),
    /// A transmit chain with a device-writable buffer, or a receive chain
    /// with a device-readable one.
    #[error("buffer in the wrong direction for this queue")]
    WrongDirection,
    /// Shorter than a header.
    #[error("chain of {0} bytes cannot hold a packet header")]
    ShortChain(u64),
    /// The header says more payload than husk accepts in one packet.
    #[error("payload length {0} is over the limit")]
    TooLong(u32),
    /// The header says more payload than the chain holds.
    #[error("payload length {len} but the chain holds {room} bytes after the header")]
    PastChain {
        /// Header `len`.
        len: u32,
        /// Bytes after the header.
        room: u64,
    },
    /// Guest memory could not be accessed (the chain was checked, so this
    /// is not expected).
    #[error("guest memory access failed")]
    Memory,
}

/// A transmit packet: its header and where its payload lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    /// The header.
    pub header: Header,
    /// Exactly `header.len` bytes of payload, in order.
    pub payload: Vec<Segment>,
}

/// A refused transmit chain, with its header when it could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct BadPacket {
    /// The header, if the chain held one.
    pub header: Option<Header>,
    /// What is wrong.
    pub error: PacketError,
}

/// Copies bytes `[offset, offset + out.len())` of the chain's buffers into `out`.
fn gather(mem: &GuestMem, segs: &[Segment], mut offset: u64, out: &mut [u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let len = u64::from(s.len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(out.len() - done);
        let Some(addr) = s.addr.0.checked_add(offset) else {
            return false;
        };
        if mem
            .read_slice(&mut out[done..done + n], GuestAddress(addr))
            .is_err()
        {
            return false;
        }
        done += n;
        offset = 0;
    }
    done == out.len()
}

/// The segments covering bytes `[offset, offset + len)` of `segs`.
fn slice_segments(segs: &[Segment], mut offset: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        let slen = u64::from(s.len);
        if offset >= slen {
            offset -= slen;
            continue;
        }
        let n = (slen - offset).min(len);
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + offset),
            len: n as u32,
            writable: s.writable,
        });
        len -= n;
        offset = 0;
    }
    out
}

/// Parses a transmit chain: a header, then at least `len` payload bytes
/// (more are ignored), all device-readable.
pub fn parse_tx(mem: &GuestMem, chain: &Chain) -> Result<TxPacket, BadPacket> {
    let bad = |header, error| BadPacket { header, error };
    if let Some(e) = chain.error {
        return Err(bad(None, e.into()));
    }
    if chain.segments.iter().any(|s| s.writable) {
        return Err(bad(None, PacketError::WrongDirection));
    }
    let total: u64 = chain.segments.iter().map(|s| u64::from(s.len)).sum();
    if total < HDR_LEN as u64 {
        return Err(bad(None, PacketError::ShortChain(total)));
    }
    let mut raw = [0u8; HDR_LEN];
    if !gather(mem, &chain.segments, 0, &mut raw) {
        return Err(bad(None, PacketError::Memory));
    }
    let header = Header::read(&raw);
    if header.len as usize > MAX_PAYLOAD {
        return Err(bad(Some(header), PacketError::TooLong(header.len)));
    }
    let room = total - HDR_LEN as u64;
    if u64::from(header.len) > room {
        return Err(bad(
            Some(header),
            PacketError::PastChain {
                len: header.len,
                room,
            },
        ));
    }
    let payload = slice_segments(&chain.segments, HDR_LEN as u64, u64::from(header.len));
    Ok(TxPacket { header, payload })
}

/// Copies a packet's payload into `out` (resized to fit).
pub fn read_payload(
    mem: &GuestMem,
    payload: &[Segment],
    out: &mut Vec<u8>,
) -> Result<(), PacketError> {
    let total: usize = payload.iter().map(|s| s.len as usize).sum();
    if total > MAX_PAYLOAD {
        return Err(PacketError::TooLong(total as u32));
    }
    out.clear();
    out.resize(total, 0);
    if gather(mem, payload, 0, out) {
        Ok(())
    } else {
        Err(PacketError::Memory)
    }
}

/// How many payload bytes a receive chain can take after the header
/// (at most `MAX_PAYLOAD`), or why it cannot take a packet.
pub fn rx_room(chain: &Chain) -> Result<usize, PacketError> {
    if let Some(e) = chain.error {
        return Err(e.into());
    }
    if chain.segments.iter().any(|s| !s.writable) {
        return Err(PacketError::WrongDirection);
    }
    let total: u64 = chain.segments.iter().map(|s| u64::from(s.len)).sum();
    if total < HDR_LEN as u64 {
        return Err(PacketError::ShortChain(total));
    }
    Ok(((total - HDR_LEN as u64).min(MAX_PAYLOAD as u64)) as usize)
}

/// Writes `header` (with `len` set to the payload's length) and `payload`
/// into a receive chain; returns the bytes written, for the used ring.
pub fn write_rx(
    mem: &GuestMem,
    chain: &Chain,
    header: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let room = rx_room(chain)?;
    if payload.len() > room {
        return Err(PacketError::PastChain {
            len: payload.len() as u32,
            room: room as u64,
        });
    }
    let hdr = Header {
        len: payload.len() as u32,
        ..*header
    }
    .bytes();
    let mut parts = [&hdr[..], payload].into_iter().filter(|p| !p.is_empty());
    let mut cur = parts.next();
    let mut cur_off = 0usize;
    for s in &chain.segments {
        let mut seg_off = 0usize;
        while let Some(part) = cur {
            let n = (part.len() - cur_off).min(s.len as usize - seg_off);
            if n == 0 {
                break;
            }
            mem.write_slice(
                &part[cur_off..cur_off + n],
                GuestAddress(s.addr.0 + seg_off as u64),
            )
            .map_err(|_| PacketError::Memory)?;
            cur_off += n;
            seg_off += n;
            if cur_off == part.len() {
                cur = parts.next();
                cur_off = 0;
            }
        }
        if cur.is_none() {
            break;
        }
    }
    Ok((HDR_LEN + payload.len()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::op;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap()
    }

    fn seg(addr: u64, len: u32, writable: bool) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    fn chain(segments: Vec<Segment>) -> Chain {
        Chain {
            last: segments.last().copied(),
            segments,
            error: None,
        }
    }

    fn header(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len,
            type_: 1,
            op: op::RW,
            flags: 0,
            buf_alloc: 0x40000,
            fwd_cnt: 0xdead_beef,
        }
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            ..header(9)
        };
        let b = h.bytes();
        assert_eq!(Header::read(&b), h);
        assert_eq!(b[0], 0x08);
        assert_eq!(b[7], 0x01);
        assert_eq!(&b[24..28], &[9, 0, 0, 0]);
        assert_eq!(&b[30..32], &[5, 0]);
    }

    #[test]
    fn header_and_payload_split_anywhere() {
        let m = mem();
        let h = header(10);
        let mut bytes = h.bytes().to_vec();
        bytes.extend(0..10u8);
        // 44 + 10 bytes over buffers of 5, 40, 9 bytes.
        m.write_slice(&bytes[..5], GuestAddress(0x100)).unwrap();
        m.write_slice(&bytes[5..45], GuestAddress(0x200)).unwrap();
        m.write_slice(&bytes[45..], GuestAddress(0x300)).unwrap();
        let c = chain(vec![
            seg(0x100, 5, false),
            seg(0x200, 40, false),
            seg(0x300, 20, false),
        ]);
        let p = parse_tx(&m, &c).unwrap();
        assert_eq!(p.header, h);
        assert_eq!(
            p.payload,
            vec![seg(0x200 + 39, 1, false), seg(0x300, 9, false)]
        );
        let mut out = Vec::new();
        read_payload(&m, &p.payload, &mut out).unwrap();
        assert_eq!(out, (0..10u8).collect::<Vec<_>>());
    }

    #[test]
    fn bad_transmit_chains_are_refused() {
        let m = mem();
        m.write_slice(&header(100).bytes(), GuestAddress(0x100))
            .unwrap();
        let err = |c: Chain| parse_tx(&m, &c).unwrap_err();
        assert_eq!(
            err(chain(vec![seg(0x100, 43, false)])).error,
            PacketError::ShortChain(43)
        );
        assert_eq!(
            err(chain(vec![seg(0x100, 200, true)])).error,
            PacketError::WrongDirection
        );
        let e = err(chain(vec![seg(0x100, 100, false)]));
        assert_eq!(e.header, Some(header(100)));
        assert_eq!(e.error, PacketError::PastChain { len: 100, room: 56 });
        m.write_slice(&header(MAX_PAYLOAD as u32 + 1).bytes(), GuestAddress(0x100))
            .unwrap();
        assert_eq!(
            err(chain(vec![seg(0x100, 0x8000, false)])).error,
            PacketError::TooLong(MAX_PAYLOAD as u32 + 1)
        );
        let mut broken = chain(vec![seg(0x100, 100, false)]);
        broken.error = Some(ChainError::Truncated);
        assert_eq!(err(broken).error, PacketError::Chain(ChainError::Truncated));
    }

    #[test]
    fn receive_chains_take_header_then_payload() {
        let m = mem();
        let c = chain(vec![seg(0x100, 30, true), seg(0x200, 4096, true)]);
        assert_eq!(rx_room(&c), Ok(4096 + 30 - 44));
        let h = Header {
            len: 999,
            ..header(0)
        };
        let n = write_rx(&m, &c, &h, b"hello").unwrap();
        assert_eq!(n, 49);
        let mut raw = [0u8; HDR_LEN];
        m.read_slice(&mut raw[..30], GuestAddress(0x100)).unwrap();
        m.read_slice(&mut raw[30..], GuestAddress(0x200)).unwrap();
        assert_eq!(Header::read(&raw), header(5), "len is the payload's");
        let mut p = [0u8; 5];
        m.read_slice(&mut p, GuestAddress(0x200 + 14)).unwrap();
        assert_eq!(&p, b"hello");
        // Too small, wrong direction, payload past the room.
        assert_eq!(
            rx_room(&chain(vec![seg(0x100, 43, true)])),
            Err(PacketError::ShortChain(43))
        );
        assert_eq!(
            rx_room(&chain(vec![seg(0x100, 100, false)])),
            Err(PacketError::WrongDirection)
        );
        assert!(write_rx(&m, &chain(vec![seg(0x100, 48, true)]), &h, b"hello").is_err());
        assert_eq!(
            rx_room(&chain(vec![seg(0, 0x20000, true)])),
            Ok(MAX_PAYLOAD)
        );
    }
}
