//! A tiny guest that drives virtio-vsock as a driver would (status,
//! features, three queues, notifications through the KVM ioeventfds): it
//! prints the device's ID and its CID, connects to host port 5000 (which
//! reaches `<uds>_5000`), sends `PAYLOAD`, prints the op of the host's
//! answer and the first three bytes the host sends, then resets.

#![allow(dead_code)]

use husk_vmm::devices::virtio::vsock::Header;

use super::tiny;

/// The guest's CID.
pub const CID: u32 = 42;
const BASE: u32 = 0xd000_0000;
// Guest physical addresses of the rings (queue size 8) and buffers,
// loaded as ELF segments.
const QUEUES: [u32; 3] = [0x20_0000, 0x21_0000, 0x22_0000];
const RX_BUF: [u32; 2] = [0x23_0000, 0x23_2000];
const RX_BUF_LEN: u32 = 4096 + 44;
const TX_REQ: u32 = 0x24_0000;
const TX_RW: u32 = 0x24_1000;
const EV_BUF: u32 = 0x25_0000;
const QSIZE: u16 = 8;
/// What the guest sends.
pub const PAYLOAD: &[u8] = b"hi from guest";

fn avail(q: u32) -> u32 {
    q + 0x1000
}
fn used(q: u32) -> u32 {
    q + 0x2000
}

/// A split-queue descriptor.
fn desc(addr: u32, len: u32, flags: u16) -> Vec<u8> {
    let mut d = u64::from(addr).to_le_bytes().to_vec();
    d.extend(len.to_le_bytes());
    d.extend(flags.to_le_bytes());
    d.extend(0u16.to_le_bytes());
    d
}

/// An available ring with `idx` and these heads.
fn avail_ring(idx: u16, heads: &[u16]) -> Vec<u8> {
    let mut r = vec![0, 0];
    r.extend(idx.to_le_bytes());
    for h in heads {
        r.extend(h.to_le_bytes());
    }
    r
}

fn header(op: u16, len: u32) -> Header {
    Header {
        src_cid: u64::from(CID),
        dst_cid: 2,
        src_port: 1234,
        dst_port: 5000,
        len,
        type_: 1,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

/// The preloaded rings and packets: two RX buffers and one event buffer
/// posted, TX descriptors for a REQUEST then an RW ready but not yet made
/// available.
pub fn data_segments() -> Vec<(u64, Vec<u8>)> {
    let [rx, tx, ev] = QUEUES;
    let mut rx_descs = desc(RX_BUF[0], RX_BUF_LEN, 2);
    rx_descs.extend(desc(RX_BUF[1], RX_BUF_LEN, 2));
    let mut tx_descs = desc(TX_REQ, 44, 0);
    tx_descs.extend(desc(TX_RW, 44 + PAYLOAD.len() as u32, 0));
    let mut rw = header(5, PAYLOAD.len() as u32).bytes().to_vec();
    rw.extend(PAYLOAD);
    let seg = |a: u32, b: Vec<u8>| (u64::from(a), b);
    vec![
        seg(rx, rx_descs),
        seg(avail(rx), avail_ring(2, &[0, 1])),
        seg(tx, tx_descs),
        seg(avail(tx), avail_ring(0, &[0, 1])),
        seg(ev, desc(EV_BUF, 8, 2)),
        seg(avail(ev), avail_ring(1, &[0])),
        seg(TX_REQ, header(1, 0).bytes().to_vec()),
        seg(TX_RW, rw),
    ]
}

/// `mov dword [rdi + off], val` (rdi = the device's MMIO base).
fn mmio_write(off: u32, val: u32) -> Vec<u8> {
    let mut v = vec![0xc7, 0x87];
    v.extend(off.to_le_bytes());
    v.extend(val.to_le_bytes());
    v
}

/// `mov word [addr], val`.
fn mem_write16(addr: u32, val: u16) -> Vec<u8> {
    let mut v = vec![0x66, 0xc7, 0x04, 0x25];
    v.extend(addr.to_le_bytes());
    v.extend(val.to_le_bytes());
    v
}

/// Spins until the u16 at `addr` is at least `n`.
fn wait_u16(addr: u32, n: u8) -> Vec<u8> {
    let mut v = vec![0xf3, 0x90, 0x66, 0x8b, 0x04, 0x25]; // pause; mov ax, [addr]
    v.extend(addr.to_le_bytes());
    v.extend([0x66, 0x83, 0xf8, n]); // cmp ax, n
    v.extend([0x72, 0xf0]); // jb back to pause (16 bytes)
    v
}

/// `mov al, [addr]; out dx, al`.
fn print_byte(addr: u32) -> Vec<u8> {
    let mut v = vec![0x8a, 0x04, 0x25];
    v.extend(addr.to_le_bytes());
    v.push(0xee);
    v
}

/// The guest's code.
pub fn guest_code() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.push(0xbf); // mov edi, BASE
    c.extend(BASE.to_le_bytes());
    c.extend([0x8b, 0x47, 0x08, 0xee]); // DeviceID: mov eax, [rdi+8]; out
    c.extend([0x8b, 0x87, 0x00, 0x01, 0x00, 0x00, 0xee]); // CID, low byte
    c.extend(mmio_write(0x70, 1)); // ACKNOWLEDGE
    c.extend(mmio_write(0x70, 3)); // DRIVER
    c.extend(mmio_write(0x24, 1)); // DriverFeaturesSel 1
    c.extend(mmio_write(0x20, 1)); // VIRTIO_F_VERSION_1
    c.extend(mmio_write(0x70, 0xb)); // FEATURES_OK
    for (i, q) in QUEUES.iter().enumerate() {
        c.extend(mmio_write(0x30, i as u32));
        c.extend(mmio_write(0x38, u32::from(QSIZE)));
        c.extend(mmio_write(0x80, *q));
        c.extend(mmio_write(0x90, avail(*q)));
        c.extend(mmio_write(0xa0, used(*q)));
        c.extend(mmio_write(0x44, 1));
    }
    c.extend(mmio_write(0x70, 0xf)); // DRIVER_OK
                                     // REQUEST to host port 5000, then wait for the answer.
    c.extend(mem_write16(avail(QUEUES[1]) + 2, 1));
    c.extend(mmio_write(0x50, 1));
    c.extend(wait_u16(used(QUEUES[0]) + 2, 1));
    c.extend(print_byte(RX_BUF[0] + 30)); // its op, low byte
                                          // Data, then wait for the host's reply and print it.
    c.extend(mem_write16(avail(QUEUES[1]) + 2, 2));
    c.extend(mmio_write(0x50, 1));
    c.extend(wait_u16(used(QUEUES[0]) + 2, 2));
    for i in 0..3 {
        c.extend(print_byte(RX_BUF[1] + 44 + i));
    }
    c.extend(tiny::i8042_reset());
    c
}

/// The guest as an ELF kernel.
pub fn kernel() -> Vec<u8> {
    let mut segments = vec![(tiny::ENTRY, guest_code())];
    segments.extend(data_segments());
    tiny::elf(tiny::ENTRY, &segments)
}
