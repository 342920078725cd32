//! Queue helpers shared by the devices: popping chains with the errors
//! kept (virtio-queue's own pop swallows them), flattening a chain into
//! checked segments, used-ring notification, and the budgeted drain loop.

use std::ops::Deref;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::interrupt::{InterruptKind, VirtioInterrupt};
use super::GuestMem;

/// A queue-level failure: the driver broke the ring itself, so the device
/// goes to DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring could not be read or its index is impossible.
    #[error("available ring: {0}")]
    Avail(#[source] virtio_queue::Error),
    /// A used element could not be written.
    #[error("used ring: {0}")]
    Used(#[source] virtio_queue::Error),
    /// The interrupt could not be raised.
    #[error("interrupt: {0}")]
    Interrupt(#[source] std::io::Error),
    /// The available index said chains had arrived, then none were there.
    #[error("available ring: its index went back (rewritten, or the rings overlap)")]
    AvailWentBack,
}

/// One buffer of a descriptor chain, already checked to lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// Why a descriptor chain was refused. Each fails only its own request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// No descriptor could be read.
    #[error("empty descriptor chain")]
    Empty,
    /// More descriptors than the device accepts.
    #[error("descriptor chain longer than {0} descriptors")]
    TooLong(usize),
    /// The chain stopped while its last descriptor still said NEXT: a
    /// loop, a next index past the table, or an unreadable descriptor.
    #[error("descriptor chain is cut short (loop, bad next index or unreadable descriptor)")]
    Truncated,
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
}

/// Pops the next available chain. `Ok(None)`: the ring is empty.
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMem,
) -> Result<Option<DescriptorChain<&'m GuestMem>>, QueueError> {
    Ok(queue.iter(mem).map_err(QueueError::Avail)?.next())
}

/// A descriptor chain flattened into segments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// The chain's buffers in order; complete only when `error` is None.
    pub segments: Vec<Segment>,
    /// The first problem found, if any.
    pub error: Option<ChainError>,
    /// The chain's final buffer, when it lies in guest memory and the chain
    /// was not cut short: where a device may still report a status.
    pub last: Option<Segment>,
}

/// Flattens `chain` into at most `max` segments, each checked to lie in
/// `mem`. Past a buffer outside guest memory the walk goes on, so that the
/// final buffer (where a device reports a status) is still known; it
/// never reads more than `max + 1` descriptors: a chain longer than that
/// is cut there, with no final buffer. (An indirect table can hold 65535
/// descriptors: walked to their end, the chains of one wake-up could make
/// the device read millions.)
pub fn collect_chain<M>(chain: DescriptorChain<M>, mem: &GuestMem, max: usize) -> Chain
where
    M: Deref<Target = GuestMem>,
{
    let mut out = Chain::default();
    let mut last_has_next = false;
    let mut count = 0usize;
    let mut last_ok = false;
    for desc in chain {
        count += 1;
        if count > max {
            out.error = Some(ChainError::TooLong(max));
            out.last = None;
            return out;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        };
        last_has_next = desc.has_next();
        last_ok = mem.check_range(desc.addr(), desc.len() as usize);
        out.last = Some(seg);
        if out.error.is_some() {
            continue;
        }
        if !last_ok {
            out.error = Some(ChainError::OutOfMemory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        } else {
            out.segments.push(seg);
        }
    }
    if count == 0 {
        out.error = Some(ChainError::Empty);
    } else if last_has_next {
        out.error = Some(ChainError::Truncated);
        out.last = None;
    } else if !last_ok {
        out.last = None;
    }
    out
}

/// Puts `head` on the used ring with `len` bytes written. A head the
/// driver made up (outside the queue) is refused here: virtio-queue would
/// refuse it too, but log an error line each time, which would let a guest
/// write to the host's log as fast as it can notify.
pub fn add_used(queue: &mut Queue, mem: &GuestMem, head: u16, len: u32) -> Result<(), QueueError> {
    if head >= queue.size() {
        return Err(QueueError::Used(
            virtio_queue::Error::InvalidDescriptorIndex,
        ));
    }
    queue.add_used(mem, head, len).map_err(QueueError::Used)
}

/// Raises the used-buffer interrupt if the driver asked to hear about the
/// buffers added since the last call.
pub fn notify_used(
    queue: &mut Queue,
    mem: &GuestMem,
    irq: &dyn VirtioInterrupt,
) -> Result<(), QueueError> {
    if queue.needs_notification(mem).map_err(QueueError::Used)? {
        irq.trigger(InterruptKind::UsedBuffer)
            .map_err(QueueError::Interrupt)?;
    }
    Ok(())
}

/// Re-enables driver notifications; true if chains arrived meanwhile (the
/// caller must then keep going, or it would miss them).
pub fn enable_notification(queue: &mut Queue, mem: &GuestMem) -> Result<bool, QueueError> {
    queue.enable_notification(mem).map_err(QueueError::Avail)
}

/// A device loop's pops from the available ring and its re-checks once
/// the ring is empty: a ring whose re-check promised chains and whose next
/// pop then had none is broken, and looking again could go on forever (a
/// driver moving its index back, or an available ring laid over the used
/// ring so that the device's own flag writes move the index).
#[derive(Debug, Default)]
pub struct AvailWatch {
    /// The last re-check said chains had arrived; no pop since.
    promised: bool,
}

impl AvailWatch {
    /// [`pop_chain`].
    pub fn pop<'m>(
        &mut self,
        queue: &mut Queue,
        mem: &'m GuestMem,
    ) -> Result<Option<DescriptorChain<&'m GuestMem>>, QueueError> {
        let chain = pop_chain(queue, mem)?;
        if chain.is_some() {
            self.promised = false;
        }
        Ok(chain)
    }

    /// After [`AvailWatch::pop`] found the ring empty: re-enables driver
    /// notifications and says whether to look again (chains arrived
    /// meanwhile), or fails if the last re-check had said so already.
    pub fn recheck(&mut self, queue: &mut Queue, mem: &GuestMem) -> Result<bool, QueueError> {
        if self.promised {
            return Err(QueueError::AvailWentBack);
        }
        self.promised = enable_notification(queue, mem)?;
        Ok(self.promised)
    }
}

/// Turns driver notifications off while the device drains the ring.
pub fn disable_notification(queue: &mut Queue, mem: &GuestMem) -> Result<(), QueueError> {
    queue.disable_notification(mem).map_err(QueueError::Avail)
}

/// What a [`drain`] handler did with one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Bytes the device wrote into the chain (the used length).
    pub len: u32,
    /// Stop draining after this chain; the device resumes by other means.
    pub stop: bool,
}

impl Served {
    /// Served, `len` bytes written, keep going.
    pub fn written(len: u32) -> Self {
        Self { len, stop: false }
    }
}

/// How a [`drain`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The ring is empty and driver notifications are back on.
    Empty,
    /// `budget` chains were served; more may be waiting.
    BudgetSpent,
    /// The handler asked to stop.
    Stopped,
}

/// Serves available chains with `handle`, at most `budget` of them, the way
/// every device drains a queue: notifications off while draining, each
/// chain put on the used ring with the handler's length, notifications
/// re-enabled with a re-check for chains that raced in, and one used-buffer
/// interrupt at the end if anything was used.
pub fn drain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMem,
    irq: &dyn VirtioInterrupt,
    budget: usize,
    mut handle: impl FnMut(DescriptorChain<&'m GuestMem>) -> Served,
) -> Result<Drained, QueueError> {
    let mut left = budget;
    let mut used = false;
    let mut avail = AvailWatch::default();
    let outcome = 'drain: loop {
        disable_notification(queue, mem)?;
        while let Some(chain) = avail.pop(queue, mem)? {
            let head = chain.head_index();
            let served = handle(chain);
            add_used(queue, mem, head, served.len)?;
            used = true;
            left -= 1;
            if served.stop {
                break 'drain Drained::Stopped;
            }
            if left == 0 {
                break 'drain Drained::BudgetSpent;
            }
        }
        if !avail.recheck(queue, mem)? {
            break Drained::Empty;
        }
    };
    if used {
        notify_used(queue, mem, irq)?;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;

    use super::*;

    #[test]
    fn a_ring_whose_index_goes_back_fails_the_drain_instead_of_spinning() {
        // The available ring laid over the used ring (found by the
        // mmio_transport fuzz target): avail.idx is used.flags, which the
        // device itself toggles when it turns notifications off and on, so
        // the index says "one more chain" after every re-enable and "none"
        // after every disable. The drain used to go round forever.
        use vm_memory::Bytes;
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(0)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(0x1fe)).unwrap();
        q.try_set_used_ring_address(GuestAddress(0x200)).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(&mem));
        mem.write_obj(0x1000u64, GuestAddress(0)).unwrap();
        mem.write_obj(16u32, GuestAddress(8)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x200)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let irq = super::super::IrqfdInterrupt::new(
                vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            );
            let mut served = 0;
            let r = drain(&mut q, &mem, &irq, 64, |_| {
                served += 1;
                Served::written(0)
            });
            let _ = tx.send((r.map_err(|e| e.to_string()), served));
        });
        let (r, served) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the drain did not end");
        assert_eq!(served, 1);
        assert_eq!(
            r.unwrap_err(),
            "available ring: its index went back (rewritten, or the rings overlap)"
        );
    }

    #[test]
    fn a_made_up_head_is_refused_and_the_used_ring_untouched() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let m = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = m.create_queue().unwrap();
        let e = add_used(&mut q, &mem, 16, 0).unwrap_err();
        assert!(matches!(
            e,
            QueueError::Used(virtio_queue::Error::InvalidDescriptorIndex)
        ));
        assert_eq!(m.used().idx().load(), 0);
        add_used(&mut q, &mem, 15, 4).unwrap();
        assert_eq!(m.used().idx().load(), 1);
    }
}
