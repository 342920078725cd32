//! virtio-net: frame headers from either side, and the RX/TX paths with
//! descriptor tables, rings and buffers from the fuzz input. A socketpair
//! stands in for the tap.
#![no_main]

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use husk_vmm::devices::virtio::net::{packet, MacAddr, Net, Tap};
use libfuzzer_sys::fuzz_target;

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two new fds into `fds`.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: both fds are new and owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let flags = data[0];
    let body = &data[1..];

    // Header checks on raw bytes, both directions.
    let _ = packet::prepare_tx(&mut body.to_vec());
    let _ = packet::prepare_rx(&mut body.to_vec());

    // The device: RX queue rings at 0, TX at 0x100 (4 entries each),
    // buffers anywhere; packets "from the tap" after 0x200.
    let mem = common::memory(body);
    let idx = body.get(1).copied().unwrap_or(0);
    common::avail_idx(&mem, 0, 4, idx & 0xf, flags & 0x80 != 0);
    common::avail_idx(&mem, 0x100, 4, idx >> 4, flags & 0x80 != 0);
    let (tap_end, peer) = socketpair();
    let mut net = Net::new(Tap::from_fd(tap_end, "fuzz0"), MacAddr([2, 0, 0, 0, 0, 1])).unwrap();
    let event_idx = flags & 1 != 0;
    common::activate(
        &mut net,
        &mem,
        vec![
            common::queue(0, 4, event_idx),
            common::queue(0x100, 4, event_idx),
        ],
    );
    // Packets "from the tap": the input's tail cut into a few frames.
    let tail = body.get(0x200..).unwrap_or_default();
    for chunk in tail
        .chunks(usize::from((flags >> 1) & 0x3f).max(1) * 16)
        .take(4)
    {
        // SAFETY: write(2) reads `chunk.len()` bytes from `chunk`.
        unsafe { libc::write(peer.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) };
    }
    net.process_tx();
    net.process_rx();
    net.rx_buffers_added();
    net.process_rx();
    let mut buf = vec![0u8; 70_000];
    // Drain what the guest sent.
    // SAFETY: read(2) writes at most `buf.len()` bytes into `buf`.
    while unsafe { libc::read(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
});
