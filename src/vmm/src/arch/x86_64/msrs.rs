//! Boot-time model-specific registers.

use kvm_bindings::{kvm_msr_entry, Msrs};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs every vCPU starts with, restricted to those KVM supports.
pub fn boot_msrs(supported: &[u32]) -> Msrs {
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    // Ten entries are far below KVM_MAX_MSR_ENTRIES, the only failure cause.
    Msrs::from_entries(&entries).expect("boot MSR list exceeds KVM_MAX_MSR_ENTRIES")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_supported_msrs_are_set() {
        let m = boot_msrs(&[MSR_LSTAR, MSR_MTRR_DEF_TYPE, 0x1234]);
        let idx: Vec<u32> = m.as_slice().iter().map(|e| e.index).collect();
        assert_eq!(idx, vec![MSR_LSTAR, MSR_MTRR_DEF_TYPE]);
        assert_eq!(m.as_slice()[1].data, MTRR_ENABLE_WB);
    }
}
