//! The virtio-blk device: config space, features, and request execution
//! on the event-loop thread.

use vm_memory::Bytes;

use super::disk::{Disk, DiskError};
use super::features::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use super::request::{self, Request, RequestType};
use super::{status, BlockError, ID_BYTES, MAX_DESCRIPTORS, QUEUE_SIZE, SEG_MAX, SIZE_MAX};
use crate::devices::virtio::device::{
    read_config_bytes, ActivateContext, ActivateError, DeviceCore, VirtioDevice,
};
use crate::devices::virtio::features::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::devices::virtio::queue::{self, collect_chain, QueueError};
use crate::devices::virtio::{device_type, feature, GuestMem};

/// Chains handled per wake-up before yielding to the rest of the event loop.
const BUDGET: usize = 256;
/// Data bytes read or written per wake-up before yielding (one request
/// goes through whole, and carries at most `MAX_REQUEST_BYTES`).
const BYTE_BUDGET: u64 = 16 << 20;
/// Bytes of config space husk fills: capacity (8), size_max (4), seg_max (4).
const CONFIG_LEN: usize = 16;

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockCounters {
    /// Requests answered OK.
    pub ok: u64,
    /// Requests answered IOERR or UNSUPP.
    pub failed: u64,
    /// Chains that could not even carry a status (returned with length 0).
    pub dropped: u64,
}

type Active = crate::devices::virtio::device::Active<1>;

/// A virtio-blk device over a raw image.
pub struct Block {
    disk: Disk,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_LEN],
    pub(super) core: DeviceCore<1>,
    counters: BlockCounters,
}

impl Block {
    /// A device over `disk`, answering GET_ID with `id`.
    pub fn new(disk: Disk, id: &str) -> Result<Self, BlockError> {
        let mut avail_features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_FLUSH);
        if disk.read_only() {
            avail_features |= feature(VIRTIO_BLK_F_RO);
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.capacity().to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Self {
            disk,
            id: request::id_bytes(id),
            config,
            core: DeviceCore::new("virtio-blk", avail_features, QUEUE_SIZE)
                .map_err(BlockError::EventFd)?,
            counters: BlockCounters::default(),
        })
    }

    /// Request counters so far.
    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    /// Serves every available request (up to a budget; the rest is picked
    /// up on the next wake-up). A broken ring puts the device in
    /// DEVICE_NEEDS_RESET.
    pub fn process_queue(&mut self) {
        let Some(active) = self.core.active.as_mut() else {
            return;
        };
        if active.failure.failed() {
            return;
        }
        let mut ctx = Exec {
            disk: &mut self.disk,
            id: &self.id,
            counters: &mut self.counters,
            bytes: 0,
        };
        match drain(active, &mut ctx) {
            Ok(true) => {
                // Budget spent: come back after the other event sources.
                self.core.requeue(0);
            }
            Ok(false) => {}
            Err(e) => active.failure.fail(&format!("virtio-blk queue: {e}")),
        }
    }
}

/// The parts of the device a request needs.
struct Exec<'a> {
    disk: &'a mut Disk,
    id: &'a [u8; ID_BYTES],
    counters: &'a mut BlockCounters,
    /// Data bytes read or written in this wake-up.
    bytes: u64,
}

/// Returns true when a budget (chains or bytes) ran out, with requests
/// perhaps left.
fn drain(a: &mut Active, ctx: &mut Exec<'_>) -> Result<bool, QueueError> {
    let mem = &a.mem;
    let drained = queue::drain(
        &mut a.queues[0],
        mem,
        a.interrupt.as_ref(),
        BUDGET,
        |chain| {
            let len = handle_chain(ctx, mem, collect_chain(chain, mem, MAX_DESCRIPTORS));
            queue::Served {
                len,
                stop: ctx.bytes >= BYTE_BUDGET,
            }
        },
    )?;
    Ok(drained != queue::Drained::Empty)
}

/// Handles one chain; returns the used length (bytes written to the guest).
fn handle_chain(ctx: &mut Exec<'_>, mem: &GuestMem, chain: queue::Chain) -> u32 {
    let status_addr = chain.last.as_ref().and_then(request::status_address);
    let Some(status_addr) = status_addr else {
        tracing::debug!("virtio-blk: request without a status byte dropped");
        ctx.counters.dropped += 1;
        return 0;
    };
    let (status, written) = match chain.error {
        Some(e) => {
            tracing::debug!("virtio-blk: bad descriptor chain: {e}");
            (status::IOERR, 0)
        }
        None => match request::parse(&chain.segments, mem) {
            Ok(req) => {
                if matches!(req.request_type, RequestType::In | RequestType::Out) {
                    ctx.bytes += req.data_len();
                }
                execute(ctx, mem, &req)
            }
            Err(e) => {
                tracing::debug!("virtio-blk: bad request: {e}");
                (status::IOERR, 0)
            }
        },
    };
    if status == status::OK {
        ctx.counters.ok += 1;
    } else {
        ctx.counters.failed += 1;
    }
    if mem.write_obj(status, status_addr).is_err() {
        // Checked to lie in guest memory when the chain was collected.
        ctx.counters.dropped += 1;
        return 0;
    }
    written.saturating_add(1)
}

/// Runs a parsed request: (status, data bytes written to the guest).
fn execute(ctx: &mut Exec<'_>, mem: &GuestMem, req: &Request) -> (u8, u32) {
    let result = match req.request_type {
        RequestType::In => ctx
            .disk
            .read(mem, req.sector, &req.data)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        RequestType::Out => ctx.disk.write(mem, req.sector, &req.data).map(|()| 0),
        RequestType::Flush => ctx.disk.flush().map(|()| 0),
        RequestType::GetId => write_id(mem, ctx.id, req),
        RequestType::Unsupported(t) => {
            tracing::debug!("virtio-blk: unsupported request type {t}");
            return (status::UNSUPP, 0);
        }
    };
    match result {
        Ok(n) => (status::OK, n),
        Err(e) => {
            match &e {
                DiskError::Io(_) => tracing::warn!(
                    "virtio-blk {}: {:?} at sector {}: {e}",
                    ctx.disk.path(),
                    req.request_type,
                    req.sector
                ),
                _ => tracing::debug!("virtio-blk: {:?}: {e}", req.request_type),
            }
            (status::IOERR, 0)
        }
    }
}

fn write_id(mem: &GuestMem, id: &[u8; ID_BYTES], req: &Request) -> Result<u32, DiskError> {
    let mut done = 0usize;
    for s in &req.data {
        if done == id.len() {
            break;
        }
        let n = (id.len() - done).min(s.len as usize);
        mem.write_slice(&id[done..done + n], s.addr)?;
        done += n;
    }
    Ok(done as u32)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.core.avail_features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.core.queue_max_sizes()
    }

    fn queue_events(&self) -> &[vmm_sys_util::eventfd::EventFd] {
        self.core.queue_events()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.core.activate(ctx)
    }

    fn is_activated(&self) -> bool {
        self.core.is_activated()
    }

    fn reset(&mut self) {
        self.core.reset();
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.core.queue_positions()
    }
}
