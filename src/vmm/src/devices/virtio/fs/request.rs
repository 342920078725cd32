//! FUSE requests as husk sees them when it must answer itself: the backend
//! is gone, so every request gets an error reply and no guest process
//! waits forever. Only the fixed headers are parsed; they come from the
//! guest and are untrusted.

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::queue::Chain;
use crate::devices::virtio::GuestMem;

/// Size of `struct fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// Size of `struct fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;
/// FUSE_FORGET: no reply is expected.
pub const FUSE_FORGET: u32 = 2;
/// FUSE_BATCH_FORGET: no reply is expected.
pub const FUSE_BATCH_FORGET: u32 = 42;

/// What husk needs from a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    /// FUSE opcode.
    pub opcode: u32,
    /// The request's ID, echoed in the reply.
    pub unique: u64,
}

/// Copies up to `out.len()` bytes from the chain's device-readable
/// segments; returns how many were available.
fn gather(mem: &GuestMem, chain: &Chain, out: &mut [u8]) -> usize {
    let mut done = 0;
    for seg in chain.segments.iter().filter(|s| !s.writable) {
        if done == out.len() {
            break;
        }
        let n = (seg.len as usize).min(out.len() - done);
        if mem.read_slice(&mut out[done..done + n], seg.addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// Writes `data` across the chain's device-writable segments; returns the
/// bytes written (all of `data`, or 0 when it does not fit).
fn scatter(mem: &GuestMem, chain: &Chain, data: &[u8]) -> u32 {
    let room: u64 = chain
        .segments
        .iter()
        .filter(|s| s.writable)
        .map(|s| u64::from(s.len))
        .sum();
    if room < data.len() as u64 {
        return 0;
    }
    let mut done = 0;
    for seg in chain.segments.iter().filter(|s| s.writable) {
        if done == data.len() {
            break;
        }
        let n = (seg.len as usize).min(data.len() - done);
        if mem
            .write_slice(&data[done..done + n], GuestAddress(seg.addr.0))
            .is_err()
        {
            return 0;
        }
        done += n;
    }
    done as u32
}

/// Reads the request header, if the chain is whole and carries one.
pub fn parse(mem: &GuestMem, chain: &Chain) -> Option<InHeader> {
    if chain.error.is_some() {
        return None;
    }
    let mut raw = [0u8; IN_HEADER_LEN];
    if gather(mem, chain, &mut raw) < IN_HEADER_LEN {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().expect("8 bytes"));
    Some(InHeader {
        opcode: u32_at(4),
        unique: u64_at(8),
    })
}

/// Answers one request with `-errno`; returns the used length. FORGETs
/// and chains without a header or room for a reply are returned empty.
pub fn answer_error(mem: &GuestMem, chain: &Chain, errno: i32) -> u32 {
    let Some(hdr) = parse(mem, chain) else {
        return 0;
    };
    if matches!(hdr.opcode, FUSE_FORGET | FUSE_BATCH_FORGET) {
        return 0;
    }
    let mut reply = [0u8; OUT_HEADER_LEN];
    reply[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    reply[4..8].copy_from_slice(&(-errno).to_le_bytes());
    reply[8..16].copy_from_slice(&hdr.unique.to_le_bytes());
    scatter(mem, chain, &reply)
}
