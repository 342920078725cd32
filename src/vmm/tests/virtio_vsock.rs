//! virtio-vsock on real KVM: a tiny guest reads the device's ID and CID
//! through the MMIO transport, then drives it as a driver would (status,
//! features, three queues, notifications through the KVM ioeventfds):
//! it connects to host port 5000, which reaches the test's Unix listener
//! at `<uds>_5000`, sends a line and prints what the host answers.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::tiny;
use husk_vmm::config::{Console, VmConfig, VsockConfig};
use husk_vmm::devices::virtio::vsock::Header;
use husk_vmm::{ConsoleInputSource, VmExit};

const CID: u32 = 42;
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
const PAYLOAD: &[u8] = b"hi from guest";

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
fn data_segments() -> Vec<(u64, Vec<u8>)> {
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

fn guest_code() -> Vec<u8> {
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

#[test]
fn a_tiny_guest_talks_to_a_host_unix_socket_through_vsock() {
    let dir = tiny::tempdir("vsock");
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(dir.join("v.sock_5000")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut segments = vec![(tiny::ENTRY, guest_code())];
    segments.extend(data_segments());
    let kernel = dir.join("k");
    std::fs::write(&kernel, tiny::elf(tiny::ENTRY, &segments)).unwrap();
    let out = dir.join("console");
    let cfg = VmConfig {
        kernel: Some(kernel),
        console: Console::File(out.clone()),
        mem_mib: 64,
        vsock: Some(VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
        }),
        ..Default::default()
    };
    let vm = husk_vmm::build(&cfg).unwrap();
    assert!(
        vm.cmdline()
            .ends_with(" virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        vm.cmdline()
    );
    assert!(uds.exists(), "the VM's socket is listening");
    let stop = vm.stop_handle();
    let vm_thread = std::thread::spawn(move || vm.run(ConsoleInputSource::None));

    // The guest's connection arrives on the listener.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                stop.stop(VmExit::Killed(9));
                let _ = vm_thread.join();
                panic!(
                    "no connection from the guest ({e}); console: {:?}",
                    std::fs::read(&out)
                );
            }
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = vec![0u8; PAYLOAD.len()];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(got, PAYLOAD);
    conn.write_all(b"hey").unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    while !vm_thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !vm_thread.is_finished() {
        stop.stop(VmExit::Killed(9));
    }
    assert_eq!(vm_thread.join().unwrap(), VmExit::GuestReset);
    // DeviceID 19, CID 42, op 2 (RESPONSE), then the host's bytes.
    assert_eq!(std::fs::read(&out).unwrap(), [19, 42, 2, b'h', b'e', b'y']);
    // The guest's stream is gone with the VM, and so is the socket file.
    let mut rest = Vec::new();
    assert_eq!(conn.read_to_end(&mut rest).unwrap(), 0);
    assert!(!uds.exists(), "socket file left behind");
    std::fs::remove_dir_all(dir).unwrap();
}
