//! Emulated devices.

pub mod fill;
pub mod legacy;
pub mod virtio;
