//! virtio-mmio register sequences: a virtio-blk device behind the MMIO
//! transport, driven by reads and writes of any width at any offset
//! (features, status transitions, queue setup, resets, config space,
//! notifications) from the input (a count, then 7 bytes each), with guest
//! memory from the rest of it.
//! After each queue notification the device serves the queue as its event
//! handler would. Nothing may panic or hang, whatever the order.
#![no_main]

// Only its guest memory and disk image: the queues here are the driver's,
// set up through the registers.
#[allow(dead_code)]
mod common;

use std::sync::{Arc, Mutex};

use husk_vmm::devices::virtio::block::{Block, Disk};
use husk_vmm::devices::virtio::mmio::regs;
use husk_vmm::devices::virtio::{IrqfdInterrupt, MmioTransport, VirtioInterrupt};
use husk_vmm::vstate::bus::BusDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

/// Bytes per register access in the input: kind, offset (2), value (4).
const OP: usize = 7;

fuzz_target!(|data: &[u8]| {
    // The first byte counts the accesses; guest memory follows them.
    let Some((&n, data)) = data.split_first() else {
        return;
    };
    let ops_len = (data.len() / OP).min(usize::from(n)) * OP;
    let (ops, rest) = data.split_at(ops_len);
    let mem = common::memory(rest);
    let disk = Disk::open(&common::disk_image(), false, false).unwrap();
    let blk = Arc::new(Mutex::new(Block::new(disk, "fuzz").unwrap()));
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(IrqfdInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let mut t = MmioTransport::new(blk.clone(), mem, irq).unwrap();
    for op in ops.chunks_exact(OP) {
        let write = op[0] & 1 != 0;
        let width = 1usize << ((op[0] >> 1) & 3);
        // Registers, then a little config space past them.
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % (regs::CONFIG + 0x40);
        let value = [op[3], op[4], op[5], op[6], op[3], op[4], op[5], op[6]];
        if write {
            t.write(offset, &value[..width]);
            if offset == regs::QUEUE_NOTIFY {
                blk.lock().unwrap().process_queue();
            }
        } else {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..width]);
        }
    }
});
