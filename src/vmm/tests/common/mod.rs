//! Shared test helpers.
pub mod tiny;
pub mod vsock_guest;
