//! husk's micro-VM monitor: one KVM guest with its memory, vCPUs and devices.
//! No command line here; the `husk` binary wires this to its CLI.

pub mod api;
pub mod arch;
pub mod builder;
pub mod caps;
pub mod config;
mod control;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod jail;
pub mod seccomp;
pub mod snapshot;
pub mod sys;
pub mod vstate;

pub use builder::{
    build, build_then, build_with_mmio, default_kernel_path, ConsoleInputSource, Vm,
};
pub use config::VmConfig;
pub use exit::VmExit;
