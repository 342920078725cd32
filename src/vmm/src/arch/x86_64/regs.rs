//! Register state for the 64-bit boot entry: general registers, control
//! registers and segments, identity page tables, FPU.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{self, BOOT_GDT};
use super::layout;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_NW: u64 = 1 << 29;
const X86_CR0_CD: u64 = 1 << 30;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page table entry bits: present, writable, 2 MiB page.
const PTE_P_RW: u64 = 0x3;
const PDE_PS: u64 = 0x80;

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A write of GDT, IDT or page tables failed.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
}

/// General registers at the 64-bit entry: RIP = entry, RSI = boot_params.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state after reset (FCW and MXCSR defaults).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the GDT, an empty IDT and identity page tables covering
/// `BOOT_IDENTITY_MAP_GIB` GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_START + i as u64 * 8))
            .map_err(|_| RegsError::GuestWrite("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))
        .map_err(|_| RegsError::GuestWrite("the IDT"))?;

    mem.write_obj(
        layout::PDPTE_START | PTE_P_RW,
        GuestAddress(layout::PML4_START),
    )
    .map_err(|_| RegsError::GuestWrite("the PML4"))?;
    for gib in 0..layout::BOOT_IDENTITY_MAP_GIB {
        let pd = layout::PDE_START + gib * 0x1000;
        mem.write_obj(pd | PTE_P_RW, GuestAddress(layout::PDPTE_START + gib * 8))
            .map_err(|_| RegsError::GuestWrite("the PDPT"))?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | PTE_P_RW | PDE_PS, GuestAddress(pd + i * 8))
                .map_err(|_| RegsError::GuestWrite("a page directory"))?;
        }
    }
    Ok(())
}

/// Turns the reset `sregs` into 64-bit long mode with flat segments and
/// the boot page tables.
pub fn configure_sregs(sregs: &mut kvm_sregs) {
    let code = gdt::kvm_segment_from_gdt(BOOT_GDT[1], gdt::CODE_INDEX);
    let data = gdt::kvm_segment_from_gdt(BOOT_GDT[2], gdt::DATA_INDEX);
    let tss = gdt::kvm_segment_from_gdt(BOOT_GDT[3], gdt::TSS_INDEX);

    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 = (sregs.cr0 & !(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_ET | X86_CR0_NE;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_low_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
        for gib in 0..layout::BOOT_IDENTITY_MAP_GIB {
            let pdpte: u64 = mem
                .read_obj(GuestAddress(layout::PDPTE_START + gib * 8))
                .unwrap();
            assert_eq!(pdpte, (layout::PDE_START + gib * 0x1000) | 3);
        }
        // Walk a few addresses through the tables.
        for addr in [0u64, 0x20_0000, 0x100_0000, 0x3fe0_0000, 0xd000_0000] {
            let pdpt_i = addr >> 30;
            let pd_i = (addr >> 21) & 0x1ff;
            let pde: u64 = mem
                .read_obj(GuestAddress(layout::PDE_START + pdpt_i * 0x1000 + pd_i * 8))
                .unwrap();
            assert_eq!(pde & !0xfff, addr);
            assert_eq!(pde & 0xfff, 0x83);
        }
        let gdt1: u64 = mem.read_obj(GuestAddress(layout::GDT_START + 8)).unwrap();
        assert_eq!(gdt1, BOOT_GDT[1]);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let mut s = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        configure_sregs(&mut s);
        assert_eq!(s.cr0 & X86_CR0_PG, X86_CR0_PG);
        assert_eq!(s.cr0 & (X86_CR0_CD | X86_CR0_NW), 0);
        assert_eq!(s.cr3, layout::PML4_START);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn entry_registers() {
        let r = boot_regs(GuestAddress(0x100_0000));
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, layout::ZERO_PAGE_START);
        assert_eq!(r.rflags, 2);
    }
}
