//! Guest memory: anonymous, lazily backed mmap regions around the MMIO gap.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout;

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
    fn sizes_outside_limits_are_refused() {
        assert!(create(4).is_err());
        assert!(create(layout::MAX_MEM_MIB + 1).is_err());
        assert!(create(layout::MIN_MEM_MIB).is_ok());
    }
}
