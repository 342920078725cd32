//! Guest images: the initramfs (an uncompressed newc cpio archive) husk
//! generates for its guests, and read-only ext4 images of directory trees.

pub mod cpio;
pub mod ext4;
pub mod initramfs;
