//! The fill device: the guest asks the VMM to fill a range of its RAM with
//! a repeated pattern, or to copy one, done natively instead of by guest
//! stores; and to write console text, one request instead of two UART
//! register exits a byte.
//!
//! Where /dev/kvm is kvm_pvm, guest kernel code is interpreted by KVM's
//! instruction emulator: every store costs ~0.5 µs. The husk guest kernel
//! fills its boot memmap (64 bytes per 4 KiB page of guest RAM, all alike)
//! and copies an initramfs's files into their pages through this device
//! when the command line names its port (`husk_fill=PORT`, added by husk on
//! kvm_pvm hosts; resources/guest/README.md); its 8250 console sends its
//! text here too, which goes out on COM1's sink as the UART's would.
//!
//! Protocol: the guest writes, with one 32-bit `out` to the device's port,
//! the guest physical address (below 4 GiB) of a request in its RAM:
//!
//! | offset | size | field                                        |
//! |--------|------|----------------------------------------------|
//! | 0      | 4    | op: 1 = fill, 2 = copy, 3 = console text     |
//! | 4      | 4    | status, written by the VMM: 0 done, 1 refused |
//! | 8      | 8    | dst: guest physical address (console: the text) |
//! | 16     | 8    | len: bytes to fill, copy or write (console: at most 4096) |
//! | 24     | 8    | fill: pattern length, 1..=64; copy: source address |
//! | 32     | 64   | fill: the pattern                            |
//!
//! A copy's source and destination must not overlap.
//!
//! The fill is done when the `out` returns. A guest sets the status to
//! something other than 0 before and does the work itself unless it reads
//! 0 back, so a VMM without the device (or one that refuses the request)
//! costs it nothing but the `out`. A port, not MMIO: the guest kernel
//! needs no mapping for it this early in boot. Everything in a
//! request is the guest's to choose: the VMM only ever writes inside guest
//! RAM, and a request it cannot read is dropped with a log line.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::legacy::SerialDevice;
use crate::vstate::bus::BusDevice;

/// Size of a request in guest memory.
pub const REQUEST_LEN: usize = 96;
/// Fill `dst` with the pattern.
pub const OP_FILL: u32 = 1;
/// Copy `len` bytes from the source address to `dst`.
pub const OP_COPY: u32 = 2;
/// Write the `len` bytes at `dst` to the console (COM1's sink).
pub const OP_CONSOLE: u32 = 3;
/// Most console text in one request.
pub const MAX_CONSOLE: u64 = 4096;
/// Status: the range was filled.
pub const STATUS_DONE: u32 = 0;
/// Status: the request was refused (unknown op, bad pattern, range not RAM).
pub const STATUS_REFUSED: u32 = 1;
/// Longest pattern.
pub const MAX_PATTERN: usize = 64;
/// Bytes written per guest-memory write while filling.
const CHUNK: usize = 64 << 10;

/// Why a request was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FillError {
    /// Not one of the ops.
    #[error("unknown op {0}")]
    Op(u32),
    /// Console text longer than `MAX_CONSOLE`, or no console.
    #[error("console text of {0} bytes (at most {MAX_CONSOLE}, and only with a console)")]
    Console(u64),
    /// A copy whose source and destination overlap.
    #[error("copy {src:#x} -> {dst:#x} ({len:#x} bytes) overlaps")]
    Overlap {
        /// Source.
        src: u64,
        /// Destination.
        dst: u64,
        /// Length.
        len: u64,
    },
    /// Pattern length 0 or above `MAX_PATTERN`.
    #[error("pattern length {0}")]
    Pattern(u64),
    /// `[dst, dst + len)` is not all guest RAM.
    #[error("range {dst:#x}+{len:#x} is not guest RAM")]
    Range {
        /// Start.
        dst: u64,
        /// Length.
        len: u64,
    },
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillRequest {
    op: u32,
    dst: u64,
    len: u64,
    pattern_len: u64,
    pattern: [u8; MAX_PATTERN],
}

impl FillRequest {
    /// Parses the guest's bytes.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let mut pattern = [0u8; MAX_PATTERN];
        pattern.copy_from_slice(&b[32..32 + MAX_PATTERN]);
        Self {
            op: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            dst: u64_at(8),
            len: u64_at(16),
            pattern_len: u64_at(24),
            pattern,
        }
    }

    /// Carries the request out on `mem` (console text goes to `console`).
    pub fn execute(
        &self,
        mem: &GuestMemoryMmap,
        console: Option<&Mutex<SerialDevice>>,
    ) -> Result<(), FillError> {
        match self.op {
            OP_FILL => self.fill(mem),
            OP_COPY => self.copy(mem),
            OP_CONSOLE => self.console(mem, console),
            op => Err(FillError::Op(op)),
        }
    }

    fn console(
        &self,
        mem: &GuestMemoryMmap,
        console: Option<&Mutex<SerialDevice>>,
    ) -> Result<(), FillError> {
        let Some(console) = console.filter(|_| self.len <= MAX_CONSOLE) else {
            return Err(FillError::Console(self.len));
        };
        let len = Self::ram_len(mem, self.dst, self.len)?;
        let mut text = vec![0u8; len];
        mem.read_slice(&mut text, GuestAddress(self.dst))
            .map_err(|_| FillError::Range {
                dst: self.dst,
                len: self.len,
            })?;
        console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_text(&text);
        Ok(())
    }

    /// `dst..dst + len` as a checked length, if it is all guest RAM.
    fn ram_len(mem: &GuestMemoryMmap, dst: u64, len: u64) -> Result<usize, FillError> {
        let range = FillError::Range { dst, len };
        let n = usize::try_from(len).map_err(|_| range.clone())?;
        if n != 0 && !mem.check_range(GuestAddress(dst), n) {
            return Err(range);
        }
        Ok(n)
    }

    fn copy(&self, mem: &GuestMemoryMmap) -> Result<(), FillError> {
        let (src, dst) = (self.pattern_len, self.dst);
        let len = Self::ram_len(mem, dst, self.len)?;
        Self::ram_len(mem, src, self.len)?;
        if len == 0 {
            return Ok(());
        }
        // Both ranges are RAM, so neither end overflows.
        if src < dst + self.len && dst < src + self.len {
            return Err(FillError::Overlap {
                src,
                dst,
                len: self.len,
            });
        }
        let mut buf = vec![0u8; CHUNK.min(len)];
        let mut done = 0usize;
        while done < len {
            let n = buf.len().min(len - done);
            let range = || FillError::Range { dst, len: self.len };
            mem.read_slice(&mut buf[..n], GuestAddress(src + done as u64))
                .map_err(|_| range())?;
            mem.write_slice(&buf[..n], GuestAddress(dst + done as u64))
                .map_err(|_| range())?;
            done += n;
        }
        Ok(())
    }

    fn fill(&self, mem: &GuestMemoryMmap) -> Result<(), FillError> {
        let plen = match usize::try_from(self.pattern_len) {
            Ok(p @ 1..=MAX_PATTERN) => p,
            _ => return Err(FillError::Pattern(self.pattern_len)),
        };
        let len = Self::ram_len(mem, self.dst, self.len)?;
        if len == 0 {
            return Ok(());
        }
        let range = FillError::Range {
            dst: self.dst,
            len: self.len,
        };
        // A whole number of patterns per chunk keeps the phase across chunks.
        let per_chunk = (CHUNK / plen) * plen;
        let chunk: Vec<u8> = self.pattern[..plen]
            .iter()
            .copied()
            .cycle()
            .take(per_chunk.min(len))
            .collect();
        let mut done = 0usize;
        while done < len {
            let n = chunk.len().min(len - done);
            mem.write_slice(&chunk[..n], GuestAddress(self.dst + done as u64))
                .map_err(|_| range.clone())?;
            done += n;
        }
        Ok(())
    }
}

/// The device on the port bus.
pub struct FillDevice {
    mem: GuestMemoryMmap,
    console: Option<Arc<Mutex<SerialDevice>>>,
}

impl FillDevice {
    /// A device that fills inside `mem`, and writes console text to
    /// `console`'s sink (refused without one).
    pub fn new(mem: GuestMemoryMmap, console: Option<Arc<Mutex<SerialDevice>>>) -> Self {
        Self { mem, console }
    }

    fn handle(&self, request_gpa: u64) {
        let mut raw = [0u8; REQUEST_LEN];
        if self
            .mem
            .read_slice(&mut raw, GuestAddress(request_gpa))
            .is_err()
        {
            tracing::warn!("fill device: request at {request_gpa:#x} is not in guest RAM");
            return;
        }
        let req = FillRequest::parse(&raw);
        let status = match req.execute(&self.mem, self.console.as_deref()) {
            Ok(()) => {
                tracing::debug!(
                    "fill device: op {} done at {:#x}+{:#x}",
                    req.op,
                    req.dst,
                    req.len
                );
                STATUS_DONE
            }
            Err(e) => {
                tracing::warn!("fill device: refused: {e}");
                STATUS_REFUSED
            }
        };
        // The request was readable, so its status field is writable.
        let _ = self
            .mem
            .write_slice(&status.to_le_bytes(), GuestAddress(request_gpa + 4));
    }
}

impl BusDevice for FillDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
            self.handle(u64::from(u32::from_le_bytes(bytes)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn request(op: u32, dst: u64, len: u64, pattern: &[u8]) -> [u8; REQUEST_LEN] {
        let mut r = [0u8; REQUEST_LEN];
        r[0..4].copy_from_slice(&op.to_le_bytes());
        r[4..8].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        r[8..16].copy_from_slice(&dst.to_le_bytes());
        r[16..24].copy_from_slice(&len.to_le_bytes());
        r[24..32].copy_from_slice(&(pattern.len() as u64).to_le_bytes());
        r[32..32 + pattern.len()].copy_from_slice(pattern);
        r
    }

    /// Posts `req` at 0x1000 through the bus interface; returns the status.
    fn post(m: &GuestMemoryMmap, req: &[u8; REQUEST_LEN]) -> u32 {
        m.write_slice(req, GuestAddress(0x1000)).unwrap();
        FillDevice::new(m.clone(), None).write(0, &0x1000u32.to_le_bytes());
        let mut s = [0u8; 4];
        m.read_slice(&mut s, GuestAddress(0x1004)).unwrap();
        u32::from_le_bytes(s)
    }

    #[test]
    fn fills_a_range_with_the_pattern_in_phase_across_chunks() {
        let m = mem();
        let pattern: Vec<u8> = (1..=48).collect();
        let len = 3 * CHUNK as u64 + 17;
        assert_eq!(
            post(&m, &request(OP_FILL, 0x2000, len, &pattern)),
            STATUS_DONE
        );
        let mut got = vec![0u8; len as usize + 2];
        m.read_slice(&mut got, GuestAddress(0x1fff)).unwrap();
        assert_eq!(got[0], 0, "byte before the range untouched");
        assert_eq!(*got.last().unwrap(), 0, "byte after the range untouched");
        for (i, b) in got[1..=len as usize].iter().enumerate() {
            assert_eq!(*b, pattern[i % 48], "byte {i}");
        }
    }

    #[test]
    fn refuses_bad_requests_and_writes_nothing() {
        let m = mem();
        let cases = [
            request(9, 0x2000, 64, &[7; 8]),
            request(OP_FILL, 0x2000, 64, &[]),
            request(OP_FILL, (1 << 20) - 8, 64, &[7; 8]),
            request(OP_FILL, u64::MAX - 4, 64, &[7; 8]),
        ];
        for r in &cases {
            assert_eq!(post(&m, r), STATUS_REFUSED);
        }
        let mut over = request(OP_FILL, 0x2000, 64, &[7; 8]);
        over[24..32].copy_from_slice(&65u64.to_le_bytes());
        assert_eq!(post(&m, &over), STATUS_REFUSED);
        let mut tail = [0u8; 8];
        m.read_slice(&mut tail, GuestAddress((1 << 20) - 8))
            .unwrap();
        assert_eq!(tail, [0; 8]);
        let mut head = [0u8; 64];
        m.read_slice(&mut head, GuestAddress(0x2000)).unwrap();
        assert_eq!(head, [0; 64]);
    }

    /// A COM1 whose sink collects what it is given.
    fn console() -> (Arc<Mutex<SerialDevice>>, Arc<Mutex<Vec<u8>>>) {
        let sink = crate::devices::legacy::TestSink::default();
        let evt = || vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = SerialDevice::new(evt(), evt(), Box::new(sink.clone()));
        (Arc::new(Mutex::new(serial)), sink.0)
    }

    #[test]
    fn console_text_goes_to_the_serial_sink() {
        let m = mem();
        let (serial, out) = console();
        let mut d = FillDevice::new(m.clone(), Some(serial));
        let status = |m: &GuestMemoryMmap| {
            let mut s = [0u8; 4];
            m.read_slice(&mut s, GuestAddress(0x1004)).unwrap();
            u32::from_le_bytes(s)
        };
        let text = b"[    0.000000] Linux version 6.1\r\n";
        m.write_slice(text, GuestAddress(0x3000)).unwrap();
        let send = |d: &mut FillDevice, req: [u8; REQUEST_LEN]| {
            m.write_slice(&req, GuestAddress(0x1000)).unwrap();
            d.write(0, &0x1000u32.to_le_bytes());
        };
        send(&mut d, request(OP_CONSOLE, 0x3000, text.len() as u64, &[]));
        assert_eq!(status(&m), STATUS_DONE);
        assert_eq!(out.lock().unwrap().as_slice(), text);
        // Too long, outside RAM, or no console: refused, nothing written.
        for (dst, len) in [
            (0x3000, MAX_CONSOLE + 1),
            ((1 << 20) - 8, 64),
            (u64::MAX - 4, 64),
        ] {
            send(&mut d, request(OP_CONSOLE, dst, len, &[]));
            assert_eq!(status(&m), STATUS_REFUSED, "{dst:#x}+{len}");
        }
        // `post` uses a device without a console.
        let req = request(OP_CONSOLE, 0x3000, text.len() as u64, &[]);
        assert_eq!(post(&m, &req), STATUS_REFUSED);
        assert_eq!(out.lock().unwrap().as_slice(), text);
    }

    #[test]
    fn ignores_unreadable_requests_and_other_stores() {
        let m = mem();
        let mut d = FillDevice::new(m.clone(), None);
        d.write(0, &(2u32 << 20).to_le_bytes()); // request outside RAM
        d.write(0, &[0x10, 0]); // not a 32-bit write
        d.write(2, &0x1000u32.to_le_bytes()); // not at the doorbell
        let mut buf = [0xffu8; 4];
        d.read(0, &mut buf);
        assert_eq!(buf, [0; 4]);
    }

    fn copy_request(src: u64, dst: u64, len: u64) -> [u8; REQUEST_LEN] {
        let mut r = request(OP_COPY, dst, len, &[]);
        r[24..32].copy_from_slice(&src.to_le_bytes());
        r
    }

    #[test]
    fn copies_a_range_across_chunks() {
        let m = mem();
        let len = 2 * CHUNK + 5;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        m.write_slice(&data, GuestAddress(0x2000)).unwrap();
        let dst = 0x2000 + len as u64 + 0x100;
        assert_eq!(
            post(&m, &copy_request(0x2000, dst, len as u64)),
            STATUS_DONE
        );
        let mut got = vec![0u8; len + 1];
        m.read_slice(&mut got, GuestAddress(dst)).unwrap();
        assert_eq!(&got[..len], &data[..]);
        assert_eq!(got[len], 0, "byte after the copy untouched");
    }

    #[test]
    fn refuses_overlapping_or_outside_copies() {
        let m = mem();
        m.write_slice(&[9u8; 64], GuestAddress(0x2000)).unwrap();
        let top = (1u64 << 20) - 16;
        for r in [
            copy_request(0x2000, 0x2020, 64),
            copy_request(0x2020, 0x2000, 64),
            copy_request(0x2000, top, 64),
            copy_request(top, 0x4000, 64),
            copy_request(u64::MAX - 8, 0x4000, 64),
        ] {
            assert_eq!(post(&m, &r), STATUS_REFUSED);
        }
        let mut probe = [0u8; 16];
        m.read_slice(&mut probe, GuestAddress(top)).unwrap();
        assert_eq!(probe, [0; 16]);
        m.read_slice(&mut probe, GuestAddress(0x4000)).unwrap();
        assert_eq!(probe, [0; 16]);
    }

    #[test]
    fn a_zero_length_fill_is_done() {
        let m = mem();
        assert_eq!(post(&m, &request(OP_FILL, 0x2000, 0, &[1])), STATUS_DONE);
    }
}
