//! Guest memory: anonymous, lazily backed mmap regions around the MMIO gap.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout;
use crate::arch::x86_64::layout::PAGE_SIZE;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size outside what husk accepts.
    #[error("guest memory must be between {min} and {max} MiB, got {got} MiB")]
    BadSize {
        /// Requested size.
        got: u64,
        /// Minimum.
        min: u64,
        /// Maximum.
        max: u64,
    },
    /// mmap failed.
    #[error("cannot map {0} MiB of guest memory: {1}")]
    Mmap(u64, String),
}

/// The guest RAM of a VM: in a memfd ([`create_shared`]) when it has a
/// virtio-fs share (a vhost-user backend maps guest memory from a file),
/// else anonymous ([`create`]). Whether it is shared is the answer.
pub fn create_for(cfg: &crate::config::VmConfig) -> Result<(GuestMemoryMmap, bool), MemoryError> {
    let shared = !cfg.fs.is_empty();
    let mem = if shared {
        create_shared(cfg.mem_mib)?
    } else {
        create(cfg.mem_mib)?
    };
    Ok((mem, shared))
}

/// Maps `mem_mib` MiB of guest RAM, split around the 32-bit MMIO gap.
/// Pages are only backed when the guest touches them (MAP_NORESERVE).
pub fn create(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(layout::MIN_MEM_MIB..=layout::MAX_MEM_MIB).contains(&mem_mib) {
        return Err(MemoryError::BadSize {
            got: mem_mib,
            min: layout::MIN_MEM_MIB,
            max: layout::MAX_MEM_MIB,
        });
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Mmap(mem_mib, e.to_string()))
}

/// Like [`create`], but backed by one memfd that another process (a
/// vhost-user backend such as virtiofsd) can map: each region maps its
/// part of the file MAP_SHARED. Pages are still only backed when touched.
pub fn create_shared(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    use std::os::fd::FromRawFd;
    use vm_memory::FileOffset;
    if !(layout::MIN_MEM_MIB..=layout::MAX_MEM_MIB).contains(&mem_mib) {
        return Err(MemoryError::BadSize {
            got: mem_mib,
            min: layout::MIN_MEM_MIB,
            max: layout::MAX_MEM_MIB,
        });
    }
    let fail = |what: &str, e: std::io::Error| MemoryError::Mmap(mem_mib, format!("{what}: {e}"));
    // SAFETY: a static C string and flags; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"husk-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(fail("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(mem_mib << 20)
        .map_err(|e| fail("sizing the memfd", e))?;
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (start, size) in layout::ram_ranges(mem_mib << 20) {
        let f = file.try_clone().map_err(|e| fail("dup", e))?;
        ranges.push((
            GuestAddress(start),
            size as usize,
            Some(FileOffset::new(f, offset)),
        ));
        offset += size;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|e| MemoryError::Mmap(mem_mib, e.to_string()))
}

/// Asks for transparent huge pages on `[start, start + len)` of guest RAM,
/// rounded out to 2 MiB. Used for ranges the guest will touch in full
/// anyway (kernel image, initrd): loading them then takes a few 2 MiB
/// faults instead of thousands of 4 KiB ones. Only a hint: without THP
/// (or outside RAM) nothing happens.
pub fn hint_hugepages(mem: &GuestMemoryMmap, start: u64, len: u64) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    const HUGE: u64 = 2 << 20;
    let lo = start & !(HUGE - 1);
    let hi = start.saturating_add(len).saturating_add(HUGE - 1) & !(HUGE - 1);
    for region in mem.iter() {
        let r_start = region.start_addr().0;
        let r_end = r_start + region.len();
        let (a, b) = (lo.max(r_start), hi.min(r_end));
        if a >= b {
            continue;
        }
        let Ok(host) = region.get_host_address(MemoryRegionAddress(a - r_start)) else {
            continue;
        };
        // SAFETY: [host, host + (b - a)) lies inside this region's live
        // mapping; MADV_HUGEPAGE only changes the kernel's paging policy
        // for it and never invalidates its contents.
        let rc = unsafe { libc::madvise(host.cast(), (b - a) as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!("MADV_HUGEPAGE: {}", std::io::Error::last_os_error());
        }
    }
}

/// Maps `len` bytes of `file` from `offset` at guest address `gpa`,
/// copy-on-write (MAP_PRIVATE): the guest reads the page cache's pages
/// (shared with every VM that maps the same file) until it writes one, so
/// nothing is copied before the first KVM_RUN. The rest of the last page is
/// zeroed, as a copy would leave it. The file must not shrink while mapped:
/// callers map files that are only ever replaced by rename.
///
/// Returns Ok(false), with guest memory unchanged, when the range cannot be
/// mapped and must be copied instead: `gpa` or `offset` not page-aligned,
/// not inside one region, or the region is shared memory (a vhost-user
/// backend maps the memfd and would not see private pages).
pub fn map_file(
    mem: &GuestMemoryMmap,
    gpa: u64,
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> Result<bool, MemoryError> {
    use std::os::fd::AsRawFd;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    if len == 0 {
        return Ok(true);
    }
    if gpa % PAGE_SIZE != 0 || offset % PAGE_SIZE != 0 {
        return Ok(false);
    }
    let Some(span) = len.checked_add(PAGE_SIZE - 1).map(|l| l & !(PAGE_SIZE - 1)) else {
        return Ok(false);
    };
    let Some(region) = mem.find_region(GuestAddress(gpa)) else {
        return Ok(false);
    };
    let r_start = region.start_addr().0;
    if region.file_offset().is_some() || gpa + span > r_start + region.len() {
        return Ok(false);
    }
    let Ok(host) = region.get_host_address(MemoryRegionAddress(gpa - r_start)) else {
        return Ok(false);
    };
    let (Ok(span_usize), Ok(off)) = (usize::try_from(span), libc::off_t::try_from(offset)) else {
        return Ok(false);
    };
    // SAFETY: [host, host + span) lies inside this region's mapping, which
    // husk owns and which no Rust reference points into; nothing has run in
    // the guest yet. MAP_FIXED replaces those pages in place, so the region
    // stays one contiguous, writable mapping of the same size.
    let p = unsafe {
        libc::mmap(
            host.cast(),
            span_usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            file.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        let err = std::io::Error::last_os_error();
        // A failed MAP_FIXED may have unmapped the range: put anonymous
        // memory back so the region has no hole, then let the caller copy.
        // SAFETY: as above, the range is ours and unreferenced.
        let back = unsafe {
            libc::mmap(
                host.cast(),
                span_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if back == libc::MAP_FAILED {
            return Err(MemoryError::Mmap(
                size(mem) >> 20,
                format!("restoring guest memory after a failed file mapping ({err})"),
            ));
        }
        tracing::debug!("mapping a file into guest memory failed ({err}); copying instead");
        return Ok(false);
    }
    if span > len {
        let zeros = vec![0u8; (span - len) as usize];
        mem.write_slice(&zeros, GuestAddress(gpa + len))
            .map_err(|e| MemoryError::Mmap(size(mem) >> 20, e.to_string()))?;
    }
    Ok(true)
}

/// Bytes of guest RAM (all regions).
pub fn size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn sixteen_gib_maps_in_two_regions() {
        let mem = create(16 << 10).unwrap();
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (0, layout::MMIO_GAP_START));
        assert_eq!(regions[1].0, 1 << 32);
        assert!(!mem.address_in_range(GuestAddress(layout::MMIO_GAP_START)));
    }

    #[test]
    fn hugepage_hint_is_harmless_anywhere() {
        let mem = create(64).unwrap();
        hint_hugepages(&mem, 16 << 20, 9 << 20);
        hint_hugepages(&mem, 60 << 20, 100 << 20); // runs past the end
        hint_hugepages(&mem, layout::MMIO_GAP_START, 4096); // not RAM
        use vm_memory::Bytes;
        mem.write_obj(7u64, GuestAddress(17 << 20)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(17 << 20)).unwrap(), 7);
    }

    #[test]
    fn shared_memory_is_file_backed_and_usable() {
        use vm_memory::Bytes;
        let mem = create_shared(64).unwrap();
        for r in mem.iter() {
            assert!(r.file_offset().is_some());
        }
        mem.write_obj(0x1234_5678u32, GuestAddress(60 << 20))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(60 << 20)).unwrap(),
            0x1234_5678
        );
        assert!(create_shared(4).is_err());
    }

    #[test]
    fn mapped_file_reads_like_a_copy_and_writes_stay_private() {
        use std::io::Write;
        use vm_memory::Bytes;
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let mut f = tmp.as_file();
        let data: Vec<u8> = (0..3 * PAGE_SIZE as usize + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&data).unwrap();
        let mem = create(64).unwrap();
        // The tail of the last page is zeroed even where the file goes on.
        mem.write_slice(&[0xaa; 4096], GuestAddress((8 << 20) + 3 * PAGE_SIZE))
            .unwrap();
        assert!(map_file(&mem, 8 << 20, f, PAGE_SIZE, 2 * PAGE_SIZE + 50).unwrap());
        let mut back = vec![0u8; 3 * PAGE_SIZE as usize];
        mem.read_slice(&mut back, GuestAddress(8 << 20)).unwrap();
        let want_len = 2 * PAGE_SIZE as usize + 50;
        assert_eq!(
            back[..want_len],
            data[PAGE_SIZE as usize..PAGE_SIZE as usize + want_len]
        );
        assert!(back[want_len..].iter().all(|&b| b == 0));
        // Guest writes are copy-on-write: the file is unchanged.
        mem.write_obj(0x55u8, GuestAddress(8 << 20)).unwrap();
        let on_disk = std::fs::read(tmp.as_path()).unwrap();
        assert_eq!(on_disk, data);
        // Unaligned, shared memory or outside RAM: not mapped, nothing changed.
        assert!(!map_file(&mem, (8 << 20) + 1, f, 0, 10).unwrap());
        assert!(!map_file(&mem, 8 << 20, f, 1, 10).unwrap());
        assert!(!map_file(&mem, 63 << 20, f, 0, 2 << 20).unwrap());
        let shared = create_shared(64).unwrap();
        assert!(!map_file(&shared, 8 << 20, f, 0, 10).unwrap());
    }

    #[test]
    fn sizes_outside_limits_are_refused() {
        assert!(create(4).is_err());
        assert!(create(layout::MAX_MEM_MIB + 1).is_err());
        assert!(create(layout::MIN_MEM_MIB).is_ok());
    }
}
