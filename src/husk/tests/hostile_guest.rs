//! A hostile guest against the real `husk vm`: a tiny hand-assembled guest
//! that, on every vCPU, never stops: the boot vCPU brings up every
//! virtio-mmio window it can (queues pointing into a 64 KiB region), then
//! forever fills that region with random bytes (random descriptors, loops,
//! out-of-range addresses and lengths, made-up heads), moves a random
//! queue's available index a few steps past its used index (so the
//! devices walk those chains) or to anywhere (when a random write lands
//! on it), notifies that queue, writes random values to random device
//! registers (resets, bad sizes and addresses, unknown offsets) and floods
//! the serial port; every 256 rounds it brings the devices up again. The
//! other vCPU spins. Devices: virtio-blk on a file, virtio-net on a tap in a test
//! network namespace, virtio-vsock on a Unix socket.
//!
//! While it runs, the VMM must keep answering its control socket (status,
//! pause, resume), keep its memory and its log bounded, and stop on
//! request; none of its threads may hold a capability.
//! `HUSK_HOSTILE_SECS` sets how long (default 20 s). The figures it prints
//! (`hostile-guest: ...`) are the ones to quote.

mod support;
#[path = "../../vmm/tests/common/tiny.rs"]
mod tiny;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use husk_vmm::api::{request, Request};
use support::TestNetns;

/// The guest's random ring memory.
const RINGS: u32 = 0x40_0000;
/// virtio-mmio windows the guest attacks (one per device slot).
const WINDOWS: u32 = 4;
const MMIO_BASE: u32 = 0xd000_0000;

/// Register offsets (virtio 1.x, MMIO transport).
const STATUS: u32 = 0x70;
const DRIVER_FEATURES: u32 = 0x20;
const DRIVER_FEATURES_SEL: u32 = 0x24;
const QUEUE_SEL: u32 = 0x30;
const QUEUE_NUM: u32 = 0x38;
const QUEUE_READY: u32 = 0x44;
const QUEUE_DESC: u32 = 0x80;
const QUEUE_DRIVER: u32 = 0x90;
const QUEUE_DEVICE: u32 = 0xa0;

/// `mov dword [rdi + disp], imm` (rdi holds MMIO_BASE).
fn store(v: &mut Vec<u8>, disp: u32, imm: u32) {
    v.extend_from_slice(&[0xc7, 0x87]);
    v.extend_from_slice(&disp.to_le_bytes());
    v.extend_from_slice(&imm.to_le_bytes());
}

/// `mov dword [abs], imm`.
fn store_abs(v: &mut Vec<u8>, addr: u32, imm: u32) {
    v.extend_from_slice(&[0xc7, 0x04, 0x25]);
    v.extend_from_slice(&addr.to_le_bytes());
    v.extend_from_slice(&imm.to_le_bytes());
}

/// Brings up every window's device: features (VERSION_1 only), four
/// queues of 16 entries in the random region, DRIVER_OK.
fn bring_up(v: &mut Vec<u8>) {
    for d in 0..WINDOWS {
        let b = d * 0x1000;
        for status in [0, 1, 3] {
            store(v, b + STATUS, status);
        }
        store(v, b + DRIVER_FEATURES_SEL, 1);
        store(v, b + DRIVER_FEATURES, 1);
        store(v, b + DRIVER_FEATURES_SEL, 0);
        store(v, b + DRIVER_FEATURES, 0);
        store(v, b + STATUS, 0xb);
        for q in 0..4 {
            let ring = RINGS + d * 0x4000 + q * 0x1000;
            store(v, b + QUEUE_SEL, q);
            store(v, b + QUEUE_NUM, 16);
            store(v, b + QUEUE_DESC, ring);
            store(v, b + QUEUE_DESC + 4, 0);
            store(v, b + QUEUE_DRIVER, ring + 0x800);
            store(v, b + QUEUE_DRIVER + 4, 0);
            store(v, b + QUEUE_DEVICE, ring + 0xc00);
            store(v, b + QUEUE_DEVICE + 4, 0);
            store(v, b + QUEUE_READY, 1);
            // Ring indices from 0, like a fresh driver's.
            store_abs(v, ring + 0x800, 0);
            store_abs(v, ring + 0xc00, 0);
        }
        store(v, b + STATUS, 0xf);
    }
}

/// The boot vCPU's code.
fn hostile_code() -> Vec<u8> {
    let mut v = tiny::serial_out(b"hostile\n");
    v.extend_from_slice(&[
        // Start the other vCPUs (they spin in the trampoline).
        0xbf, 0x00, 0x03, 0xe0, 0xfe, // mov edi, 0xfee00300 (ICR low)
        0xc7, 0x07, 0x00, 0x45, 0x0c, 0x00, // INIT, all excluding self
        0xc7, 0x07, 0x10, 0x46, 0x0c, 0x00, // SIPI vector 0x10
        0xc7, 0x07, 0x10, 0x46, 0x0c, 0x00, // and again, as the MP spec says
        0xbe, 0x78, 0x56, 0x34, 0x12, // mov esi, 0x12345678 (seed)
    ]);
    // outer:
    let outer = v.len();
    v.push(0xbf); // mov edi, MMIO_BASE
    v.extend_from_slice(&MMIO_BASE.to_le_bytes());
    bring_up(&mut v);
    v.extend_from_slice(&[0xb9, 0x00, 0x01, 0x00, 0x00]); // mov ecx, 256
    let inner = v.len();
    v.extend_from_slice(&[
        // xorshift32 on esi
        0x89, 0xf0, 0xc1, 0xe0, 0x0d, 0x31, 0xc6, // mov eax,esi; shl eax,13; xor esi,eax
        0x89, 0xf0, 0xc1, 0xe8, 0x11, 0x31, 0xc6, // mov eax,esi; shr eax,17; xor esi,eax
        0x89, 0xf0, 0xc1, 0xe0, 0x05, 0x31, 0xc6, // mov eax,esi; shl eax,5;  xor esi,eax
        // random dword into the ring region: [RINGS + (esi & 0xfffc)] = esi
        0x89, 0xf0, 0x25, 0xfc, 0xff, 0x00, 0x00, // mov eax,esi; and eax,0xfffc
        0x89, 0xb0, // mov [rax + RINGS], esi
    ]);
    v.extend_from_slice(&RINGS.to_le_bytes());
    v.extend_from_slice(&[
        // notify: window (esi >> 16) & 3, queue (esi >> 20) & 3
        0x89, 0xf0, 0xc1, 0xe8, 0x10, 0x83, 0xe0, 0x03, // mov eax,esi; shr eax,16; and eax,3
        0xc1, 0xe0, 0x0c, // shl eax,12
        0x89, 0xf2, 0xc1, 0xea, 0x14, 0x83, 0xe2, 0x03, // mov edx,esi; shr edx,20; and edx,3
        // that queue's avail index := its used index + (esi >> 24) & 7, a
        // step a device takes (the random bytes give the descriptors)
        0x89, 0xd3, 0xc1, 0xe3, 0x0c, // mov ebx,edx; shl ebx,12
        0x8d, 0x1c, 0x83, // lea ebx,[rbx+rax*4]: the queue's ring offset
        0x0f, 0xb7, 0x93, // movzx edx, word [rbx + RINGS + 0xc02]
    ]);
    v.extend_from_slice(&(RINGS + 0xc02).to_le_bytes());
    v.extend_from_slice(&[
        0x89, 0xf5, 0xc1, 0xed, 0x18, 0x83, 0xe5, 0x07, // mov ebp,esi; shr ebp,24; and ebp,7
        0x01, 0xea, // add edx,ebp
        0x66, 0x89, 0x93, // mov [rbx + RINGS + 0x802], dx
    ]);
    v.extend_from_slice(&(RINGS + 0x802).to_le_bytes());
    v.extend_from_slice(&[
        0x89, 0xf2, 0xc1, 0xea, 0x14, 0x83, 0xe2, 0x03, // the queue again, in edx
        0x89, 0x54, 0x07, 0x50, // mov [rdi+rax+0x50], edx (QueueNotify)
        // one time in 16: a random value to a random register
        0xf7, 0xc6, 0x00, 0x00, 0x00, 0x0f, // test esi, 0x0f000000
        0x75, 0x0d, // jnz +13 (past the store)
        0x89, 0xf0, 0xc1, 0xe8, 0x08, // mov eax,esi; shr eax,8
        0x25, 0xfc, 0x3f, 0x00, 0x00, // and eax,0x3ffc
        0x89, 0x34, 0x07, // mov [rdi+rax], esi
        // flood the UART with the low byte
        0x66, 0xba, 0xf8, 0x03, // mov dx,0x3f8
        0x89, 0xf0, 0xee, // mov eax,esi; out dx,al
        0xff, 0xc9, // dec ecx
    ]);
    // jnz inner
    let rel = inner as i64 - (v.len() as i64 + 6);
    v.extend_from_slice(&[0x0f, 0x85]);
    v.extend_from_slice(&(rel as i32).to_le_bytes());
    // jmp outer
    let rel = outer as i64 - (v.len() as i64 + 5);
    v.push(0xe9);
    v.extend_from_slice(&(rel as i32).to_le_bytes());
    v
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

fn console_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    size(path) + size(&path.with_extension("1"))
}

struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Asks the control socket; the reply and how long it took.
fn ask(api: &Path, req: Request) -> (husk_vmm::api::Response, Duration) {
    let t = Instant::now();
    let r = request(api, req, &[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{req:?} on the control socket: {e}"));
    (r, t.elapsed())
}

#[test]
fn a_hostile_guest_cannot_stall_or_bloat_the_vmm() {
    let secs: u64 = std::env::var("HUSK_HOSTILE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tiny::tempdir("hostile");
    let kernel = dir.join("k");
    std::fs::write(
        &kernel,
        tiny::elf(
            tiny::ENTRY,
            &[
                (tiny::ENTRY, hostile_code()),
                (tiny::AP_TRAMPOLINE, vec![0xeb, 0xfe]), // jmp $
            ],
        ),
    )
    .unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let console = dir.join("console");
    let api = dir.join("api.sock");
    let netns = TestNetns::new("hostile");
    let mut c = netns.command(env!("CARGO_BIN_EXE_husk"));
    c.args(["vm", "--mem", "64", "--vcpus", "2", "--kernel"])
        .arg(&kernel)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .args(["--net", "tap=hkhostile0", "--vsock"])
        .arg(format!("cid=3,uds={}", dir.join("vsock").display()))
        .arg("--api-sock")
        .arg(&api)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let mut vmm = Vmm(c.spawn().expect("nsenter (util-linux)"));
    let pid = vmm.0.id();
    // Drained as it comes, so a flood would be measured, not block the VMM.
    let mut err_pipe = vmm.0.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut err_pipe, &mut text).unwrap();
        String::from_utf8_lossy(&text).into_owned()
    });

    // Running: the socket is up and the guest has flooded 64 KiB.
    let deadline = Instant::now() + support::boot_timeout();
    while !(api.exists() && console_bytes(&console) > 64 << 10) {
        if let Some(s) = vmm.0.try_wait().unwrap() {
            panic!("husk vm exited early: {s}: {}", log.join().unwrap());
        }
        assert!(Instant::now() < deadline, "the hostile guest never ran");
        std::thread::sleep(Duration::from_millis(50));
    }

    // No thread of the VMM holds a capability (see husk_vmm::caps).
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
            let v = status.lines().find_map(|l| l.strip_prefix(field)).unwrap();
            assert_eq!(
                v.trim(),
                "0000000000000000",
                "{field} of a VMM thread:\n{status}"
            );
        }
    }

    let start = Instant::now();
    let rss_start = rss_kib(pid).unwrap();
    let (mut rss_max, mut slowest, mut asked) = (rss_start, Duration::ZERO, 0u32);
    while start.elapsed() < Duration::from_secs(secs) {
        let (r, took) = ask(&api, Request::Status);
        assert_eq!(r.state.as_deref(), Some("running"), "{r:?}");
        slowest = slowest.max(took);
        asked += 1;
        rss_max = rss_max.max(rss_kib(pid).unwrap());
        if asked % 20 == 10 {
            // The spinning vCPUs acknowledge a pause, and run again.
            let (r, took) = ask(&api, Request::Pause);
            assert!(r.ok, "{r:?}");
            slowest = slowest.max(took);
            let (r, _) = ask(&api, Request::Status);
            assert_eq!(r.state.as_deref(), Some("paused"), "{r:?}");
            let (r, _) = ask(&api, Request::Resume);
            assert!(r.ok, "{r:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let flooded = console_bytes(&console);
    let before_stop = Instant::now();
    let (r, _) = ask(&api, Request::Stop);
    assert!(r.ok, "{r:?}");
    let deadline = before_stop + support::boot_timeout();
    let status = loop {
        if let Some(s) = vmm.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "husk vm did not stop");
        std::thread::sleep(Duration::from_millis(5));
    };
    let stopped_in = before_stop.elapsed();
    let stderr = log.join().unwrap();
    eprintln!(
        "hostile-guest: {secs} s, {asked} status requests, slowest control reply {} ms, \
         VmRSS {} -> max {} KiB, console {} KiB written (rotated, on disk at most 8 MiB), \
         stop -> exit {} ms, {status}, {} bytes of log",
        slowest.as_millis(),
        rss_start,
        rss_max,
        flooded >> 10,
        stopped_in.as_millis(),
        stderr.len()
    );
    // Stopped on request (not killed by its own seccomp filter, 159).
    assert_eq!(status.code(), Some(0), "{stderr}");
    // Replies within the boot timeout's bound, memory flat: the guest
    // touches a fixed 64 KiB of its RAM; everything else is the VMM's.
    assert!(
        slowest < Duration::from_secs(5),
        "slowest reply {slowest:?}"
    );
    assert!(
        rss_max < rss_start + 16 * 1024,
        "VmRSS grew from {rss_start} to {rss_max} KiB"
    );
    assert!(console_bytes(&console) <= 8 << 20);
    // A few warnings per kind of guest error, not one per error.
    assert!(
        stderr.len() < 16 << 10,
        "{} bytes of log:\n{stderr}",
        stderr.len()
    );
    assert!(!api.exists(), "control socket left behind");
    drop(netns);
    std::fs::remove_dir_all(dir).unwrap();
}
