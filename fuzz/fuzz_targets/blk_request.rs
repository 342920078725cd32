//! virtio-blk: descriptor table, available ring, request headers and data
//! all come from the fuzz input; the device must answer or drop each
//! request (or need a reset), never panic or hang.
#![no_main]

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use husk_vmm::devices::virtio::block::{request, Block, Disk};
use husk_vmm::devices::virtio::Segment;
use libfuzzer_sys::fuzz_target;

/// A 64 KiB in-memory image (memfd), opened again by path per run.
fn image() -> PathBuf {
    static IMAGE: OnceLock<(File, PathBuf)> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            // SAFETY: memfd_create with a valid NUL-terminated name.
            let fd = unsafe { libc::memfd_create(c"husk-fuzz-disk".as_ptr(), 0) };
            assert!(fd >= 0);
            // SAFETY: a new fd owned by nothing else.
            let f = unsafe { File::from_raw_fd(fd) };
            f.set_len(0x1_0000).unwrap();
            let p = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
            (f, p)
        })
        .1
        .clone()
}

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
    let disk = Disk::open(&image(), flags & 1 != 0, false).unwrap();
    let mut blk = Block::new(disk, "fuzz").unwrap();
    common::activate(&mut blk, &mem, vec![common::queue(0, 16, flags & 2 != 0)]);
    blk.process_queue();
    blk.process_queue();
});
