//! A range bus: port I/O and MMIO addresses mapped to devices, each device
//! behind its own lock. The vCPU loop only ever asks the bus.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus. `offset` is relative to the start of
/// the range the device was inserted at.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting into a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// An address range `[base, base + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl BusRange {
    fn end(&self) -> u64 {
        self.base + self.len
    }
    fn overlaps(&self, other: &BusRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

// Ranges on a bus never overlap, so ordering by base is a total order.
impl Ord for BusRange {
    fn cmp(&self, other: &Self) -> Ordering {
        self.base.cmp(&other.base)
    }
}
impl PartialOrd for BusRange {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Devices by address range.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<BusRange, SharedDevice>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let range = BusRange { base, len };
        // The only candidates for overlap are the neighbours by base.
        let before = self.devices.range(..range).next_back();
        let after = self.devices.range(range..).next();
        if before
            .into_iter()
            .chain(after)
            .any(|(r, _)| r.overlaps(&range))
        {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(range, device);
        Ok(())
    }

    /// The device whose range holds all of `[addr, addr + size)`, with the
    /// offset of `addr` in it.
    pub fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let probe = BusRange { base: addr, len: 1 };
        let (range, dev) = self.devices.range(..=probe).next_back()?;
        let end = addr.checked_add(size as u64)?;
        (addr >= range.base && end <= range.end()).then(|| (addr - range.base, dev))
    }

    /// Dispatches a read; false if no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; false if no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A device whose lock was poisoned by a panic on another
/// thread keeps serving: its state is plain registers, and the VMM must not
/// die because of it.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn lookup_finds_the_right_device_and_offset() {
        let mut bus = Bus::new();
        let a = dev();
        let b = dev();
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        bus.insert(b.clone(), 0x110, 0x10).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x105, &mut d));
        assert_eq!(d[0], 5);
        assert!(bus.write(0x11f, &[7]));
        assert_eq!(b.lock().unwrap().last_write, Some((0xf, vec![7])));
        assert!(a.lock().unwrap().last_write.is_none());
        assert!(!bus.read(0xff, &mut d));
        assert!(!bus.read(0x120, &mut d));
    }

    #[test]
    fn accesses_crossing_a_range_end_are_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        let mut d = [0u8; 4];
        assert!(bus.read(0x10c, &mut d));
        assert!(!bus.read(0x10d, &mut d));
        assert!(!bus.write(u64::MAX - 1, &[0; 4]));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_rejected() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x10f, 2),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 2
            })
        );
        assert!(bus.insert(dev(), 0xf0, 0x11).is_err());
        assert!(bus.insert(dev(), 0x0, 0x1000).is_err());
        assert!(bus.insert(dev(), 0x104, 1).is_err());
        assert!(bus.insert(dev(), 0x100, 0x10).is_err());
        assert!(bus.insert(dev(), 0x200, 0).is_err());
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
        bus.insert(dev(), 0xf0, 0x10).unwrap();
        bus.insert(dev(), 0x110, 0x10).unwrap();
    }
}
