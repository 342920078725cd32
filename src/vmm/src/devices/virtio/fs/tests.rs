//! virtio-fs against a real virtiofsd (Debian's, or $HUSK_VIRTIOFSD): the
//! handshake, a FUSE_INIT served through the rings in shared guest memory,
//! the backend killed, error replies from husk; hostile request chains
//! against the error path. Needs root (virtiofsd's sandbox).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::request::{answer_error, parse, FUSE_FORGET, OUT_HEADER_LEN};
use super::*;
use crate::devices::virtio::attach::virtiofsd_path;
use crate::devices::virtio::device::{ActivateContext, DeviceFailure, VirtioDevice};
use crate::devices::virtio::queue::{Chain, Segment};
use crate::devices::virtio::{GuestMem, IrqfdInterrupt, VirtioInterrupt};
use crate::vstate::memory;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const REQ: u64 = 0x10_0000;
const REPLY: u64 = 0x20_0000;
const FUSE_INIT: u32 = 26;

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("husk-fs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_err(bin: &std::path::Path, dir: &std::path::Path) -> FsError {
    match Backend::start(bin, dir, false) {
        Ok(_) => panic!("{} on {} started", bin.display(), dir.display()),
        Err(e) => e,
    }
}

fn start(dir: &Dir) -> Backend {
    let bin = virtiofsd_path();
    assert!(
        bin.is_file(),
        "{} missing: apt-get install qemu-system-common",
        bin.display()
    );
    Backend::start(&bin, &dir.0, false).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A FUSE request header at `REQ` (+ `body` after it).
fn write_request(mem: &GuestMem, opcode: u32, unique: u64, body: &[u8]) -> u32 {
    let len = 40 + body.len() as u32;
    let mut h = [0u8; 40];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&opcode.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h[16..24].copy_from_slice(&1u64.to_le_bytes()); // nodeid: the root
    mem.write_slice(&h, GuestAddress(REQ)).unwrap();
    mem.write_slice(body, GuestAddress(REQ + 40)).unwrap();
    len
}

/// FUSE_INIT, protocol 7.31 (the 16-byte fuse_init_in).
fn init_request(mem: &GuestMem, unique: u64) -> Vec<RawDescriptor> {
    let mut body = [0u8; 16];
    body[0..4].copy_from_slice(&7u32.to_le_bytes());
    body[4..8].copy_from_slice(&31u32.to_le_bytes());
    body[8..12].copy_from_slice(&(128u32 << 10).to_le_bytes());
    let len = write_request(mem, FUSE_INIT, unique, &body);
    vec![desc(REQ, len, NEXT, 1), desc(REPLY, 256, WRITE, 0)]
}

/// (len, error, unique) of the reply at `REPLY`.
fn reply(mem: &GuestMem) -> (u32, i32, u64) {
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(REPLY)).unwrap();
    (
        u32::from_le_bytes(b[0..4].try_into().unwrap()),
        i32::from_le_bytes(b[4..8].try_into().unwrap()),
        u64::from_le_bytes(b[8..16].try_into().unwrap()),
    )
}

/// Waits (bounded) until `fd` has one of `events`; returns what it had.
fn wait_fd(fd: i32, events: i16) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack.
    let n = unsafe { libc::poll(&mut p, 1, 10_000) };
    assert_eq!(n, 1, "no event within 10 s");
    p.revents
}

/// Relays the backend's completions (as the event loop does) until the
/// request queue's used index reaches `n`; bounded.
fn wait_used(dev: &mut Fs, q: &MockSplitQueue<'_, GuestMem>, n: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while q.used().idx().load() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no completion within 10 s"
        );
        // libvhost-user also signals once when it gets the call fd.
        wait_fd(dev.calls[1].as_raw_fd(), libc::POLLIN);
        dev.relay_call(1);
    }
}

struct Rig {
    mem: GuestMem,
    dev: Fs,
    irq_evt: EventFd,
    failed: Arc<AtomicBool>,
}

impl Rig {
    fn new(dir: &Dir) -> Rig {
        Rig {
            mem: memory::create_shared(64).unwrap(),
            dev: Fs::new("share", start(dir)).unwrap(),
            irq_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn activate(
        &mut self,
        hiprio: &MockSplitQueue<'_, GuestMem>,
        req: &MockSplitQueue<'_, GuestMem>,
    ) {
        let queues: Vec<Queue> = vec![hiprio.create_queue().unwrap(), req.create_queue().unwrap()];
        let irq: Arc<dyn VirtioInterrupt> =
            Arc::new(IrqfdInterrupt::new(self.irq_evt.try_clone().unwrap()));
        self.dev
            .activate(ActivateContext {
                mem: self.mem.clone(),
                queues,
                interrupt: irq.clone(),
                acked_features: self.dev.avail_features(),
                failure: DeviceFailure::new(self.failed.clone(), irq),
            })
            .unwrap();
        // What the event loop does on the state eventfd.
        self.dev.apply_state();
    }
}

#[test]
fn config_space_has_the_tag_and_one_request_queue() {
    let dir = Dir::new("cfg");
    let dev = Fs::new("my-tag", start(&dir)).unwrap();
    let mut cfg = [0u8; TAG_LEN + 4];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], b"my-tag");
    assert!(cfg[6..TAG_LEN].iter().all(|&b| b == 0));
    assert_eq!(u32::from_le_bytes(cfg[TAG_LEN..].try_into().unwrap()), 1);
    assert_eq!(dev.device_type(), 26);
    assert_ne!(
        dev.avail_features() & (1 << 32),
        0,
        "VERSION_1 from the backend"
    );
    assert_eq!(
        dev.avail_features() & (1 << 30),
        0,
        "the vhost-user bit is not the guest's"
    );
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    for bad in ["", "has space", &"x".repeat(TAG_LEN + 1)] {
        assert!(
            matches!(Fs::new(bad, start(&dir)), Err(FsError::Tag(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn a_fuse_request_goes_through_virtiofsd_and_fails_with_eio_once_it_is_killed() {
    let dir = Dir::new("rings");
    let mut r = Rig::new(&dir);
    let pid = r.dev.backend_pid().expect("husk started virtiofsd") as i32;
    let mem = r.mem.clone();
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x40_0000), QUEUE_SIZE);
    let req = MockSplitQueue::create(&mem, GuestAddress(0x50_0000), QUEUE_SIZE);
    req.add_desc_chains(&init_request(&mem, 7), 0).unwrap();
    r.activate(&hiprio, &req);
    // The guest's notification: the backend owns the kick eventfd now.
    r.dev.core.queue_events()[1].write(1).unwrap();
    wait_used(&mut r.dev, &req, 1);
    // The completion's signal reaches the driver. virtiofsd may have
    // updated the used ring before wait_used looked and signal just after:
    // relay it then, as the event loop would.
    let signalled = loop {
        match r.irq_evt.read() {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_fd(r.dev.calls[1].as_raw_fd(), libc::POLLIN);
                r.dev.relay_call(1);
            }
            Err(e) => panic!("irq eventfd: {e}"),
        }
    };
    assert!(signalled >= 1, "the completion reached the driver");
    let (len, error, unique) = reply(&mem);
    assert_eq!((error, unique), (0, 7), "FUSE_INIT answered by virtiofsd");
    assert!(len as usize > OUT_HEADER_LEN, "with a fuse_init_out");

    // The backend dies: its socket hangs up, husk answers from now on.
    // SAFETY: signalling the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let revents = wait_fd(r.dev.backend.as_ref().unwrap().socket_fd(), libc::POLLIN);
    let set = if revents & libc::POLLHUP != 0 {
        EventSet::HANG_UP
    } else {
        EventSet::IN
    };
    r.dev.on_socket(set);
    assert!(r.dev.backend.is_none());
    assert!(r.dev.counters().backend_lost);
    assert!(
        r.failed.load(Ordering::SeqCst),
        "the device reports the failure"
    );
    mem.write_slice(&[0u8; 16], GuestAddress(REPLY)).unwrap();
    req.add_desc_chains(&init_request(&mem, 8), 2).unwrap();
    r.dev.serve_without_backend(1);
    assert_eq!(req.used().idx().load(), 2);
    assert_eq!(reply(&mem), (OUT_HEADER_LEN as u32, -libc::EIO, 8));
    assert_eq!(r.dev.counters().failed_requests, 1);
}

#[test]
fn reset_gives_the_rings_back_and_a_new_driver_gets_them_again() {
    let dir = Dir::new("reset");
    let mut r = Rig::new(&dir);
    let mem = r.mem.clone();
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x40_0000), QUEUE_SIZE);
    let req = MockSplitQueue::create(&mem, GuestAddress(0x50_0000), QUEUE_SIZE);
    r.activate(&hiprio, &req);
    r.dev.reset();
    r.dev.apply_state();
    assert!(r.dev.backend.is_some(), "GET_VRING_BASE answered");
    let req = MockSplitQueue::create(&mem, GuestAddress(0x60_0000), QUEUE_SIZE);
    req.add_desc_chains(&init_request(&mem, 9), 0).unwrap();
    r.activate(&hiprio, &req);
    r.dev.core.queue_events()[1].write(1).unwrap();
    wait_used(&mut r.dev, &req, 1);
    assert_eq!(reply(&mem).1, 0);
    assert_eq!(reply(&mem).2, 9);
}

#[test]
fn a_backend_that_cannot_start_is_one_clear_error_and_leaves_nothing() {
    let dir = Dir::new("bad");
    let before: Vec<_> = std::fs::read_dir("/run")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("husk-fs-"))
        .collect();
    let bin = virtiofsd_path();
    let e = start_err(&bin, &dir.0.join("missing"));
    assert!(matches!(e, FsError::Dir(..)), "{e}");
    let file = dir.0.join("file");
    std::fs::write(&file, "x").unwrap();
    let e = start_err(&bin, &file);
    assert!(e.to_string().contains("not a directory"), "{e}");
    let e = start_err(std::path::Path::new("/nonexistent/virtiofsd"), &dir.0);
    assert!(matches!(e, FsError::Spawn(..)), "{e}");
    // A "backend" that exits at once: the handshake says so.
    let e = start_err(std::path::Path::new("/bin/false"), &dir.0);
    assert!(e.to_string().contains("exited"), "{e}");
    let after: Vec<_> = std::fs::read_dir("/run")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("husk-fs-"))
        .collect();
    assert_eq!(before.len(), after.len(), "no socket directory left");
}

#[test]
fn dropping_the_device_stops_virtiofsd() {
    let dir = Dir::new("drop");
    let dev = Fs::new("t", start(&dir)).unwrap();
    let pid = dev.backend_pid().unwrap();
    drop(dev);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
    assert!(stat.is_err(), "virtiofsd {pid} still exists: {stat:?}");
}

#[test]
fn virtiofsd_gets_no_fd_of_the_vmm_but_its_socket() {
    // Opened without close-on-exec, as the VMM's eventfds are.
    let dir = Dir::new("fds");
    let marker = dir.0.join("held-open");
    std::fs::write(&marker, b"x").unwrap();
    let path = std::ffi::CString::new(marker.to_str().unwrap()).unwrap();
    // SAFETY: open(2) of a valid C string; the fd is closed below.
    let held = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    assert!(held > 2);
    let backend = start(&dir);
    // start() returns once virtiofsd answered: it has exec'd.
    let pid = backend.pid().unwrap();
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(held) };
    assert!(
        !fds.iter().any(|l| l == marker.to_str().unwrap()),
        "virtiofsd {pid} holds {}: {fds:?}",
        marker.display()
    );
    assert!(fds.iter().any(|l| l.starts_with("socket:")), "{fds:?}");
}

fn chain_of(segments: &[(u64, u32, bool)]) -> Chain {
    Chain {
        segments: segments
            .iter()
            .map(|&(a, l, w)| Segment {
                addr: GuestAddress(a),
                len: l,
                writable: w,
            })
            .collect(),
        error: None,
        last: None,
    }
}

#[test]
fn error_replies_follow_the_header_and_survive_hostile_chains() {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    write_request(&mem, 15, 0xabcd, &[]);
    // Header split over two buffers, reply split too.
    let c = chain_of(&[
        (REQ, 10, false),
        (REQ + 10, 30, false),
        (REPLY, 8, true),
        (REPLY + 8, 8, true),
    ]);
    assert_eq!(parse(&mem, &c).unwrap().unique, 0xabcd);
    assert_eq!(answer_error(&mem, &c, libc::EIO), OUT_HEADER_LEN as u32);
    assert_eq!(reply(&mem), (16, -libc::EIO, 0xabcd));
    // Too short to hold a header, or no room for the reply: returned empty.
    assert_eq!(
        answer_error(&mem, &chain_of(&[(REQ, 39, false), (REPLY, 16, true)]), 5),
        0
    );
    assert_eq!(
        answer_error(&mem, &chain_of(&[(REQ, 40, false), (REPLY, 15, true)]), 5),
        0
    );
    assert_eq!(answer_error(&mem, &chain_of(&[]), 5), 0);
    // A broken chain is not parsed at all.
    let mut broken = chain_of(&[(REQ, 40, false), (REPLY, 16, true)]);
    broken.error = Some(crate::devices::virtio::ChainError::Truncated);
    assert_eq!(answer_error(&mem, &broken, 5), 0);
    // FORGET expects no reply.
    write_request(&mem, FUSE_FORGET, 1, &[0u8; 8]);
    mem.write_slice(&[0xee; 16], GuestAddress(REPLY)).unwrap();
    assert_eq!(
        answer_error(&mem, &chain_of(&[(REQ, 48, false), (REPLY, 16, true)]), 5),
        0
    );
    assert_eq!(reply(&mem).2, 0xeeee_eeee_eeee_eeee, "untouched");
}

#[test]
fn a_read_only_share_is_read_only_for_the_backend_submounts_included() {
    let dir = Dir::new("ro");
    let share = dir.0.join("share");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    let sub = share.join("sub");
    let csub = std::ffi::CString::new(sub.to_str().unwrap()).unwrap();
    // SAFETY: mounting a tmpfs on a directory this test made.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            csub.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    // A stand-in backend that tries to write where virtiofsd would.
    let script = dir.0.join("writer.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nfor f in '{0}/top' '{0}/sub/deep'; do\n  if touch \"$f\" 2>/dev/null; then echo \"wrote $f\"; exit 1; fi\ndone\nexit 0\n",
            share.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.0.join("s.sock")).unwrap();
    let mut d = Virtiofsd::spawn(&script, &share, true, &listener).unwrap();
    let st = d.exited(std::time::Duration::from_secs(10));
    // The same share read-write: both writes work.
    let mut rw = Virtiofsd::spawn(&script, &share, false, &listener).unwrap();
    let rw_st = rw.exited(std::time::Duration::from_secs(10));
    // SAFETY: unmounting what this test mounted.
    unsafe { libc::umount2(csub.as_ptr(), libc::MNT_DETACH) };
    assert!(
        st.expect("writer finished").success(),
        "a write got through the ro share"
    );
    assert!(
        !rw_st.expect("writer finished").success(),
        "rw share refused a write"
    );
    assert!(share.join("top").exists());
}
