//! The x86_64 64-bit Linux boot protocol: load a vmlinux ELF, place the
//! initrd, write the command line and `boot_params` with an e820 map that
//! leaves the MMIO gap out.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// The initrd must stay below 2 GiB: a vmlinux has no setup header to tell
/// us its `initrd_addr_max`, and 0x7fffffff is the protocol's 64-bit default.
const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// Errors while loading the guest kernel and boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// Path given by the user.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The kernel is not a loadable x86_64 vmlinux.
    #[error("kernel {path} is not an x86_64 vmlinux ELF image ({reason})")]
    NotElf {
        /// Path given by the user.
        path: String,
        /// What linux-loader objected to.
        reason: String,
    },
    /// The kernel's segments do not fit into guest memory.
    #[error("kernel {path} does not fit in {mem_mib} MiB of guest memory")]
    KernelTooBig {
        /// Path given by the user.
        path: String,
        /// Guest memory size.
        mem_mib: u64,
    },
    /// The initrd could not be read.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// Path given by the user.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig {
        /// Path given by the user.
        path: String,
        /// Initrd size.
        size: u64,
    },
    /// The command line is too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
}

/// Where the kernel was loaded and where the vCPU must start.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point (`startup_64`).
    pub entry: GuestAddress,
    /// First byte past the kernel image (including bss).
    pub end: u64,
}

/// Loads a vmlinux ELF at its physical address.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: shown.clone(),
        source,
    })?;
    match super::elf::load(mem, &mut file, layout::HIMEM_START, low_ram_end(mem)) {
        Ok(l) => {
            tracing::debug!("kernel: {} segment(s) mapped from the page cache", l.mapped);
            Ok(LoadedKernel {
                entry: GuestAddress(l.entry),
                end: l.end,
            })
        }
        Err(super::elf::ElfError::TooBig(..)) => Err(BootError::KernelTooBig {
            path: shown,
            mem_mib: crate::vstate::memory::size(mem) >> 20,
        }),
        Err(super::elf::ElfError::Invalid(reason)) => Err(BootError::NotElf {
            path: shown,
            reason,
        }),
    }
}

/// Copies the initrd to the top of low memory; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::ReadInitrd {
        path: shown.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::ReadInitrd {
            path: shown.clone(),
            source,
        })?
        .len();
    let addr =
        initrd_address(low_ram_end(mem), kernel_end, size).ok_or(BootError::InitrdTooBig {
            path: shown.clone(),
            size,
        })?;
    let fail = |e: String| BootError::ReadInitrd {
        path: shown.clone(),
        source: std::io::Error::other(e),
    };
    let mapped = crate::vstate::memory::map_file(mem, addr.raw_value(), &file, 0, size)
        .map_err(|e| fail(e.to_string()))?;
    if !mapped {
        crate::vstate::memory::hint_hugepages(mem, addr.raw_value(), size);
        mem.read_exact_volatile_from(addr, &mut file, size as usize)
            .map_err(|e| fail(e.to_string()))?;
    }
    Ok((addr, size))
}

/// The page-aligned address at which an initrd of `size` bytes ends at the
/// top of low RAM, if it fits above the kernel.
pub fn initrd_address(low_ram_end: u64, kernel_end: u64, size: u64) -> Option<GuestAddress> {
    let top = low_ram_end.min(INITRD_ADDR_MAX + 1);
    let start = top.checked_sub(size)? & !(layout::PAGE_SIZE - 1);
    (start >= kernel_end).then_some(GuestAddress(start))
}

/// Writes the NUL-terminated command line at `CMDLINE_START`.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes, the limit is {}",
            cmdline.len(),
            layout::CMDLINE_MAX_SIZE - 1
        )));
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|_| BootError::GuestWrite("the command line"))
}

/// The e820 map for this guest: low RAM, the EBDA reserved, high RAM up to
/// the MMIO gap, and RAM above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: layout::EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: layout::EBDA_START,
            size: layout::LOW_MEM_END - layout::EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for (start, size) in layout::ram_ranges(mem_bytes) {
        let (start, size) = if start == 0 {
            (layout::HIMEM_START, size - layout::HIMEM_START)
        } else {
            (start, size)
        };
        map.push(boot_e820_entry {
            addr: start,
            size,
            r#type: E820_RAM,
        });
    }
    map
}

/// Builds `boot_params` for a vmlinux boot.
pub fn build_boot_params(
    mem_bytes: u64,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
) -> boot_params {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_bytes);
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    params
}

/// Writes `boot_params` to the zero page.
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    let bp = BootParams::new::<boot_params>(params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(|_| BootError::GuestWrite("boot_params"))
}

/// First byte past RAM below the MMIO gap.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    crate::vstate::memory::size(mem).min(layout::MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_leaves_holes_and_gap() {
        let map = e820_map(128 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!((map[0].addr, map[0].size, map[0].r#type), (0, 0x9fc00, 1));
        assert_eq!({ map[1].r#type }, E820_RESERVED);
        assert_eq!({ map[2].addr }, 0x10_0000);
        assert_eq!(map[2].addr + map[2].size, 128 << 20);

        let map = e820_map(8 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, layout::MMIO_GAP_START);
        assert_eq!({ map[3].addr }, 1 << 32);
        assert_eq!({ map[3].size }, (8 << 30) - layout::MMIO_GAP_START);
        // No RAM entry touches the MMIO gap.
        for e in &map {
            if e.r#type == E820_RAM {
                let end = e.addr + e.size;
                assert!(end <= layout::MMIO_GAP_START || e.addr >= 1 << 32);
            }
        }
    }

    #[test]
    fn boot_params_header_fields() {
        let p = build_boot_params(256 << 20, 12, Some((GuestAddress(0x0f00_0000), 4096)));
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 13);
        assert_eq!({ p.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 4096);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn initrd_goes_to_top_of_low_memory() {
        let a = initrd_address(128 << 20, 20 << 20, 5000).unwrap();
        assert_eq!(a.raw_value(), ((128 << 20) - 5000) & !0xfff);
        // Capped at 2 GiB even with 3 GiB of low RAM.
        let a = initrd_address(3 << 30, 20 << 20, 4096).unwrap();
        assert_eq!(a.raw_value(), (1 << 31) - 4096);
        // Would overlap the kernel.
        assert!(initrd_address(32 << 20, 30 << 20, 4 << 20).is_none());
        assert!(initrd_address(32 << 20, 0, 64 << 20).is_none());
    }

    #[test]
    fn cmdline_limits() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cmdline(&mem, "console=ttyS0").unwrap();
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(write_cmdline(&mem, &"x".repeat(2048)).is_err());
        assert!(write_cmdline(&mem, "a\0b").is_err());
    }
}
