//! The raw image file behind a virtio-blk device.
//!
//! Buffered I/O goes straight between the file and guest memory (no copy
//! in husk). With O_DIRECT, guest buffers need not meet the host's
//! alignment, so I/O goes through an aligned bounce buffer instead. Data
//! is only ever written where the guest writes: sparse images stay sparse.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::{BlockError, SECTOR_SIZE};
use crate::devices::virtio::queue::Segment;
use crate::devices::virtio::GuestMem;

/// Bounce buffer size for direct I/O; larger requests go in chunks.
const BOUNCE_SIZE: usize = 1 << 20;
/// Memory alignment of the bounce buffer (enough for any logical block size).
const BOUNCE_ALIGN: usize = 4096;

/// Errors doing I/O for a request.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}+{len} bytes are beyond the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Capacity in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The host file I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Guest memory could not be accessed.
    #[error("guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// A 4 KiB-aligned window inside a plain Vec (no unsafe allocation).
struct Bounce {
    buf: Vec<u8>,
    start: usize,
}

impl Bounce {
    fn new() -> Self {
        let buf = vec![0u8; BOUNCE_SIZE + BOUNCE_ALIGN];
        let start = buf.as_ptr().align_offset(BOUNCE_ALIGN);
        Self { buf, start }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.buf[self.start..self.start + len]
    }
}

/// An open disk image.
pub struct Disk {
    file: File,
    path: String,
    capacity: u64,
    read_only: bool,
    bounce: Option<Bounce>,
}

impl Disk {
    /// Opens `path`: read-only or read-write, optionally with O_DIRECT.
    /// The image is locked (shared when read-only, exclusive otherwise) so
    /// two VMs cannot write one image.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, BlockError> {
        let shown = path.display().to_string();
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts
            .open(path)
            .map_err(|e| BlockError::Open(shown.clone(), e))?;
        let how = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock only takes a valid fd (owned by `file`) and flags.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
                BlockError::Locked(shown)
            } else {
                BlockError::Open(shown, e)
            });
        }
        // Block devices report size 0 in metadata; seeking to the end works for both.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| BlockError::Size(shown.clone(), e))?;
        let disk = Self {
            file,
            path: shown,
            capacity: size / SECTOR_SIZE,
            read_only,
            bounce: direct.then(Bounce::new),
        };
        if direct && disk.capacity > 1 {
            // Fail now, with a clear message, if the host cannot do
            // sector-sized direct I/O on this file.
            let mut probe = Bounce::new();
            disk.file
                .read_exact_at(probe.get(SECTOR_SIZE as usize), SECTOR_SIZE)
                .map_err(|e| BlockError::Direct(disk.path.clone(), e))?;
        }
        Ok(disk)
    }

    /// Capacity in 512-byte sectors (a partial last sector is left out).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image path, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn check_range(&self, sector: u64, len: u64) -> Result<u64, DiskError> {
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(len));
        match end {
            Some(end) if end <= self.capacity * SECTOR_SIZE => Ok(sector * SECTOR_SIZE),
            _ => Err(DiskError::OutOfRange {
                sector,
                len,
                capacity: self.capacity,
            }),
        }
    }

    /// Reads from `sector` into the guest buffers `data`; returns the bytes read.
    pub fn read(
        &mut self,
        mem: &GuestMem,
        sector: u64,
        data: &[Segment],
    ) -> Result<u64, DiskError> {
        let len = total(data);
        let mut offset = self.check_range(sector, len)?;
        match self.bounce.as_mut() {
            None => {
                self.file.seek(SeekFrom::Start(offset))?;
                for s in data {
                    mem.read_exact_volatile_from(s.addr, &mut self.file, s.len as usize)?;
                }
            }
            Some(bounce) => {
                let mut cursor = SegCursor::new(data);
                let mut left = len;
                while left > 0 {
                    let n = left.min(BOUNCE_SIZE as u64) as usize;
                    let buf = bounce.get(n);
                    self.file.read_exact_at(buf, offset)?;
                    cursor.copy_to_guest(mem, buf)?;
                    offset += n as u64;
                    left -= n as u64;
                }
            }
        }
        Ok(len)
    }

    /// Writes the guest buffers `data` at `sector`.
    pub fn write(
        &mut self,
        mem: &GuestMem,
        sector: u64,
        data: &[Segment],
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let len = total(data);
        let mut offset = self.check_range(sector, len)?;
        match self.bounce.as_mut() {
            None => {
                self.file.seek(SeekFrom::Start(offset))?;
                for s in data {
                    mem.write_all_volatile_to(s.addr, &mut self.file, s.len as usize)?;
                }
            }
            Some(bounce) => {
                let mut cursor = SegCursor::new(data);
                let mut left = len;
                while left > 0 {
                    let n = left.min(BOUNCE_SIZE as u64) as usize;
                    let buf = bounce.get(n);
                    cursor.copy_from_guest(mem, buf)?;
                    self.file.write_all_at(buf, offset)?;
                    offset += n as u64;
                    left -= n as u64;
                }
            }
        }
        Ok(())
    }

    /// Makes completed writes durable (fdatasync). A no-op when read-only.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()?;
        Ok(())
    }
}

fn total(data: &[Segment]) -> u64 {
    data.iter().map(|s| u64::from(s.len)).sum()
}

/// Walks guest segments while copying through the bounce buffer.
struct SegCursor<'a> {
    segs: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> SegCursor<'a> {
    fn new(segs: &'a [Segment]) -> Self {
        Self {
            segs,
            index: 0,
            offset: 0,
        }
    }

    /// Calls `f(guest address, range of buf)` for consecutive pieces of
    /// the segments until `len` bytes are covered.
    fn walk(
        &mut self,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
    ) -> Result<(), DiskError> {
        let mut done = 0usize;
        while done < len {
            let Some(s) = self.segs.get(self.index) else {
                break;
            };
            let n = ((s.len - self.offset) as usize).min(len - done);
            f(
                GuestAddress(s.addr.0 + u64::from(self.offset)),
                done..done + n,
            )?;
            done += n;
            self.offset += n as u32;
            if self.offset == s.len {
                self.index += 1;
                self.offset = 0;
            }
        }
        Ok(())
    }

    fn copy_to_guest(&mut self, mem: &GuestMem, buf: &[u8]) -> Result<(), DiskError> {
        self.walk(buf.len(), |addr, r| mem.write_slice(&buf[r], addr))
    }

    fn copy_from_guest(&mut self, mem: &GuestMem, buf: &mut [u8]) -> Result<(), DiskError> {
        let len = buf.len();
        self.walk(len, |addr, r| mem.read_slice(&mut buf[r], addr))
    }
}
