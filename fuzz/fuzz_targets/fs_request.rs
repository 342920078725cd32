//! virtio-fs without a backend: husk answers FUSE requests with an error.
//! The chain's buffers and the request headers come from the fuzz input;
//! the reply must fit the chain's writable buffers or not be written,
//! never panic.
#![no_main]

#[allow(dead_code)] // only the memory helper is used here
mod common;

use husk_vmm::devices::virtio::fs::request;
use husk_vmm::devices::virtio::{Chain, Segment};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mem = common::memory(&data[1..]);
    let segments: Vec<Segment> = data[1..]
        .chunks_exact(7)
        .take(8)
        .map(|c| Segment {
            addr: GuestAddress(u64::from(u16::from_le_bytes([c[0], c[1]]))),
            len: u32::from(u16::from_le_bytes([c[2], c[3]])) | (u32::from(c[4]) << 16),
            writable: c[5] & 1 != 0,
        })
        .filter(|s| u64::from(s.len) + s.addr.0 <= common::MEM_SIZE as u64)
        .collect();
    let room: u64 = segments
        .iter()
        .filter(|s| s.writable)
        .map(|s| u64::from(s.len))
        .sum();
    let chain = Chain {
        segments,
        error: None,
        last: None,
    };
    let _ = request::parse(&mem, &chain);
    let written = request::answer_error(&mem, &chain, i32::from(data[0]));
    assert!(u64::from(written) <= room);
});
