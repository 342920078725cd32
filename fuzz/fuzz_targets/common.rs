//! Shared by the targets: guest memory filled from the fuzz input, queues
//! whose rings live in that memory, device activation, and a disk image.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use husk_vmm::devices::virtio::{
    ActivateContext, DeviceFailure, IrqfdInterrupt, Segment, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory size: small, so indirect tables and buffers often hit its end.
pub const MEM_SIZE: usize = 0x1_0000;

/// Guest memory whose first bytes are `data`.
pub fn memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    mem
}

/// Up to 8 buffers described by 7-byte records of `data` (address,
/// 24-bit length, writable bit), those that lie in guest memory.
#[allow(dead_code)] // net_frame has no chains of buffers
pub fn segments(data: &[u8]) -> Vec<Segment> {
    data.chunks_exact(7)
        .take(8)
        .map(|c| Segment {
            addr: GuestAddress(u64::from(u16::from_le_bytes([c[0], c[1]]))),
            len: u32::from(u16::from_le_bytes([c[2], c[3]])) | (u32::from(c[4]) << 16),
            writable: c[5] & 1 != 0,
        })
        .filter(|s| u64::from(s.len) + s.addr.0 <= MEM_SIZE as u64)
        .collect()
}

/// Where a queue of `size` at `base` keeps its rings: the descriptor
/// table at `base`, then the available ring, then the used ring.
pub fn rings(base: u64, size: u16) -> (u64, u64, u64) {
    let avail = base + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    (base, avail, used)
}

/// A ready queue of `size` with its rings at `base` (see `rings`).
pub fn queue(base: u64, size: u16, event_idx: bool) -> Queue {
    let (desc, avail, used) = rings(base, size);
    let mut q = Queue::new(size).unwrap();
    q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
}

/// Unless `raw` (then the input's own, usually impossible, index stays),
/// sets the available index of the queue of `size` at `base` to
/// `n % (size + 1)`, so that most runs reach the descriptor chains.
pub fn avail_idx(mem: &GuestMemoryMmap, base: u64, size: u16, n: u8, raw: bool) {
    if !raw {
        let idx = u16::from(n) % (size + 1);
        let (_, avail, _) = rings(base, size);
        mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }
}

/// Hands `queues` to `dev` as the transport would at DRIVER_OK.
pub fn activate(dev: &mut dyn VirtioDevice, mem: &GuestMemoryMmap, queues: Vec<Queue>) {
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(IrqfdInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let failure = DeviceFailure::new(Arc::new(AtomicBool::new(false)), irq.clone());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues,
        interrupt: irq,
        acked_features: dev.avail_features(),
        failure,
    })
    .unwrap();
}

/// A 64 KiB in-memory image (memfd) for a virtio-blk device, opened again
/// by path per run.
#[allow(dead_code)] // only the targets with a disk
pub fn disk_image() -> PathBuf {
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
