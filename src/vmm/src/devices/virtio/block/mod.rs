//! virtio-blk over a raw image file.
//!
//! `request.rs` parses a descriptor chain into a request (pure, fuzzed),
//! `disk.rs` does the file I/O, `device.rs` is the virtio device,
//! `event_handler.rs` its event-loop glue.

mod device;
pub mod disk;
mod event_handler;
pub mod request;
#[cfg(test)]
mod tests;

pub use device::Block;
pub use disk::Disk;
pub use request::{Request, RequestError, RequestType};

/// Bytes in a virtio-blk sector, whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of `struct virtio_blk_outhdr` (type, reserved, sector).
pub const REQUEST_HEADER_LEN: usize = 16;
/// Length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (config `seg_max`); a request may use two
/// more descriptors, for the header and the status byte.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most descriptors accepted in one request chain.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Largest data segment (config `size_max`): with `SEG_MAX`, it bounds what
/// one request may ask of the disk, which the event loop does in one go.
pub const SIZE_MAX: u32 = 64 << 10;
/// Most data bytes in one read or write request (`SEG_MAX` x `SIZE_MAX`,
/// ~16 MiB; Linux sends at most `max_sectors_kb`, 1280 KiB by default).
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

/// Feature bits (virtio 1.x, 5.2.3).
pub mod features {
    /// `size_max` in config space is valid.
    pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
    /// `seg_max` in config space is valid.
    pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
    /// The disk is read-only.
    pub const VIRTIO_BLK_F_RO: u32 = 5;
    /// The device handles FLUSH.
    pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
}

/// Request types (`virtio_blk_outhdr.type`).
pub mod request_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Read the device ID string.
    pub const GET_ID: u32 = 8;
}

/// Request status bytes.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

/// Errors creating a block device. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk {0}: {1}")]
    Open(String, #[source] std::io::Error),
    /// Another process holds a conflicting lock on the image.
    #[error("disk {0} is in use by another process (locked)")]
    Locked(String),
    /// The image size could not be read.
    #[error("cannot size disk {0}: {1}")]
    Size(String, #[source] std::io::Error),
    /// O_DIRECT does not work on this file with 512-byte sectors.
    #[error("disk {0}: direct I/O with 512-byte sectors is not supported there: {1}")]
    Direct(String, #[source] std::io::Error),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}
