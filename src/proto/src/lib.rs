#![doc = include_str!("../README.md")]

mod client;
pub mod default_seccomp;
mod frame;
mod messages;

#[cfg(test)]
mod tests;

pub use client::{check_exit, check_version, handshake, Ahead, Client, ProtoError};
pub use frame::{read_frame, read_frame_bytes, write_frame, FrameError, MAX_FRAME_SIZE};
pub use messages::*;
pub use oci_spec;

/// The protocol version this crate speaks. Bump it on any incompatible
/// change to a message.
pub const PROTOCOL_VERSION: u32 = 1;

/// vsock port of the agent's control listener.
pub const CONTROL_PORT: u32 = 1024;

/// vsock port of the agent's stdio listener (one connection per stream).
pub const STDIO_PORT: u32 = 1025;

impl Hello {
    /// A `Hello` for this protocol version from program `name` `name_version`.
    pub fn new(name: &str, name_version: &str) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            name: name.to_owned(),
            name_version: name_version.to_owned(),
            clock_ns: None,
        }
    }
}
