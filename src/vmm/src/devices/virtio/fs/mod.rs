//! virtio-fs as a vhost-user frontend: the guest's FUSE requests go
//! straight from the rings to a virtiofsd process, which maps guest memory
//! from the memfd husk backs it with. husk only relays the backend's
//! completions as interrupts (virtio-mmio needs the InterruptStatus bit).
//!
//! `backend.rs` starts virtiofsd and speaks vhost-user to it (the rust-vmm
//! `vhost` crate's frontend), `request.rs` answers requests with an error
//! once the backend is gone, `device.rs` is the virtio device,
//! `event_handler.rs` its event-loop glue.

mod backend;
mod device;
mod event_handler;
pub mod request;
#[cfg(test)]
mod tests;

pub use backend::{Backend, Virtiofsd, DEFAULT_VIRTIOFSD};
pub use device::{Fs, FsCounters};

/// Bytes of the `tag` field in config space (the guest mounts by tag).
pub const TAG_LEN: usize = 36;
/// Whether `tag` fits the config space and the guest's mount: 1 to
/// `TAG_LEN` printable ASCII bytes, no spaces.
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() <= TAG_LEN && tag.bytes().all(|b| b.is_ascii_graphic())
}

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// The high-priority queue (FORGET, INTERRUPT) and one request queue.
pub const NUM_QUEUES: usize = 2;
/// Most descriptors accepted in one chain while answering without a backend.
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// Errors setting up a virtio-fs device or talking to its backend.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The shared directory is unusable.
    #[error("shared directory {0}: {1}")]
    Dir(String, String),
    /// The tag is empty, too long or not printable.
    #[error("invalid virtio-fs tag {0:?}: 1 to 36 printable bytes")]
    Tag(String),
    /// virtiofsd could not be started.
    #[error("cannot start {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    /// A host resource (socket, eventfd, directory) failed.
    #[error("virtio-fs: {0}: {1}")]
    Host(&'static str, #[source] std::io::Error),
    /// The backend broke the vhost-user protocol or went away.
    #[error("virtio-fs backend: {0}: {1}")]
    Protocol(&'static str, String),
    /// The backend lacks a feature husk needs.
    #[error("virtio-fs backend does not offer {0}")]
    Feature(&'static str),
    /// A queue lies outside guest memory or guest memory is not shareable.
    #[error("virtio-fs: {0}")]
    Memory(String),
}
