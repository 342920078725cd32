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

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mem = common::memory(&data[1..]);
    let segments: Vec<Segment> = common::segments(&data[1..]);
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
