//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! finds its vCPUs, the IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 signature, FPU + APIC feature flags: what Linux expects to see.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_SRC_INT: u8 = 0;
const MP_IRQ_SRC_NMI: u8 = 1;
const MP_IRQ_SRC_EXTINT: u8 = 3;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table can describe.
    #[error("too many vCPUs for the MP table: {0}")]
    TooManyCpus(u8),
    /// The table does not fit in the EBDA.
    #[error("MP table does not fit in the EBDA")]
    TooBig,
    /// Writing to guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    GuestWrite,
}

/// The IOAPIC's id: after the vCPUs' APIC ids.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus + 1
}

/// Builds the floating pointer and configuration table for `num_cpus` vCPUs,
/// as they are laid out at `MPTABLE_START`.
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > layout::MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let table_addr = layout::MPTABLE_START as u32 + MPF_SIZE as u32;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(num_cpus);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // Every ISA IRQ is a plain interrupt on the same IOAPIC pin. The 8259
    // reaches the CPU through LINT0 (below), not through IOAPIC pin 0:
    // declaring pin 0 as ExtINT makes Linux's timer check look for an
    // 8259 routing through the IOAPIC that the in-kernel irqchip lacks.
    for irq in 0..=layout::irq::LAST as u8 {
        entries.extend_from_slice(&[ENTRY_INTSRC, MP_IRQ_SRC_INT, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, MP_IRQ_SRC_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, MP_IRQ_SRC_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = MPC_HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(MPF_SIZE + table_len);
    out.extend_from_slice(MPF_SIGNATURE);
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.push(1); // length in 16-byte paragraphs
    out.push(MP_SPEC_REV);
    out.push(0); // checksum, patched below
    out.extend_from_slice(&[0u8; 5]); // feature bytes: a configuration table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);

    if layout::MPTABLE_START + out.len() as u64 > layout::LOW_MEM_END {
        return Err(MptableError::TooBig);
    }
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs into guest memory.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_START))
        .map_err(|_| MptableError::GuestWrite)
}

/// The byte that makes `data` sum to zero (mod 256).
fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(d: &[u8]) -> u8 {
        d.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_valid() {
        for cpus in [1u8, 2, 7, 32] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..MPF_SIZE]), 0, "floating pointer, {cpus} cpus");
            let len = u16::from_le_bytes([t[MPF_SIZE + 4], t[MPF_SIZE + 5]]) as usize;
            assert_eq!(len, t.len() - MPF_SIZE);
            assert_eq!(&t[MPF_SIZE..MPF_SIZE + 4], b"PCMP");
            assert_eq!(sum(&t[MPF_SIZE..]), 0, "config table, {cpus} cpus");
        }
    }

    #[test]
    fn lists_every_cpu_once_with_one_boot_cpu() {
        let t = build(4).unwrap();
        let phys = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(phys, layout::MPTABLE_START + 16);
        let entries = &t[MPF_SIZE + MPC_HEADER_SIZE..];
        let cpus: Vec<&[u8]> = entries.chunks(20).take(4).collect();
        for (i, c) in cpus.iter().enumerate() {
            assert_eq!(c[0], ENTRY_PROCESSOR);
            assert_eq!(c[1], i as u8);
            assert_eq!(c[3] & CPU_BOOTPROCESSOR != 0, i == 0);
        }
        let count = u16::from_le_bytes([t[MPF_SIZE + 34], t[MPF_SIZE + 35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn isa_irqs_are_plain_interrupts_and_lint0_is_extint() {
        let t = build(1).unwrap();
        let entries = &t[MPF_SIZE + MPC_HEADER_SIZE + 20 + 8 + 8..];
        for (irq, e) in entries.chunks(8).take(24).enumerate() {
            assert_eq!(e[0], ENTRY_INTSRC);
            assert_eq!(e[1], MP_IRQ_SRC_INT, "irq {irq}");
            assert_eq!((e[5], e[7]), (irq as u8, irq as u8));
        }
        let lint: Vec<&[u8]> = entries.chunks(8).skip(24).collect();
        assert_eq!(
            (lint[0][0], lint[0][1], lint[0][7]),
            (ENTRY_LINTSRC, MP_IRQ_SRC_EXTINT, 0)
        );
        assert_eq!(
            (lint[1][1], lint[1][6], lint[1][7]),
            (MP_IRQ_SRC_NMI, 0xff, 1)
        );
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(build(0).is_err());
        assert!(build(33).is_err());
    }
}
