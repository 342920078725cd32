//! x86_64: guest layout, boot protocol, CPU state.

pub mod boot;
pub mod cpuid;
pub mod elf;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod regs;
