//! Guest images: the initramfs (an uncompressed newc cpio archive) husk
//! generates for its guests, read-only ext4 images of directory trees, and
//! OCI images (pull, store, layers, disks).

pub mod cpio;
pub mod ext4;
pub mod initramfs;
pub mod oci;
