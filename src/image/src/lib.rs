//! Guest images. For now: the initramfs (an uncompressed newc cpio archive)
//! that husk generates for its guests.

pub mod cpio;
pub mod initramfs;
