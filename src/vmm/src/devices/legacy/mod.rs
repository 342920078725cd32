//! Legacy PC devices on the port I/O bus, as adapters over vm-superio.

mod i8042;
mod serial;

pub use i8042::{ResetTrigger, I8042};
pub use serial::{EventFdTrigger, SerialDevice, SerialInputEvents};
