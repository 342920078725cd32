//! Every guest physical address husk uses on x86_64, in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BIOS data area (left zero)
//! 0x0000_0500  GDT                         (GDT_START)
//! 0x0000_0520  IDT (empty)                 (IDT_START)
//! 0x0000_7000  boot_params "zero page"     (ZERO_PAGE_START)
//! 0x0000_8ff0  boot stack top              (BOOT_STACK_POINTER)
//! 0x0000_9000  PML4, then PDPT and PD      (PML4_START..)
//! 0x0002_0000  kernel command line         (CMDLINE_START)
//! 0x0009_fc00  MP table (EBDA)             (MPTABLE_START) .. 0xa_0000
//! 0x000a_0000  VGA hole / ROM area, not RAM .. 0x10_0000
//! 0x0010_0000  high memory: kernel at its ELF physical address, initrd at the top
//! 0xd000_0000  32-bit MMIO gap: virtio-mmio devices, IOAPIC, LAPIC, TSS (not RAM)
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than MMIO_GAP_START
//! ```

/// Guest page size (4 KiB).
pub const PAGE_SIZE: u64 = 0x1000;

/// Start of the GDT the vCPUs are entered with.
pub const GDT_START: u64 = 0x500;
/// Start of the (empty) IDT the vCPUs are entered with.
pub const IDT_START: u64 = 0x520;
/// The Linux `boot_params` structure ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: one PML4 page, one PDPT page, then PD pages.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First page directory; `BOOT_IDENTITY_MAP_GIB` of them follow back to back.
pub const PDE_START: u64 = 0xb000;
/// How much low memory the boot page tables identity-map (2 MiB pages).
pub const BOOT_IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line size including the NUL (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of conventional low memory (start of the VGA/ROM hole).
pub const LOW_MEM_END: u64 = 0xa0000;
/// First byte of "high" memory: where the kernel and initrd may go.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap (no RAM between here and 4 GiB).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// First address past 32 bits.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO_GAP_START;
/// Window for virtio-mmio devices, allocated from the start of the gap.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// How many virtio-mmio devices fit: one interrupt line each.
pub const VIRTIO_MMIO_SLOTS: usize = (irq::LAST - irq::VIRTIO_FIRST + 1) as usize;

/// Base address and GSI of virtio-mmio device `index`, if there is room.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    if index >= VIRTIO_MMIO_SLOTS {
        return None;
    }
    Some((
        VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
        irq::VIRTIO_FIRST + index as u32,
    ))
}
/// IOAPIC base address (in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages, must be below 4 GiB and not RAM).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page for real-mode emulation, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy I/O ports.
pub mod ports {
    /// COM1 8250 UART.
    pub const COM1: u16 = 0x3f8;
    /// Number of COM1 registers.
    pub const COM1_LEN: u16 = 8;
    /// i8042 keyboard controller data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 range length: 0x60..=0x64.
    pub const I8042_LEN: u16 = 5;
    /// The fill device's doorbell (devices::fill): unassigned on a PC.
    pub const FILL: u16 = 0x880;
    /// Its length: one 32-bit port.
    pub const FILL_LEN: u16 = 4;
}

/// Legacy interrupt lines.
pub mod irq {
    /// COM1 interrupt (ISA IRQ 4).
    pub const COM1: u32 = 4;
    /// First GSI handed to virtio-mmio devices.
    pub const VIRTIO_FIRST: u32 = 5;
    /// Last GSI usable on the in-kernel IOAPIC.
    pub const LAST: u32 = 23;
}

/// Smallest guest memory husk accepts: room for the low-memory boot
/// structures plus a kernel loaded at its usual 16 MiB physical address.
pub const MIN_MEM_MIB: u64 = 32;
/// Largest guest memory husk accepts.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Most vCPUs husk gives a guest (the MP table and APIC ids fit in a byte).
pub const MAX_VCPUS: u8 = 32;

/// The guest RAM ranges for `mem_bytes` of memory: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (FIRST_ADDR_PAST_32BITS, mem_bytes - MMIO_GAP_START),
        ]
    }
}

// The fixed boot structures must not overlap: checked at compile time.
const _: () = {
    assert!(PML4_START + 0x1000 <= PDPTE_START);
    assert!(PDPTE_START + 0x1000 <= PDE_START);
    assert!(PDE_START + BOOT_IDENTITY_MAP_GIB * 0x1000 <= CMDLINE_START);
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER + 0x10);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
    assert!(KVM_IDENTITY_MAP_ADDRESS + 0x1000 <= KVM_TSS_ADDRESS);
    assert!(KVM_TSS_ADDRESS >= MMIO_GAP_START);
    assert!(VIRTIO_MMIO_START + VIRTIO_MMIO_SLOTS as u64 * VIRTIO_MMIO_SIZE <= IOAPIC_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_skip_the_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        let r = ram_ranges(16 << 30);
        assert_eq!(r[0], (0, MMIO_GAP_START));
        assert_eq!(r[1].0, 1 << 32);
        assert_eq!(r[0].1 + r[1].1, 16 << 30);
    }

    #[test]
    fn virtio_slots_have_distinct_windows_and_lines() {
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_mmio_slot(1), Some((0xd000_1000, 6)));
        assert_eq!(
            virtio_mmio_slot(VIRTIO_MMIO_SLOTS - 1).unwrap().1,
            irq::LAST
        );
        assert_eq!(virtio_mmio_slot(VIRTIO_MMIO_SLOTS), None);
    }
}
