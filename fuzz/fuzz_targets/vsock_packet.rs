//! virtio-vsock: packet headers and chains from the input, then a whole
//! `Vsock` device whose three queues, descriptors, headers and payloads
//! all come from the input. A Unix listener stands at host port 1, so a
//! guest REQUEST there opens a real connection, and the input's tail is
//! what the host side of that connection sends. The device must answer,
//! drop or reset each packet (or need a reset), never panic or hang.
#![no_main]

mod common;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use husk_vmm::devices::virtio::vsock::{packet, Header, Vsock};
use husk_vmm::devices::virtio::{Chain, Segment};
use libfuzzer_sys::fuzz_target;

/// A private directory for this process's sockets.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("husk-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let flags = data[0];
    let body = &data[1..];

    // The header codec and the chain parsers on segments from the input.
    if let Some(raw) = body.get(..44) {
        let h = Header::read(raw.try_into().unwrap());
        assert_eq!(Header::read(&h.bytes()), h);
    }
    let mem = common::memory(body);
    let segments: Vec<Segment> = common::segments(body);
    let chain = Chain {
        last: segments.last().copied(),
        segments,
        error: None,
    };
    if let Ok(p) = packet::parse_tx(&mem, &chain) {
        let mut out = Vec::new();
        let _ = packet::read_payload(&mem, &p.payload, &mut out);
        assert!(out.len() <= 64 * 1024);
    }
    if let Ok(room) = packet::rx_room(&chain) {
        let payload = vec![0xa5u8; room.min(body.len())];
        let _ = packet::write_rx(&mem, &chain, &Header::default(), &payload);
    }

    // The whole device: RX rings at 0, TX at 0x100, event at 0x200 (4
    // entries each), guest CID 3, a host listener on port 1.
    static RUN: AtomicU64 = AtomicU64::new(0);
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let uds = dir().join(format!("{n}.sock"));
    let listener = UnixListener::bind(format!("{}_1", uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut dev = Vsock::new(3, &uds).unwrap();
    let idx = body.get(1).copied().unwrap_or(0);
    let raw_idx = flags & 0x80 != 0;
    common::avail_idx(&mem, 0, 4, idx & 0xf, raw_idx);
    common::avail_idx(&mem, 0x100, 4, idx >> 4, raw_idx);
    let event_idx = flags & 1 != 0;
    common::activate(
        &mut dev,
        &mem,
        vec![
            common::queue(0, 4, event_idx),
            common::queue(0x100, 4, event_idx),
            common::queue(0x200, 4, event_idx),
        ],
    );
    dev.process_queues();
    // The host side of any connection the guest opened sends the tail.
    let tail = body.get(0x400..).unwrap_or_default();
    let mut peers = Vec::new();
    while let Ok((mut s, _)) = listener.accept() {
        let _ = s.set_nonblocking(true);
        let _ = s.write(tail);
        peers.push(s);
    }
    dev.rx_buffers_added();
    dev.process_queues();
    dev.process_queues();
    drop(dev);
    drop(peers);
    drop(listener);
    let _ = std::fs::remove_file(format!("{}_1", uds.display()));
});
