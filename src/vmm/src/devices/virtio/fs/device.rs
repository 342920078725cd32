//! The virtio-fs device: config space (tag, one request queue), the rings
//! handed to the backend at activation, the backend's completions relayed
//! as interrupts, and error replies once the backend is gone.

use std::os::fd::RawFd;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, Virtiofsd};
use super::{request, valid_tag, FsError, MAX_DESCRIPTORS, NUM_QUEUES, QUEUE_SIZE, TAG_LEN};
use crate::devices::virtio::device::{
    read_config_bytes, ActivateContext, ActivateError, DeviceCore, VirtioDevice,
};
use crate::devices::virtio::queue::{self, collect_chain, Served};
use crate::devices::virtio::{device_type, InterruptKind};

/// Requests answered per wake-up without a backend.
const BUDGET: usize = 256;
/// Config space: tag[36], le32 num_request_queues.
const CONFIG_LEN: usize = TAG_LEN + 4;

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FsCounters {
    /// Backend completions relayed to the driver.
    pub interrupts: u64,
    /// Requests husk answered with an error (no backend).
    pub failed_requests: u64,
    /// The backend went away.
    pub backend_lost: bool,
}

/// A virtio-fs device whose requests a vhost-user backend serves.
pub struct Fs {
    tag: String,
    config: [u8; CONFIG_LEN],
    pub(super) core: DeviceCore<NUM_QUEUES>,
    /// One per queue: the backend signals completions here.
    pub(super) calls: Vec<EventFd>,
    pub(super) backend: Option<Backend>,
    /// A lost backend, kept until the event loop stops watching its socket.
    pub(super) lost: Option<Backend>,
    /// The process behind a lost backend, reaped when the device is
    /// dropped: on the VM's teardown thread, not by the event loop, whose
    /// seccomp filter allows no wait4 or kill.
    pub(super) lost_daemon: Option<Virtiofsd>,
    /// The socket fd the event loop watches, if any.
    pub(super) socket_watched: Option<RawFd>,
    acked_features: u64,
    /// Whether the backend has the current driver's rings.
    rings_started: bool,
    counters: FsCounters,
}

impl Fs {
    /// A device the guest mounts as `tag`, served by `backend`.
    pub fn new(tag: &str, backend: Backend) -> Result<Self, FsError> {
        if !valid_tag(tag) {
            return Err(FsError::Tag(tag.to_string()));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
        let evt = || crate::sys::eventfd().map_err(|e| FsError::Host("eventfd", e));
        Ok(Self {
            tag: tag.to_string(),
            config,
            core: DeviceCore::new("virtio-fs", backend.device_features(), QUEUE_SIZE)
                .map_err(|e| FsError::Host("eventfd", e))?,
            calls: (0..NUM_QUEUES).map(|_| evt()).collect::<Result<_, _>>()?,
            backend: Some(backend),
            lost: None,
            lost_daemon: None,
            socket_watched: None,
            acked_features: 0,
            rings_started: false,
            counters: FsCounters::default(),
        })
    }

    /// The tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Counters so far.
    pub fn counters(&self) -> FsCounters {
        self.counters
    }

    /// The backend's pid, while it serves the device.
    pub fn backend_pid(&self) -> Option<u32> {
        self.backend.as_ref().and_then(Backend::pid)
    }

    /// Applies an activation or reset the vCPU thread announced: the
    /// backend gets the rings, or gives them back.
    pub(super) fn apply_state(&mut self) {
        let active = self.core.active.is_some();
        if active && !self.rings_started {
            self.rings_started = true;
            let r = match (self.backend.as_mut(), self.core.active.as_ref()) {
                (Some(b), Some(a)) => b.start_rings(
                    &a.mem,
                    &a.queues,
                    self.acked_features,
                    self.core.queue_events(),
                    &self.calls,
                ),
                _ => Ok(()),
            };
            if let Err(e) = r {
                self.lose_backend(&e.to_string());
            }
        } else if !active && self.rings_started {
            self.rings_started = false;
            let r = match self.backend.as_mut() {
                Some(b) => b.stop_rings(NUM_QUEUES),
                None => Ok(()),
            };
            if let Err(e) = r {
                self.lose_backend(&e.to_string());
            }
        }
        if self.backend.is_none() {
            for i in 0..NUM_QUEUES {
                self.serve_without_backend(i);
            }
        }
    }

    /// The backend is gone: requests still in its hands and every later
    /// one get EIO from husk, and the device reports the failure.
    pub(super) fn lose_backend(&mut self, why: &str) {
        let Some(b) = self.backend.take() else {
            return;
        };
        tracing::warn!(
            "virtio-fs {}: backend lost ({why}); requests now fail with EIO",
            self.tag
        );
        self.lost = Some(b);
        self.counters.backend_lost = true;
        if let Some(a) = self.core.active.as_mut() {
            // The backend published its completions up to used.idx; every
            // request after that is still unanswered.
            for q in a.queues.iter_mut() {
                let idx = a
                    .mem
                    .read_obj::<u16>(GuestAddress(q.used_ring().wrapping_add(2)))
                    .unwrap_or(0);
                q.set_next_avail(u16::from_le(idx));
                q.set_next_used(u16::from_le(idx));
            }
            a.failure.fail("virtio-fs backend lost");
        }
    }

    /// Answers queue `index`'s requests with EIO (no backend).
    pub(super) fn serve_without_backend(&mut self, index: usize) {
        if self.backend.is_some() {
            return;
        }
        let Some(a) = self.core.active.as_mut() else {
            return;
        };
        let mem = &a.mem;
        let mut answered = 0u64;
        let drained = queue::drain(
            &mut a.queues[index],
            mem,
            a.interrupt.as_ref(),
            BUDGET,
            |chain| {
                answered += 1;
                let chain = collect_chain(chain, mem, MAX_DESCRIPTORS);
                Served::written(request::answer_error(mem, &chain, libc::EIO))
            },
        );
        self.counters.failed_requests += answered;
        match drained {
            Ok(queue::Drained::BudgetSpent) => self.core.requeue(index),
            Ok(_) => {}
            Err(e) => a.failure.fail(&format!("virtio-fs queue {index}: {e}")),
        }
    }

    /// The backend completed requests on queue `index`.
    pub(super) fn relay_call(&mut self, index: usize) {
        let _ = self.calls[index].read();
        if let Some(a) = &self.core.active {
            self.counters.interrupts += 1;
            if let Err(e) = a.interrupt.trigger(InterruptKind::UsedBuffer) {
                tracing::warn!("virtio-fs {}: interrupt: {e}", self.tag);
            }
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn avail_features(&self) -> u64 {
        self.core.avail_features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.core.queue_max_sizes()
    }

    fn queue_events(&self) -> &[EventFd] {
        self.core.queue_events()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.acked_features = ctx.acked_features;
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
