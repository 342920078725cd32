//! The state file's checks, the memory file's holes, and a virtio
//! transport that comes back with a request the driver had posted but the
//! device had not served.

use std::sync::{Arc, Mutex};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::block::{Block, Disk};
use crate::devices::virtio::mmio::{regs, MmioTransport};
use crate::devices::virtio::{status, GuestMem, IrqfdInterrupt, VirtioDevice};
use crate::vstate::bus::BusDevice;

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("husk-snap-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `path` created (or emptied), open for reading and writing.
fn empty_file(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap()
}

fn w(t: &mut MmioTransport, reg: u64, v: u32) {
    t.write(reg, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(reg, &mut b);
    u32::from_le_bytes(b)
}

fn transport(mem: &GuestMem, img: &std::path::Path) -> (MmioTransport, Arc<Mutex<Block>>) {
    let dev = Arc::new(Mutex::new(
        Block::new(Disk::open(img, false, false).unwrap(), "snap").unwrap(),
    ));
    let irq = Arc::new(IrqfdInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    (
        MmioTransport::new(dev.clone(), mem.clone(), irq).unwrap(),
        dev,
    )
}

#[test]
fn a_posted_request_is_served_after_the_transport_is_restored() {
    let dir = tempdir("transport");
    let img = dir.join("disk.img");
    std::fs::write(&img, (0..8u8).flat_map(|n| [n; 512]).collect::<Vec<u8>>()).unwrap();
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    let (mut t, dev) = transport(&mem, &img);
    // The driver brings the device up (virtio 1.x, 3.1.1).
    w(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    for sel in 0..2 {
        w(&mut t, regs::DEVICE_FEATURES_SEL, sel);
        let f = r(&mut t, regs::DEVICE_FEATURES);
        w(&mut t, regs::DRIVER_FEATURES_SEL, sel);
        w(&mut t, regs::DRIVER_FEATURES, f);
    }
    w(
        &mut t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    w(&mut t, regs::QUEUE_SEL, 0);
    w(&mut t, regs::QUEUE_NUM, 16);
    for (lo, v) in [
        (regs::QUEUE_DESC_LOW, mock.desc_table_addr().0),
        (regs::QUEUE_AVAIL_LOW, mock.avail_addr().0),
        (regs::QUEUE_USED_LOW, mock.used_addr().0),
    ] {
        w(&mut t, lo, v as u32);
        w(&mut t, lo + 4, (v >> 32) as u32);
    }
    w(&mut t, regs::QUEUE_READY, 1);
    let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
    w(&mut t, regs::STATUS, all);
    assert!(dev.lock().unwrap().is_activated());
    // One read of sector 3 served before the snapshot, one of sector 5
    // posted and not yet served when it is taken.
    let read = |sector: u64, data: u64, st: u64, first: u16| {
        mem.write_obj(0u32, GuestAddress(0x10_0000)).unwrap();
        mem.write_obj(0u32, GuestAddress(0x10_0004)).unwrap();
        mem.write_obj(sector, GuestAddress(0x10_0008)).unwrap();
        vec![
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 16, 1, first + 1)),
            RawDescriptor::from(SplitDescriptor::new(data, 512, 2 | 1, first + 2)),
            RawDescriptor::from(SplitDescriptor::new(st, 1, 2, 0)),
        ]
    };
    mock.add_desc_chains(&read(3, 0x20_0000, 0x30_0000, 0), 0)
        .unwrap();
    dev.lock().unwrap().process_queue();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 3);
    mock.add_desc_chains(&read(5, 0x20_1000, 0x30_0001, 3), 3)
        .unwrap();
    let saved = t.save();
    assert!(saved.activated);
    assert_eq!(saved.queues[0].next_avail, 1);
    assert_eq!(saved.queues[0].next_used, 1);
    // The state survives its file format.
    let saved: TransportState =
        serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

    // A new transport and device over the same memory, as a restore builds
    // (the old ones gone: they hold the disk's lock).
    drop((t, dev));
    let (mut t2, dev2) = transport(&mem, &img);
    t2.restore(&saved).unwrap();
    assert_eq!(t2.status(), all);
    assert!(dev2.lock().unwrap().is_activated());
    // The restore kicked the queue: the pending request is served, once,
    // into the next used slot.
    assert_eq!(
        dev2.lock().unwrap().queue_events()[0].read().unwrap(),
        1,
        "the queue was signalled"
    );
    dev2.lock().unwrap().process_queue();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_1000)).unwrap(), 5);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x30_0001)).unwrap(), 0);
    assert_eq!(mock.used().idx().load(), 2);
    assert_eq!(t2.save().queues[0].next_used, 2);

    // Another kind of device, or another queue count, is refused.
    let mut wrong = saved.clone();
    wrong.device_type = 1;
    drop((t2, dev2));
    let (mut t3, _) = transport(&mem, &img);
    assert!(t3.restore(&wrong).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn memory_is_written_with_holes_and_maps_back() {
    let dir = tempdir("mem");
    let mem = crate::vstate::memory::create(64).unwrap();
    mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x700))
        .unwrap();
    mem.write_slice(&[0xab; 4096], GuestAddress(40 << 20))
        .unwrap();
    let path = dir.join(MEMORY_FILE);
    let f = empty_file(&path);
    let written = write_memory(&mem, &f).unwrap();
    assert_eq!(written, 2 * 4096, "only the two non-zero pages");
    assert_eq!(f.metadata().unwrap().len(), 64 << 20);
    let back = crate::vstate::memory::create(64).unwrap();
    map_memory(&back, &f, &path).unwrap();
    assert_eq!(
        back.read_obj::<u64>(GuestAddress(0x700)).unwrap(),
        0x1122_3344_5566_7788
    );
    assert_eq!(
        back.read_obj::<u8>(GuestAddress((40 << 20) + 4095))
            .unwrap(),
        0xab
    );
    // Writes stay private to the restored VM.
    back.write_obj(1u64, GuestAddress(0x700)).unwrap();
    let mut on_disk = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut on_disk, 0x700).unwrap();
    assert_eq!(u64::from_le_bytes(on_disk), 0x1122_3344_5566_7788);
    // A memory file of another size is refused.
    let small = crate::vstate::memory::create(32).unwrap();
    let e = map_memory(&small, &f, &path).unwrap_err();
    assert!(e.to_string().contains("holds 67108864 bytes"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn state_files_that_are_not_this_version_are_refused_in_one_line() {
    let dir = tempdir("state");
    let p = dir.join(STATE_FILE);
    let cases: [(&[u8], &str); 6] = [
        (b"", "is not a husk snapshot state file"),
        (
            br#"{"format":"husk-snapshot","version":99}"#,
            "format version 99",
        ),
        (
            br#"{"format":"qemu","version":1}"#,
            "is not a husk snapshot",
        ),
        (
            br#"{"format":"husk-snapshot","version":3,"config":{}}"#,
            "is not a husk snapshot state file",
        ),
        // Before virtio-blk offered size_max.
        (
            br#"{"format":"husk-snapshot","version":1}"#,
            "format version 1",
        ),
        // Before the vsock receive queue shrank to 64 entries.
        (
            br#"{"format":"husk-snapshot","version":2}"#,
            "format version 2",
        ),
    ];
    for (bytes, want) in cases {
        std::fs::write(&p, bytes).unwrap();
        let e = Snapshot::read(&p).err().expect("refused").to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
        assert!(!e.contains('\n'));
    }
    let big = vec![b' '; MAX_STATE_BYTES as usize + 1];
    std::fs::write(&p, big).unwrap();
    assert!(matches!(
        Snapshot::read(&p),
        Err(SnapshotError::TooLarge(_))
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn create_files_refuses_an_existing_directory_and_leaves_it_alone() {
    let dir = tempdir("create");
    std::fs::write(dir.join("keep"), b"x").unwrap();
    assert!(create_files(&dir).is_err());
    assert!(dir.join("keep").exists());
    let out = dir.join("snap");
    let (_s, _m) = create_files(&out).unwrap();
    assert!(out.join(STATE_FILE).exists() && out.join(MEMORY_FILE).exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn memory_loads_into_a_memfd_without_its_holes() {
    let dir = tempdir("load");
    let mem = crate::vstate::memory::create(64).unwrap();
    mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x700))
        .unwrap();
    mem.write_slice(&[0xab; 3 * 4096], GuestAddress(40 << 20))
        .unwrap();
    let last = (64 << 20) - 8;
    mem.write_obj(0x99u64, GuestAddress(last)).unwrap();
    let path = dir.join(MEMORY_FILE);
    let f = empty_file(&path);
    assert_eq!(write_memory(&mem, &f).unwrap(), 5 * 4096);
    let back = crate::vstate::memory::create_shared(64).unwrap();
    load_memory(&back, &f, &path).unwrap();
    assert_eq!(
        back.read_obj::<u64>(GuestAddress(0x700)).unwrap(),
        0x1122_3344_5566_7788
    );
    let mut run = vec![0u8; 3 * 4096];
    back.read_slice(&mut run, GuestAddress(40 << 20)).unwrap();
    assert!(run.iter().all(|&b| b == 0xab));
    assert_eq!(back.read_obj::<u64>(GuestAddress(last)).unwrap(), 0x99);
    assert_eq!(back.read_obj::<u64>(GuestAddress(20 << 20)).unwrap(), 0);
    // Only what the file holds was copied (the rest of the memfd is
    // unbacked): at most the data pages, rounded to the file's extents.
    let memfd_bytes = {
        use vm_memory::GuestMemoryRegion;
        let r = back.iter().next().unwrap();
        let fd = r.file_offset().unwrap().file();
        std::os::unix::fs::MetadataExt::blocks(&fd.metadata().unwrap()) * 512
    };
    assert!(memfd_bytes <= 1 << 20, "{memfd_bytes} bytes backed");
    // A memory file of another size is refused.
    let small = crate::vstate::memory::create_shared(32).unwrap();
    let e = load_memory(&small, &f, &path).unwrap_err();
    assert!(e.to_string().contains("holds 67108864 bytes"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_share_the_guest_has_used_is_not_snapshotted() {
    use crate::devices::virtio::device_type;
    use crate::devices::virtio::mmio::QueueSnapshot;
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let queue = |avail: u64| QueueSnapshot {
        size: 16,
        ready: true,
        desc: 0x1000,
        avail,
        used: 0x3000,
        next_avail: 0,
        next_used: 0,
    };
    let state = |device_type, queues| TransportState {
        device_type,
        status: 0xf,
        needs_reset: false,
        device_features_sel: 0,
        driver_features_sel: 0,
        acked_features: 0,
        acked_beyond_64: false,
        queue_sel: 0,
        config_generation: 0,
        interrupt_status: 0,
        activated: true,
        queues,
        device: None,
    };
    let shares: Vec<crate::config::FsConfig> = vec![
        "tag=husk0,dir=/tmp".parse().unwrap(),
        "tag=husk1,dir=/tmp".parse().unwrap(),
    ];
    // A disk that has served requests, then two shares (two queues each,
    // their avail rings at 0x2000.. and 0x4000..).
    mem.write_obj(5u16, GuestAddress(0x8002)).unwrap();
    let devices = vec![
        state(device_type::BLOCK, vec![queue(0x8000)]),
        state(device_type::FS, vec![queue(0x2000), queue(0x2100)]),
        state(device_type::FS, vec![queue(0x4000), queue(0x4100)]),
    ];
    let check =
        |devices: &[TransportState]| crate::control::check_shares_unused(&mem, &shares, devices);
    check(&devices).unwrap();
    // The second share's request queue has had a request (FUSE_INIT).
    mem.write_obj(1u16, GuestAddress(0x4102)).unwrap();
    let e = check(&devices).unwrap_err();
    assert!(e.contains("used share husk1"), "{e}");
    assert!(!e.contains('\n'));
    // A queue the driver never set up is not read.
    let mut unset = devices.clone();
    unset[2].queues[1].ready = false;
    check(&unset).unwrap();
    // A ring outside guest memory is an error, not a crash.
    let mut outside = devices.clone();
    outside[1].queues[0].avail = 0xffff_ffff_0000;
    assert!(check(&outside).is_err());
}
