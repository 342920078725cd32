//! Length-prefixed JSON frames: a 4-byte big-endian length, then that many
//! bytes of UTF-8 JSON.
//!
//! The reader never buffers past the end of a frame, so raw bytes that
//! follow a frame on the same stream (the stdio connections) stay in the
//! stream. Do not wrap a stdio stream in a `BufReader` before reading its
//! first frame.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest frame body either side accepts or sends (1 MiB). A CreateContainer
/// request with a large OCI spec is a few KiB; the limit only bounds what a
/// hostile peer can make the reader allocate.
pub const MAX_FRAME_SIZE: u32 = 1 << 20;

/// Length of the frame header.
const HEADER_LEN: usize = 4;

/// Errors reading or writing one frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream cleanly between two frames.
    #[error("connection closed by peer")]
    Closed,
    /// The stream ended inside a frame.
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the header (or the header itself) promised.
        expected: usize,
        /// Bytes that arrived before end of stream.
        got: usize,
    },
    /// The header announces a body over [`MAX_FRAME_SIZE`]; nothing was read
    /// past the header.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_SIZE} bytes")]
    TooLarge(u64),
    /// The body is not valid UTF-8 JSON for the expected message.
    #[error("invalid message: {0}")]
    Json(#[source] serde_json::Error),
    /// The stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Serializes `msg` and writes it as one frame with a single `write_all`
/// (one vsock packet for small messages).
pub fn write_frame<W: Write + ?Sized, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut buf, msg).map_err(FrameError::Json)?;
    let len = buf.len() - HEADER_LEN;
    if len > MAX_FRAME_SIZE as usize {
        return Err(FrameError::TooLarge(len as u64));
    }
    buf[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's body, enforcing [`MAX_FRAME_SIZE`] before allocating.
pub fn read_frame_bytes<R: Read + ?Sized>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < HEADER_LEN {
        return Err(FrameError::Truncated {
            expected: HEADER_LEN,
            got,
        });
    }
    let len = u32::from_be_bytes(header);
    if len > MAX_FRAME_SIZE {
        return Err(FrameError::TooLarge(len.into()));
    }
    let mut body = vec![0u8; len as usize];
    let got = read_full(r, &mut body)?;
    if got < body.len() {
        return Err(FrameError::Truncated {
            expected: body.len(),
            got,
        });
    }
    Ok(body)
}

/// Reads one frame and decodes it as `T`.
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let body = read_frame_bytes(r)?;
    serde_json::from_slice(&body).map_err(FrameError::Json)
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
