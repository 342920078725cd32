//! Parsing a virtio-blk request out of a flattened descriptor chain.
//!
//! A request is a device-readable header (type, reserved, sector), the
//! data (device-readable for writes, device-writable for reads), then one
//! device-writable status byte. No framing is assumed (virtio 1.x, 2.6.4):
//! the header may be split across buffers and the status byte may share a
//! buffer with data. Everything here is pure, so the fuzzer can drive it.

use vm_memory::{Address, Bytes, GuestAddress};

use super::{request_type, ID_BYTES, MAX_REQUEST_BYTES, REQUEST_HEADER_LEN, SECTOR_SIZE, SIZE_MAX};
use crate::devices::virtio::queue::Segment;
use crate::devices::virtio::GuestMem;

/// What the driver asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Anything else: answered with UNSUPP.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            request_type::IN => RequestType::In,
            request_type::OUT => RequestType::Out,
            request_type::FLUSH => RequestType::Flush,
            request_type::GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub request_type: RequestType,
    /// First sector (512 bytes each) for reads and writes.
    pub sector: u64,
    /// The data buffers, in order, without header or status byte.
    pub data: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total bytes in the data buffers.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Why a chain is not a valid request. When the status byte was found the
/// device answers IOERR; otherwise nothing can be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain does not end with a device-writable byte.
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    /// A device-readable buffer follows a device-writable one.
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 device-readable bytes.
    #[error("request header shorter than {REQUEST_HEADER_LEN} bytes")]
    HeaderTooShort,
    /// The header could not be read from guest memory.
    #[error("cannot read the request header")]
    HeaderUnreadable,
    /// Data buffers in the wrong direction for the request type.
    #[error("data buffers have the wrong direction for this request type")]
    WrongDirection,
    /// Read or write of a length that is not a whole number of sectors.
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    PartialSector(u64),
    /// A data segment longer than `size_max`.
    #[error("data segment of {0} bytes (size_max is {SIZE_MAX})")]
    SegmentTooLarge(u32),
    /// More data than one request may carry.
    #[error("{0} bytes of data (at most {MAX_REQUEST_BYTES} per request)")]
    TooLarge(u64),
}

/// The status byte's address: the last byte of the chain's final buffer,
/// which must be device-writable.
pub fn status_address(last: &Segment) -> Option<GuestAddress> {
    if !last.writable || last.len == 0 {
        return None;
    }
    last.addr.checked_add(u64::from(last.len) - 1)
}

/// Drops the first `n` bytes of `segs`.
fn skip_front(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        let len = u64::from(s.len);
        if n >= len {
            n -= len;
            continue;
        }
        // n < len <= u32::MAX, and the segment lies in guest memory.
        out.push(Segment {
            addr: s.addr.unchecked_add(n),
            len: (len - n) as u32,
            writable: s.writable,
        });
        n = 0;
    }
    out.retain(|s| s.len > 0);
    out
}

/// Reads the first `buf.len()` bytes of `segs`; false if they are short.
fn read_front(segs: &[Segment], mem: &GuestMem, buf: &mut [u8]) -> Result<(), RequestError> {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(s.len as usize);
        mem.read_slice(&mut buf[done..done + n], s.addr)
            .map_err(|_| RequestError::HeaderUnreadable)?;
        done += n;
    }
    if done < buf.len() {
        return Err(RequestError::HeaderTooShort);
    }
    Ok(())
}

/// Parses a request out of a chain's segments.
pub fn parse(segs: &[Segment], mem: &GuestMem) -> Result<Request, RequestError> {
    let last = segs.last().ok_or(RequestError::NoStatus)?;
    let status = status_address(last).ok_or(RequestError::NoStatus)?;
    let split = segs.iter().position(|s| s.writable).unwrap_or(segs.len());
    let (readable, writable) = segs.split_at(split);
    if writable.iter().any(|s| !s.writable) {
        return Err(RequestError::ReadableAfterWritable);
    }
    let mut header = [0u8; REQUEST_HEADER_LEN];
    read_front(readable, mem, &mut header)?;
    let request_type = RequestType::from(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let read_data = skip_front(readable, REQUEST_HEADER_LEN as u64);
    let mut write_data: Vec<Segment> = writable.to_vec();
    if let Some(l) = write_data.last_mut() {
        l.len -= 1; // the status byte
    }
    write_data.retain(|s| s.len > 0);

    let data = match request_type {
        RequestType::In | RequestType::GetId => {
            if !read_data.is_empty() {
                return Err(RequestError::WrongDirection);
            }
            write_data
        }
        RequestType::Out => {
            if !write_data.is_empty() {
                return Err(RequestError::WrongDirection);
            }
            read_data
        }
        RequestType::Flush | RequestType::Unsupported(_) => Vec::new(),
    };
    let req = Request {
        request_type,
        sector,
        data,
        status,
    };
    if matches!(request_type, RequestType::In | RequestType::Out) {
        // Before any I/O: one request is done in one go on the event loop.
        if let Some(s) = req.data.iter().find(|s| s.len > SIZE_MAX) {
            return Err(RequestError::SegmentTooLarge(s.len));
        }
        let len = req.data_len();
        if len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(len));
        }
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::PartialSector(len));
        }
    }
    Ok(req)
}

/// The GET_ID answer for a disk id: its bytes, zero-padded (not
/// terminated when exactly `ID_BYTES` long).
pub fn id_bytes(id: &str) -> [u8; ID_BYTES] {
    let mut out = [0u8; ID_BYTES];
    let b = id.as_bytes();
    let n = b.len().min(ID_BYTES);
    out[..n].copy_from_slice(&b[..n]);
    out
}
