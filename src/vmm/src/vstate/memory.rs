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
    fn sizes_outside_limits_are_refused() {
        assert!(create(4).is_err());
        assert!(create(layout::MAX_MEM_MIB + 1).is_err());
        assert!(create(layout::MIN_MEM_MIB).is_ok());
    }
}
