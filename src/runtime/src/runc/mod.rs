//! The runc-compatible OCI runtime: runc's commands on containers whose
//! process runs in a micro-VM. One VMM process per container (see
//! `vmm.rs`); state under the state root, runc-style (`store.rs`).

pub mod bundle;
pub mod cgroups;
pub mod console;
pub mod create;
pub mod detach;
pub mod events;
pub mod exec;
pub mod hooks;
pub mod lifecycle;
pub mod query;
pub mod run;
pub mod store;
pub mod update;
pub mod vmm;

/// The default state root (runc's is /run/runc).
pub const DEFAULT_STATE_ROOT: &str = "/run/husk";
