//! KVM state: capabilities, guest memory, the VM, vCPUs and the I/O bus.

pub mod bus;
pub mod kvm;
pub mod memory;
pub mod profile;
pub mod vcpu;
pub mod vcpu_state;
pub mod vcpu_thread;
pub mod vm;
