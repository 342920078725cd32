//! virtio-blk: request parsing, status codes, file I/O and hostile chains,
//! driven through virtio-queue's mock driver.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::request::{parse, status_address};
use super::*;
use crate::devices::virtio::device::{ActivateContext, DeviceFailure, VirtioDevice};
use crate::devices::virtio::queue::Segment;
use crate::devices::virtio::{GuestMem, IrqfdInterrupt, VirtioInterrupt};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
const MEM_SIZE: usize = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_image(tag: &str, contents: &[u8]) -> TempFile {
    let p = std::env::temp_dir().join(format!(
        "husk-blk-{tag}-{}-{:?}.img",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&p, contents).unwrap();
    TempFile(p)
}

/// 8 sectors, sector n filled with byte n.
fn pattern() -> Vec<u8> {
    (0..8u8).flat_map(|n| [n; 512]).collect()
}

struct Rig {
    mem: GuestMem,
    dev: Block,
    irq_evt: EventFd,
    failed: Arc<AtomicBool>,
    _img: TempFile,
}

fn rig_with(tag: &str, contents: &[u8], ro: bool, direct: bool) -> Rig {
    let img = temp_image(tag, contents);
    let disk = Disk::open(&img.0, ro, direct).unwrap();
    let dev = Block::new(disk, "serial-1").unwrap();
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    Rig {
        mem,
        dev,
        irq_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        failed: Arc::new(AtomicBool::new(false)),
        _img: img,
    }
}

fn rig(tag: &str) -> Rig {
    rig_with(tag, &pattern(), false, false)
}

impl Rig {
    fn activate(&mut self, mock: &MockSplitQueue<'_, GuestMem>) {
        let q: Queue = mock.create_queue().unwrap();
        let irq: Arc<dyn VirtioInterrupt> =
            Arc::new(IrqfdInterrupt::new(self.irq_evt.try_clone().unwrap()));
        self.dev
            .activate(ActivateContext {
                mem: self.mem.clone(),
                queues: vec![q],
                interrupt: irq.clone(),
                acked_features: self.dev.avail_features(),
                failure: DeviceFailure::new(self.failed.clone(), irq),
            })
            .unwrap();
    }

    fn header(&self, t: u32, sector: u64) {
        self.mem.write_obj(t, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// (id, len) of used element `i`.
    fn used(&self, mock: &MockSplitQueue<'_, GuestMem>, i: usize) -> (u32, u32) {
        let e = mock.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    fn used_idx(&self, mock: &MockSplitQueue<'_, GuestMem>) -> u16 {
        mock.used().idx().load()
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A chain at descriptor index 0.. from (addr, len, flags) entries.
fn chain(parts: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    let n = parts.len();
    parts
        .iter()
        .enumerate()
        .map(|(i, &(a, l, f))| {
            if i + 1 < n {
                desc(a, l, f | NEXT, i as u16 + 1)
            } else {
                desc(a, l, f, 0)
            }
        })
        .collect()
}

fn simple(data_len: u32, data_flags: u16) -> Vec<RawDescriptor> {
    chain(&[
        (HDR, 16, 0),
        (DATA, data_len, data_flags),
        (STATUS, 1, WRITE),
    ])
}

fn run(r: &mut Rig, descs: &[RawDescriptor]) -> (u8, u32) {
    let mem = r.mem.clone();
    let m = MockSplitQueue::new(&mem, QUEUE_SIZE);
    m.add_desc_chains(descs, 0).unwrap();
    r.activate(&m);
    r.dev.process_queue();
    assert_eq!(r.used_idx(&m), 1, "one request completed");
    (r.status(), r.used(&m, 0).1)
}

#[test]
fn config_space_has_capacity_and_seg_max() {
    let r = rig("cfg");
    let mut d = [0u8; 16];
    r.dev.read_config(0, &mut d);
    assert_eq!(u64::from_le_bytes(d[0..8].try_into().unwrap()), 8);
    assert_eq!(u32::from_le_bytes(d[8..12].try_into().unwrap()), SIZE_MAX);
    assert_eq!(u32::from_le_bytes(d[12..16].try_into().unwrap()), SEG_MAX);
    assert_ne!(
        r.dev.avail_features() & (1 << features::VIRTIO_BLK_F_SIZE_MAX),
        0
    );
    assert_eq!(r.dev.avail_features() & (1 << features::VIRTIO_BLK_F_RO), 0);
    assert_ne!(r.dev.avail_features() & (1 << 32), 0, "VERSION_1");
}

#[test]
fn read_returns_the_sectors_asked_for() {
    let mut r = rig("read");
    r.header(request_type::IN, 2);
    let (st, len) = run(&mut r, &simple(1024, WRITE));
    assert_eq!(st, status::OK);
    assert_eq!(len, 1025);
    let mut buf = vec![0u8; 1024];
    r.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 2));
    assert!(buf[512..].iter().all(|&b| b == 3));
    assert_eq!(r.irq_evt.read().unwrap(), 1, "used-buffer interrupt");
    assert_eq!(r.dev.counters().ok, 1);
}

#[test]
fn write_then_flush_reaches_the_file() {
    let mut r = rig("write");
    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    r.header(request_type::OUT, 7);
    let descs = [
        simple(512, 0),
        chain(&[(HDR + 0x100, 16, 0), (STATUS + 1, 1, WRITE)]),
    ];
    r.mem
        .write_obj(request_type::FLUSH, GuestAddress(HDR + 0x100))
        .unwrap();
    let mem = r.mem.clone();
    let m = MockSplitQueue::new(&mem, QUEUE_SIZE);
    m.add_desc_chains(&descs[0], 0).unwrap();
    m.add_desc_chains(&descs[1], 3).unwrap();
    r.activate(&m);
    r.dev.process_queue();
    assert_eq!(r.used_idx(&m), 2);
    assert_eq!(r.status(), status::OK);
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(),
        status::OK
    );
    let file = std::fs::read(&r._img.0).unwrap();
    assert!(file[7 * 512..].iter().all(|&b| b == 0xab));
    assert!(file[6 * 512..7 * 512].iter().all(|&b| b == 6));
}

#[test]
fn read_only_disk_refuses_writes_with_ioerr() {
    let mut r = rig_with("ro", &pattern(), true, false);
    assert_ne!(r.dev.avail_features() & (1 << features::VIRTIO_BLK_F_RO), 0);
    r.header(request_type::OUT, 0);
    let (st, len) = run(&mut r, &simple(512, 0));
    assert_eq!(st, status::IOERR);
    assert_eq!(len, 1);
    assert_eq!(std::fs::read(&r._img.0).unwrap(), pattern());
}

#[test]
fn flush_on_a_read_only_disk_succeeds() {
    let mut r = rig_with("roflush", &pattern(), true, false);
    r.header(request_type::FLUSH, 0);
    let (st, _) = run(&mut r, &chain(&[(HDR, 16, 0), (STATUS, 1, WRITE)]));
    assert_eq!(st, status::OK);
}

#[test]
fn get_id_returns_the_serial() {
    let mut r = rig("id");
    r.header(request_type::GET_ID, 0);
    let (st, len) = run(&mut r, &simple(ID_BYTES as u32, WRITE));
    assert_eq!(st, status::OK);
    assert_eq!(len, 21);
    let mut id = [0u8; ID_BYTES];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..9], b"serial-1\0");
    // A shorter buffer gets a prefix.
    let mut r = rig("id2");
    r.header(request_type::GET_ID, 0);
    let (st, len) = run(&mut r, &simple(4, WRITE));
    assert_eq!((st, len), (status::OK, 5));
}

#[test]
fn id_bytes_pad_and_truncate() {
    assert_eq!(&request::id_bytes("ab")[..3], b"ab\0");
    let long = "x".repeat(30);
    assert_eq!(request::id_bytes(&long), [b'x'; ID_BYTES]);
}

#[test]
fn requests_beyond_capacity_fail() {
    for (sector, len) in [
        (8u64, 512u32),
        (7, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512, 512),
    ] {
        let mut r = rig("range");
        r.header(request_type::IN, sector);
        let (st, len) = run(&mut r, &simple(len, WRITE));
        assert_eq!((st, len), (status::IOERR, 1), "sector {sector}");
    }
    // The last sector itself is fine.
    let mut r = rig("range-ok");
    r.header(request_type::IN, 7);
    assert_eq!(run(&mut r, &simple(512, WRITE)).0, status::OK);
}

#[test]
fn unsupported_type_gets_unsupp() {
    let mut r = rig("unsupp");
    r.header(11, 0); // DISCARD, not offered
    let (st, _) = run(&mut r, &simple(16, 0));
    assert_eq!(st, status::UNSUPP);
    assert_eq!(r.dev.counters().failed, 1);
}

#[test]
fn framing_is_not_assumed() {
    // Header split over two buffers; status byte at the end of the data buffer.
    let mut r = rig("framing");
    r.header(request_type::IN, 1);
    let descs = chain(&[(HDR, 5, 0), (HDR + 5, 11, 0), (DATA, 513, WRITE)]);
    let mem = r.mem.clone();
    let m = MockSplitQueue::new(&mem, QUEUE_SIZE);
    m.add_desc_chains(&descs, 0).unwrap();
    r.activate(&m);
    r.dev.process_queue();
    assert_eq!(r.used(&m, 0).1, 513);
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(),
        status::OK
    );
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 1);
}

#[test]
fn partial_sectors_fail() {
    let mut r = rig("partial");
    r.header(request_type::IN, 0);
    assert_eq!(run(&mut r, &simple(100, WRITE)).0, status::IOERR);
}

#[test]
fn sparse_images_stay_sparse() {
    let img = temp_image("sparse", b"");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img.0)
        .unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let disk = Disk::open(&img.0, false, false).unwrap();
    assert_eq!(disk.capacity(), (64 << 20) / 512);
    let mut r = Rig {
        mem: GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        dev: Block::new(disk, "s").unwrap(),
        irq_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        failed: Arc::new(AtomicBool::new(false)),
        _img: img,
    };
    r.mem.write_slice(&[1; 4096], GuestAddress(DATA)).unwrap();
    r.header(request_type::OUT, 60_000);
    assert_eq!(run(&mut r, &simple(4096, 0)).0, status::OK);
    let meta = std::fs::metadata(&r._img.0).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 <= 64 << 10, "{} blocks", meta.blocks());
}

#[test]
fn direct_io_reads_and_writes() {
    let mut r = rig_with("direct", &pattern(), false, true);
    // An odd guest address: the bounce buffer takes care of alignment.
    r.mem
        .write_slice(&[9; 512], GuestAddress(DATA + 3))
        .unwrap();
    r.header(request_type::OUT, 4);
    let descs = chain(&[(HDR, 16, 0), (DATA + 3, 512, 0), (STATUS, 1, WRITE)]);
    assert_eq!(run(&mut r, &descs).0, status::OK);
    let mut r2 = rig_with("direct2", &std::fs::read(&r._img.0).unwrap(), false, true);
    r2.header(request_type::IN, 3);
    assert_eq!(run(&mut r2, &simple(1024, WRITE)).0, status::OK);
    let mut buf = vec![0u8; 1024];
    r2.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 3));
    assert!(buf[512..].iter().all(|&b| b == 9));
}

#[test]
fn locked_images_are_refused() {
    let img = temp_image("lock", &pattern());
    let _a = Disk::open(&img.0, false, false).unwrap();
    let err = Disk::open(&img.0, false, false).err().unwrap();
    assert!(matches!(err, BlockError::Locked(_)), "{err}");
    assert!(Disk::open(&img.0, true, false).is_err());
    let ro = temp_image("lock-ro", &pattern());
    let _b = Disk::open(&ro.0, true, false).unwrap();
    Disk::open(&ro.0, true, false).unwrap();
}

#[test]
fn missing_image_is_a_clear_error() {
    let err = Disk::open(std::path::Path::new("/nonexistent/x.img"), false, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/x.img"), "{err}");
}

// Hostile chains: each fails only its own request, never the VMM.

#[test]
fn data_buffer_outside_guest_memory_is_ioerr() {
    let mut r = rig("oob");
    r.header(request_type::IN, 0);
    let descs = chain(&[
        (HDR, 16, 0),
        (MEM_SIZE as u64 - 256, 512, WRITE),
        (STATUS, 1, WRITE),
    ]);
    assert_eq!(run(&mut r, &descs), (status::IOERR, 1));
    let descs = chain(&[
        (HDR, 16, 0),
        (u64::MAX - 10, 512, WRITE),
        (STATUS, 1, WRITE),
    ]);
    let mut r = rig("oob2");
    r.header(request_type::IN, 0);
    assert_eq!(run(&mut r, &descs), (status::IOERR, 1));
}

#[test]
fn status_outside_guest_memory_drops_the_request() {
    let mut r = rig("oob-status");
    r.header(request_type::IN, 0);
    let descs = chain(&[
        (HDR, 16, 0),
        (DATA, 512, WRITE),
        (MEM_SIZE as u64, 1, WRITE),
    ]);
    assert_eq!(run(&mut r, &descs).1, 0);
    assert_eq!(r.dev.counters().dropped, 1);
    assert!(!r.failed.load(Ordering::SeqCst));
}

#[test]
fn header_outside_guest_memory_is_ioerr() {
    let mut r = rig("oob-hdr");
    r.header(request_type::IN, 0);
    let descs = chain(&[(MEM_SIZE as u64 - 8, 16, 0), (STATUS, 1, WRITE)]);
    assert_eq!(run(&mut r, &descs), (status::IOERR, 1));
}

#[test]
fn looping_chain_is_dropped_without_hanging() {
    let mut r = rig("loop");
    r.header(request_type::IN, 0);
    let descs = [
        desc(HDR, 16, NEXT, 1),
        desc(DATA, 512, WRITE | NEXT, 2),
        desc(STATUS, 1, WRITE | NEXT, 0),
    ];
    assert_eq!(run(&mut r, &descs).1, 0);
    assert_eq!(r.status(), 0xff, "no status where none could be found");
    assert!(!r.failed.load(Ordering::SeqCst));
}

#[test]
fn next_index_past_the_table_is_dropped() {
    let mut r = rig("badnext");
    r.header(request_type::IN, 0);
    let descs = [desc(HDR, 16, NEXT, 1), desc(STATUS, 1, WRITE | NEXT, 999)];
    assert_eq!(run(&mut r, &descs).1, 0);
}

#[test]
fn wrong_directions_are_ioerr() {
    // Read whose data buffer is device-readable.
    let mut r = rig("dir-in");
    r.header(request_type::IN, 0);
    assert_eq!(run(&mut r, &simple(512, 0)).0, status::IOERR);
    // Write whose data buffer is device-writable.
    let mut r = rig("dir-out");
    r.header(request_type::OUT, 0);
    assert_eq!(run(&mut r, &simple(512, WRITE)).0, status::IOERR);
    assert_eq!(std::fs::read(&r._img.0).unwrap(), pattern());
    // Readable after writable.
    let mut r = rig("dir-order");
    r.header(request_type::IN, 0);
    let descs = chain(&[
        (HDR, 16, 0),
        (DATA, 512, WRITE),
        (DATA + 512, 512, 0),
        (STATUS, 1, WRITE),
    ]);
    assert_eq!(run(&mut r, &descs).0, status::IOERR);
    // Header in a device-writable buffer: no readable header at all.
    let mut r = rig("dir-hdr");
    r.header(request_type::IN, 0);
    let descs = chain(&[(HDR, 16, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!(run(&mut r, &descs).0, status::IOERR);
}

#[test]
fn chain_without_writable_status_is_dropped() {
    let mut r = rig("nostatus");
    r.header(request_type::IN, 0);
    assert_eq!(run(&mut r, &chain(&[(HDR, 16, 0), (DATA, 512, 0)])).1, 0);
    let mut r = rig("zerostatus");
    r.header(request_type::IN, 0);
    assert_eq!(
        run(&mut r, &chain(&[(HDR, 16, 0), (STATUS, 0, WRITE)])).1,
        0
    );
}

#[test]
fn short_header_is_ioerr() {
    let mut r = rig("short");
    r.header(request_type::IN, 0);
    assert_eq!(
        run(&mut r, &chain(&[(HDR, 15, 0), (STATUS, 1, WRITE)])),
        (status::IOERR, 1)
    );
}

#[test]
fn absurdly_long_indirect_chain_is_cut_at_the_cap_and_dropped() {
    let mut r = rig("long");
    r.header(request_type::IN, 0);
    // An indirect table of 1000 descriptors: header, 998 x 512 data, and a
    // status byte at the end. The walk stops after MAX_DESCRIPTORS + 1 of
    // them, so the status byte is never reached (a walk to the end wrote
    // IOERR there).
    let table = 0x80_0000u64;
    let n = 1000u16;
    for i in 0..n {
        let d = match i {
            0 => SplitDescriptor::new(HDR, 16, NEXT, 1),
            i if i == n - 1 => SplitDescriptor::new(STATUS, 1, WRITE, 0),
            i => SplitDescriptor::new(DATA + u64::from(i) * 512, 512, WRITE | NEXT, i + 1),
        };
        r.mem
            .write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }
    let descs = [desc(table, u32::from(n) * 16, INDIRECT, 0)];
    assert_eq!(run(&mut r, &descs).1, 0);
    assert_eq!(r.status(), 0xff, "no status: the walk stopped before it");
    assert!(!r.failed.load(Ordering::SeqCst));
}

#[test]
fn head_index_past_the_queue_needs_reset() {
    let mut r = rig("badhead");
    let mem = r.mem.clone();
    let m = MockSplitQueue::new(&mem, QUEUE_SIZE);
    // Avail ring entry 0 names descriptor 4000.
    m.avail().ring().ref_at(0).unwrap().store(4000);
    m.avail().idx().store(1);
    r.activate(&m);
    r.dev.process_queue();
    assert!(r.failed.load(Ordering::SeqCst));
    // A failed device ignores further notifications.
    r.dev.process_queue();
    assert_eq!(r.used_idx(&m), 0);
}

#[test]
fn impossible_avail_index_needs_reset() {
    let mut r = rig("availidx");
    let mem = r.mem.clone();
    let m = MockSplitQueue::new(&mem, QUEUE_SIZE);
    m.avail().idx().store(QUEUE_SIZE + 1);
    r.activate(&m);
    r.dev.process_queue();
    assert!(r.failed.load(Ordering::SeqCst));
    assert_eq!(r.irq_evt.read().unwrap(), 1, "config interrupt");
}

#[test]
fn reset_stops_the_device() {
    let mut r = rig("reset");
    r.header(request_type::IN, 0);
    let mem = r.mem.clone();
    let m = MockSplitQueue::new(&mem, QUEUE_SIZE);
    r.activate(&m);
    assert!(r.dev.is_activated());
    r.dev.reset();
    assert!(!r.dev.is_activated());
    m.add_desc_chains(&simple(512, WRITE), 0).unwrap();
    r.dev.process_queue();
    assert_eq!(r.used_idx(&m), 0);
    assert_eq!(r.status(), 0xff);
}

#[test]
fn parser_reports_each_error() {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    mem.write_obj(request_type::OUT, GuestAddress(0)).unwrap();
    mem.write_obj(5u64, GuestAddress(8)).unwrap();
    let seg = |a: u64, l: u32, w: bool| Segment {
        addr: GuestAddress(a),
        len: l,
        writable: w,
    };
    let req = parse(
        &[
            seg(0, 16, false),
            seg(0x100, 1024, false),
            seg(0x800, 1, true),
        ],
        &mem,
    )
    .unwrap();
    assert_eq!(req.request_type, RequestType::Out);
    assert_eq!(req.sector, 5);
    assert_eq!(req.data_len(), 1024);
    assert_eq!(req.status, GuestAddress(0x800));
    assert_eq!(parse(&[], &mem), Err(RequestError::NoStatus));
    assert_eq!(
        parse(&[seg(0, 16, false)], &mem),
        Err(RequestError::NoStatus)
    );
    assert_eq!(
        parse(&[seg(0, 8, false), seg(0x800, 1, true)], &mem),
        Err(RequestError::HeaderTooShort)
    );
    assert_eq!(
        parse(
            &[
                seg(0, 16, false),
                seg(0x100, 1, true),
                seg(0x200, 1, false),
                seg(0x800, 1, true)
            ],
            &mem
        ),
        Err(RequestError::ReadableAfterWritable)
    );
    assert_eq!(
        parse(
            &[
                seg(0, 16, false),
                seg(0x100, 511, false),
                seg(0x800, 1, true)
            ],
            &mem
        ),
        Err(RequestError::PartialSector(511))
    );
    assert_eq!(
        parse(
            &[
                seg(0, 16, false),
                seg(0x100, 512, true),
                seg(0x800, 1, true)
            ],
            &mem
        ),
        Err(RequestError::WrongDirection)
    );
    assert_eq!(
        parse(&[seg(0xfff8, 16, false), seg(0x800, 1, true)], &mem),
        Err(RequestError::HeaderUnreadable)
    );
    assert_eq!(
        status_address(&seg(0x10, 4, true)),
        Some(GuestAddress(0x13))
    );
    assert_eq!(status_address(&seg(0x10, 4, false)), None);
    assert_eq!(status_address(&seg(u64::MAX, 2, true)), None);
    let _ = GuestAddress(0).unchecked_add(1);
}

fn seg(addr: u64, len: u32, writable: bool) -> Segment {
    Segment {
        addr: GuestAddress(addr),
        len,
        writable,
    }
}

#[test]
fn segments_past_size_max_and_oversized_requests_are_refused_before_io() {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_obj(request_type::IN, GuestAddress(HDR)).unwrap();
    let hdr = seg(HDR, 16, false);
    let status = seg(STATUS, 1, true);
    assert!(parse(&[hdr, seg(DATA, SIZE_MAX, true), status], &mem).is_ok());
    let e = parse(&[hdr, seg(DATA, SIZE_MAX + 512, true), status], &mem).unwrap_err();
    assert!(
        matches!(e, RequestError::SegmentTooLarge(n) if n == SIZE_MAX + 512),
        "{e}"
    );
    // The status byte may end the last data segment.
    assert!(parse(&[hdr, seg(DATA, SIZE_MAX + 1, true)], &mem).is_ok());
    // Each segment within size_max, one more of them than seg_max (the
    // last one carries the status byte): more than a request may carry.
    let mut segs = vec![hdr];
    segs.extend((0..SEG_MAX).map(|_| seg(DATA, SIZE_MAX, true)));
    segs.push(seg(DATA, SIZE_MAX + 1, true));
    assert_eq!(segs.len(), MAX_DESCRIPTORS);
    let e = parse(&segs, &mem).unwrap_err();
    assert!(
        matches!(e, RequestError::TooLarge(n) if n == u64::from(SEG_MAX + 1) * u64::from(SIZE_MAX)),
        "{e}"
    );
    // A write whose data shares the header's descriptor.
    mem.write_obj(request_type::OUT, GuestAddress(HDR)).unwrap();
    let e = parse(&[seg(HDR, 16 + SIZE_MAX + 512, false), status], &mem).unwrap_err();
    assert!(matches!(e, RequestError::SegmentTooLarge(_)), "{e}");
}

#[test]
fn a_wake_up_stops_after_its_byte_budget_and_comes_back() {
    let mut r = rig_with("bytes", &vec![0u8; 16 << 20], false, false);
    r.header(request_type::IN, 0);
    // Three chains, each an indirect table: the header, 200 data segments
    // of size_max over one buffer, the status byte (12.5 MiB each).
    let data = 200u16;
    let n = data + 2;
    let mut heads = Vec::new();
    for c in 0..3u64 {
        let table = 0x80_0000 + c * 0x1_0000;
        for i in 0..n {
            let d = match i {
                0 => SplitDescriptor::new(HDR, 16, NEXT, 1),
                i if i == n - 1 => SplitDescriptor::new(STATUS, 1, WRITE, 0),
                i => SplitDescriptor::new(DATA, SIZE_MAX, WRITE | NEXT, i + 1),
            };
            r.mem
                .write_obj(d, GuestAddress(table + u64::from(i) * 16))
                .unwrap();
        }
        heads.push(desc(table, u32::from(n) * 16, INDIRECT, 0));
    }
    let mem = r.mem.clone();
    let m = MockSplitQueue::new(&mem, QUEUE_SIZE);
    m.add_desc_chains(&heads, 0).unwrap();
    r.activate(&m);
    r.dev.process_queue();
    // 12.5 MiB, then 25 MiB: past the 16 MiB budget after the second.
    assert_eq!(r.used_idx(&m), 2);
    assert_eq!(r.dev.counters().ok, 2);
    // The device asked to be woken again, and finishes then.
    assert_eq!(r.dev.core.queue_events()[0].read().unwrap(), 1);
    r.dev.process_queue();
    assert_eq!(r.used_idx(&m), 3);
    assert_eq!(r.dev.counters().ok, 3);
}
