//! virtio-blk: descriptor table, available ring, request headers and data
//! all come from the fuzz input; the device must answer or drop each
//! request (or need a reset), never panic or hang.
#![no_main]

mod common;

use husk_vmm::devices::virtio::block::{request, Block, Disk};
use husk_vmm::devices::virtio::Segment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let flags = data[0];
    let mem = common::memory(&data[1..]);

    // The parser alone, on segments described by the input.
    let segs: Vec<Segment> = common::segments(&data[1..]);
    let _ = request::parse(&segs, &mem);

    // The whole device path.
    common::avail_idx(&mem, 0, 16, flags >> 3, flags & 4 != 0);
    let disk = Disk::open(&common::disk_image(), flags & 1 != 0, false).unwrap();
    let mut blk = Block::new(disk, "fuzz").unwrap();
    common::activate(&mut blk, &mem, vec![common::queue(0, 16, flags & 2 != 0)]);
    blk.process_queue();
    blk.process_queue();
});
