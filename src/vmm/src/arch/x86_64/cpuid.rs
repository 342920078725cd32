//! CPUID normalisation: KVM's supported set, with per-vCPU topology (APIC
//! ids, thread/core counts), the hypervisor bit and KVM's signature leaf.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_THERMAL: u32 = 0x6;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_EXT_ADDR: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// KVM paravirtual features whose guest side issues hypercalls (`vmcall`):
/// PV_UNHALT (spinlock kick), PV_SEND_IPI, PV_SCHED_YIELD.
const KVM_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);
/// Topology level types for leaf 0xb.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to hold `n` distinct values.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `cpuid` for vCPU `index` of `count`: one socket, `count` cores,
/// one thread per core, APIC id = vCPU index. With `no_hypercalls`, the KVM
/// paravirtual features that work by hypercall are hidden: on kvm_pvm hosts
/// a `vmcall` from the (emulated) guest kernel never returns, and with two
/// or more vCPUs Linux would use them for IPIs and spinlock kicks.
pub fn normalize(cpuid: &mut CpuId, index: u8, count: u8, no_hypercalls: bool) {
    add_topology_subleaves(cpuid);
    let apic_id = u32::from(index);
    let count = u32::from(count);
    let core_bits = bits_for(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count.min(255) << 16);
                // CLFLUSH line size (EBX[15:8]) is kept from the host.
                e.ecx |= ECX_HYPERVISOR;
                // The in-kernel LAPIC emulates the TSC deadline timer.
                e.ecx |= ECX_TSC_DEADLINE;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads
                // sharing this cache - 1 (caches are per core here, except
                // the last level, shared by the package).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            LEAF_THERMAL => {
                // No power management or thermal sensors in a micro-VM.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_PERFMON => {
                // No virtual PMU: the guest must not program counters.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0; // one thread per core
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_KVM_SIGNATURE => {
                e.eax = e.eax.max(LEAF_KVM_SIGNATURE + 1);
                e.ebx = KVM_SIGNATURE[0];
                e.ecx = KVM_SIGNATURE[1];
                e.edx = KVM_SIGNATURE[2];
            }
            LEAF_KVM_FEATURES if no_hypercalls => {
                e.eax &= !KVM_HYPERCALL_FEATURES;
            }
            LEAF_EXT_ADDR => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC id bits for cores.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            _ => {}
        }
    }
}

/// KVM may report only sub-leaf 0 (SMT) of the extended topology leaf;
/// without the core level (sub-leaf 1) and the terminating sub-leaf 2,
/// Linux puts every vCPU in a package of its own. Adds what is missing.
fn add_topology_subleaves(cpuid: &mut CpuId) {
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if !cpuid.as_slice().iter().any(|e| e.function == leaf) {
            continue;
        }
        for sub in 0..3 {
            let present = cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == leaf && e.index == sub);
            if !present {
                let entry = kvm_cpuid_entry2 {
                    function: leaf,
                    index: sub,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                };
                // Only fails past KVM_MAX_CPUID_ENTRIES; the guest then
                // sees a flat topology, which is still correct enough to run.
                if cpuid.push(entry).is_err() {
                    tracing::warn!("CPUID table full: topology leaf {leaf:#x}.{sub} missing");
                }
            }
        }
    }
}

/// True if the entry is keyed by its sub-leaf index.
pub fn is_indexed(e: &kvm_cpuid_entry2) -> bool {
    e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_CACHE, 0),
            kvm_cpuid_entry2 {
                eax: 0x63, // level 3 unified cache
                ..entry(LEAF_CACHE, 3)
            },
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            entry(LEAF_PERFMON, 0),
            entry(LEAF_KVM_SIGNATURE, 0),
            entry(LEAF_EXT_ADDR, 0),
            entry(LEAF_KVM_FEATURES, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn apic_ids_and_counts_per_vcpu() {
        for idx in 0..4u8 {
            let mut c = sample();
            normalize(&mut c, idx, 4, false);
            let l1 = find(&c, LEAF_FEATURES, 0);
            assert_eq!(l1.ebx >> 24, u32::from(idx));
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(l1.edx & EDX_HTT, 0);
            let t0 = find(&c, LEAF_TOPOLOGY, 0);
            let t1 = find(&c, LEAF_TOPOLOGY, 1);
            let t2 = find(&c, LEAF_TOPOLOGY, 2);
            assert_eq!(
                (t0.eax, t0.ebx, t0.ecx >> 8, t0.edx),
                (0, 1, 1, u32::from(idx))
            );
            assert_eq!((t1.eax, t1.ebx, t1.ecx >> 8), (2, 4, 2));
            assert_eq!((t2.ebx, t2.ecx), (0, 2));
        }
    }

    #[test]
    fn single_vcpu_has_no_htt_and_cache_sharing() {
        let mut c = sample();
        normalize(&mut c, 0, 1, false);
        assert_eq!(find(&c, LEAF_FEATURES, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&c, LEAF_CACHE, 0).eax >> 14, 0);
        let mut c = sample();
        normalize(&mut c, 0, 3, false);
        let l3 = find(&c, LEAF_CACHE, 3);
        assert_eq!(l3.eax >> 26, 2);
        assert_eq!((l3.eax >> 14) & 0xfff, 2);
        assert_eq!(find(&c, LEAF_EXT_ADDR, 0).ecx & 0xff, 2);
    }

    #[test]
    fn kvm_signature_and_no_pmu() {
        let mut c = sample();
        normalize(&mut c, 0, 1, false);
        let sig = find(&c, LEAF_KVM_SIGNATURE, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes[..9], b"KVMKVMKVM");
        assert_eq!(find(&c, LEAF_PERFMON, 0).eax, 0);
    }

    #[test]
    fn hypercall_features_hidden_only_when_asked() {
        let mut c = sample();
        normalize(&mut c, 0, 2, false);
        assert_eq!(find(&c, LEAF_KVM_FEATURES, 0).eax, 0xffff_ffff);
        let mut c = sample();
        normalize(&mut c, 0, 2, true);
        let eax = find(&c, LEAF_KVM_FEATURES, 0).eax;
        assert_eq!(eax & KVM_HYPERCALL_FEATURES, 0);
        assert_eq!(eax | KVM_HYPERCALL_FEATURES, 0xffff_ffff);
    }

    #[test]
    fn missing_topology_subleaves_are_added() {
        // What kvm_pvm reports: only sub-leaf 0 of leaf 0xb.
        let mut c =
            CpuId::from_entries(&[entry(LEAF_FEATURES, 0), entry(LEAF_TOPOLOGY, 0)]).unwrap();
        normalize(&mut c, 1, 2, false);
        let t1 = find(&c, LEAF_TOPOLOGY, 1);
        assert_eq!((t1.eax, t1.ebx, t1.ecx >> 8, t1.edx), (1, 2, LEVEL_CORE, 1));
        assert!(is_indexed(&t1));
        assert_eq!(find(&c, LEAF_TOPOLOGY, 2).ecx, 2);
        assert!(!c.as_slice().iter().any(|e| e.function == LEAF_TOPOLOGY_V2));
    }

    #[test]
    fn bit_widths() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(32), 5);
    }
}
