//! Legacy PC devices on the port I/O bus, as adapters over vm-superio.

pub mod console_log;
pub mod console_queue;
mod i8042;
mod serial;

pub use console_log::ConsoleLog;
pub use i8042::{ResetTrigger, I8042};
#[cfg(test)]
pub(crate) use serial::TestSink;
pub use serial::{EventFdTrigger, SerialDevice, SerialInputEvents, SerialSnapshot};
