//! Shared test helpers.
pub mod tiny;
