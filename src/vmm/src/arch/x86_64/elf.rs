//! Loading a vmlinux ELF by mapping its segments from the page cache
//! (`memory::map_file`) rather than copying them: the host work before the
//! first KVM_RUN no longer grows with the kernel's size, and VMs booting the
//! same file share its unmodified pages. A segment that cannot be mapped
//! (unaligned, or guest memory that a vhost-user backend shares) is copied.
//! The headers are read with linux-loader's ELF types and checked as its
//! loader does.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::elf::{self as elf_gen, Elf64_Ehdr, Elf64_Phdr};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::PAGE_SIZE;
use crate::vstate::memory;

/// Most program headers accepted (a vmlinux has about five).
const MAX_PHDRS: u16 = 64;

/// Why a file is not a loadable kernel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// Not a 64-bit little-endian x86_64 executable, or unreadable headers.
    #[error("{0}")]
    Invalid(String),
    /// A segment lies outside low guest RAM.
    #[error("segment at {0:#x} ({1} bytes) is outside guest memory")]
    TooBig(u64, u64),
}

/// Entry point and end of the loaded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// `e_entry`.
    pub entry: u64,
    /// First byte past the highest segment (bss included).
    pub end: u64,
    /// Segments mapped (the rest were copied).
    pub mapped: usize,
}

/// Loads `file` at its segments' physical addresses, which must lie in
/// RAM below `ram_end`; the entry point must be at or above `min_addr`.
pub fn load(
    mem: &GuestMemoryMmap,
    file: &mut File,
    min_addr: u64,
    ram_end: u64,
) -> Result<Loaded, ElfError> {
    let bad = |m: &str| ElfError::Invalid(m.to_string());
    let file_len = file
        .metadata()
        .map_err(|e| ElfError::Invalid(e.to_string()))?
        .len();
    let mut ehdr = Elf64_Ehdr::default();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(ehdr.as_mut_slice()))
        .map_err(|_| bad("cannot read the ELF header"))?;
    validate_header(&ehdr)?;
    if ehdr.e_entry < min_addr {
        return Err(bad("entry point below the kernel load area"));
    }
    let mut phdrs = Vec::with_capacity(usize::from(ehdr.e_phnum));
    file.seek(SeekFrom::Start(ehdr.e_phoff))
        .map_err(|_| bad("cannot read the program headers"))?;
    for _ in 0..ehdr.e_phnum {
        let mut ph = Elf64_Phdr::default();
        file.read_exact(ph.as_mut_slice())
            .map_err(|_| bad("cannot read the program headers"))?;
        phdrs.push(ph);
    }
    let mut loaded = Loaded {
        entry: ehdr.e_entry,
        end: 0,
        mapped: 0,
    };
    let loads: Vec<&Elf64_Phdr> = phdrs
        .iter()
        .filter(|p| p.p_type == elf_gen::PT_LOAD && p.p_filesz > 0)
        .collect();
    for ph in &loads {
        check_segment(ph, file_len, ram_end)?;
        loaded.end = loaded.end.max(ph.p_paddr + ph.p_memsz);
    }
    for (i, ph) in loads.iter().enumerate() {
        // The zeroed tail of a mapped segment's last page must not belong
        // to another segment.
        let page_end = (ph.p_paddr + ph.p_filesz + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let shares_page = loads
            .iter()
            .enumerate()
            .any(|(j, o)| j != i && o.p_paddr < page_end && o.p_paddr + o.p_filesz > ph.p_paddr);
        let mapped = !shares_page
            && memory::map_file(mem, ph.p_paddr, file, ph.p_offset, ph.p_filesz)
                .map_err(|e| ElfError::Invalid(e.to_string()))?;
        if mapped {
            loaded.mapped += 1;
            continue;
        }
        file.seek(SeekFrom::Start(ph.p_offset))
            .map_err(|_| bad("cannot seek to a segment"))?;
        mem.read_exact_volatile_from(GuestAddress(ph.p_paddr), file, ph.p_filesz as usize)
            .map_err(|e| ElfError::Invalid(format!("cannot read a segment: {e}")))?;
    }
    Ok(loaded)
}

fn validate_header(e: &Elf64_Ehdr) -> Result<(), ElfError> {
    let bad = |m: &str| Err(ElfError::Invalid(m.to_string()));
    let magic = [
        elf_gen::ELFMAG0,
        elf_gen::ELFMAG1,
        elf_gen::ELFMAG2,
        elf_gen::ELFMAG3,
    ];
    if e.e_ident[..4] != magic {
        return bad("no ELF magic");
    }
    if e.e_ident[elf_gen::EI_CLASS] != elf_gen::ELFCLASS64 {
        return bad("not a 64-bit ELF");
    }
    if e.e_ident[elf_gen::EI_DATA] != elf_gen::ELFDATA2LSB {
        return bad("not little-endian");
    }
    if e.e_machine != 62 {
        return bad("not an x86_64 ELF");
    }
    if usize::from(e.e_phentsize) != std::mem::size_of::<Elf64_Phdr>() {
        return bad("unexpected program header size");
    }
    if e.e_phnum == 0 || e.e_phnum > MAX_PHDRS {
        return bad("no or too many program headers");
    }
    Ok(())
}

/// As linux-loader: segments may lie anywhere in RAM (only the entry point
/// must be at or above the kernel load area).
fn check_segment(ph: &Elf64_Phdr, file_len: u64, ram_end: u64) -> Result<(), ElfError> {
    let in_file = ph
        .p_offset
        .checked_add(ph.p_filesz)
        .is_some_and(|end| end <= file_len);
    if !in_file || ph.p_filesz > ph.p_memsz {
        return Err(ElfError::Invalid(
            "a segment runs past the end of the file".into(),
        ));
    }
    let fits = ph
        .p_paddr
        .checked_add(ph.p_memsz)
        .is_some_and(|end| end <= ram_end);
    if !fits {
        return Err(ElfError::TooBig(ph.p_paddr, ph.p_memsz));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::{elf::Elf, KernelLoader};
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    /// (offset, paddr, filesz, memsz) per PT_LOAD; the data is a pattern.
    fn elf_file(segs: &[(u64, u64, u64, u64)], entry: u64) -> TempFile {
        let mut img = vec![0u8; 0x6000];
        let mut eh = Elf64_Ehdr::default();
        eh.e_ident[..4].copy_from_slice(b"\x7fELF");
        eh.e_ident[4] = 2;
        eh.e_ident[5] = 1;
        eh.e_ident[6] = 1;
        eh.e_type = 2;
        eh.e_machine = 62;
        eh.e_version = 1;
        eh.e_entry = entry;
        eh.e_phoff = 64;
        eh.e_ehsize = 64;
        eh.e_phentsize = 56;
        eh.e_phnum = segs.len() as u16;
        img[..64].copy_from_slice(eh.as_slice());
        for (i, &(off, paddr, filesz, memsz)) in segs.iter().enumerate() {
            let ph = Elf64_Phdr {
                p_type: elf_gen::PT_LOAD,
                p_flags: 7,
                p_offset: off,
                p_vaddr: paddr,
                p_paddr: paddr,
                p_filesz: filesz,
                p_memsz: memsz,
                p_align: 0x1000,
            };
            img[64 + i * 56..64 + (i + 1) * 56].copy_from_slice(ph.as_slice());
        }
        for (i, b) in img.iter_mut().enumerate().skip(0x400) {
            *b = (i % 253) as u8 | 1;
        }
        let t = TempFile::new().unwrap();
        t.as_file().write_all(&img).unwrap();
        t
    }

    fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
        let mut v = vec![0u8; 8 << 20];
        mem.read_slice(&mut v, GuestAddress(16 << 20)).unwrap();
        v
    }

    #[test]
    fn mapping_loads_what_linux_loader_copies() {
        const M: u64 = 16 << 20;
        // Aligned with a partial last page and bss; unaligned (copied);
        // and one sharing a page with its neighbour (copied).
        let segs = [
            (0x1000, M, 0x1800, 0x3000),
            (0x2800, 0x8000, 0x100, 0x100),
            (0x3000, M + 0x5000, 0x1000, 0x1000),
            (0x4400, M + 0x10400, 0x200, 0x800),
            (0x5000, M + 0x20000, 0x900, 0x900),
            (0x5900, M + 0x20900, 0x100, 0x100),
        ];
        let t = elf_file(&segs, M);
        let ours = memory::create(64).unwrap();
        // Garbage where bss and page tails go: a loaded image has zeros there.
        ours.write_slice(&[0xee; 0x30000], GuestAddress(M)).unwrap();
        let theirs = memory::create(64).unwrap();
        theirs
            .write_slice(&[0xee; 0x30000], GuestAddress(M))
            .unwrap();
        let mut f = File::open(t.as_path()).unwrap();
        let got = load(&ours, &mut f, 1 << 20, 64 << 20).unwrap();
        let want = Elf::load(&theirs, None, &mut f, Some(GuestAddress(1 << 20))).unwrap();
        assert_eq!(got.entry, want.kernel_load.0);
        assert_eq!(got.end, want.kernel_end);
        assert_eq!(got.mapped, 2);
        // linux-loader leaves bss untouched; the zeroed page tails are the
        // one intended difference, so compare with those zeroed there too.
        let mut expect = snapshot(&theirs);
        for &(_, paddr, filesz, _) in [segs[0], segs[2]].iter() {
            let (a, b) = (
                paddr + filesz - M,
                ((paddr + filesz + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)) - M,
            );
            expect[a as usize..b as usize].fill(0);
        }
        assert!(
            snapshot(&ours) == expect,
            "guest memory differs from linux-loader's"
        );
    }

    #[test]
    fn bad_files_are_refused() {
        const M: u64 = 16 << 20;
        let mem = memory::create(64).unwrap();
        let t = elf_file(&[(0x1000, M, 0x100, 0x100)], M);
        let mut f = File::open(t.as_path()).unwrap();
        assert!(
            load(&mem, &mut f, M + 1, 64 << 20).is_err(),
            "entry too low"
        );
        let t = elf_file(&[(0x1000, M, 0x10_0000, 0x10_0000)], M);
        let mut f = File::open(t.as_path()).unwrap();
        assert!(matches!(
            load(&mem, &mut f, 1 << 20, 64 << 20),
            Err(ElfError::Invalid(_))
        ));
        let t = elf_file(&[(0x1000, 63 << 20, 0x100, 2 << 20)], 63 << 20);
        let mut f = File::open(t.as_path()).unwrap();
        assert!(matches!(
            load(&mem, &mut f, 1 << 20, 64 << 20),
            Err(ElfError::TooBig(..))
        ));
        let t = TempFile::new().unwrap();
        t.as_file().write_all(b"#!/bin/sh\n").unwrap();
        let mut f = File::open(t.as_path()).unwrap();
        assert!(load(&mem, &mut f, 1 << 20, 64 << 20).is_err());
    }
}
