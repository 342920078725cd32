//! Thin safe wrappers over the Linux system calls the agent needs. All FFI
//! of the crate lives here (and in `vsock.rs`, `vfork.rs`); callers add
//! context. `mount.rs`: mounts, namespaces, names, directory-relative
//! files; `process.rs`: fork, exec, wait, signals; `creds.rs`: ids,
//! capabilities, seccomp, limits; `fd.rs`: descriptors and terminals;
//! here: clocks, entropy, block devices, reboot. All re-exported here.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

mod creds;
mod fd;
mod mount;
mod process;

pub use creds::*;
pub use fd::*;
pub use mount::*;
pub use process::*;

/// Turns a `-1` return into the thread's `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A path as a C string; paths with NUL bytes are invalid input.
pub fn cpath(path: &Path) -> io::Result<CString> {
    cstring(path.as_os_str())
}

/// An OS string as a C string.
pub fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `sync(2)`.
pub fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
}

/// `reboot(RB_AUTOBOOT)`: ends the VM (the VMM sees the reset). Refused
/// unless the caller is PID 1, so that a test or debug run as root on a
/// host can never reboot the host.
pub fn reboot() -> io::Error {
    if getpid() != 1 {
        return io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not PID 1: refusing to reboot",
        );
    }
    // SAFETY: no pointers involved; only returns on failure.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// Nanoseconds of `CLOCK_BOOTTIME` (time since the kernel started).
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_BOOTTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Mixes `bytes` into the kernel's input pool, credited as entropy
/// (`RNDADDENTROPY`), then reseeds the CRNG from the pool at once
/// (`RNDRESEEDCRNG`), so random numbers read afterwards depend on them.
pub fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    const RNDADDENTROPY: u32 = 0x4008_5203; // _IOW('R', 3, int[2])
    const RNDRESEEDCRNG: u32 = 0x5207; // _IO('R', 7)
    let len = i32::try_from(bytes.len())
        .ok()
        .filter(|&n| n <= i32::MAX / 8)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&(len * 8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: the kernel reads the header and `buf_size` bytes after it,
    // all inside `info`, which outlives the call.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) })?;
    Ok(())
}

/// Sets CLOCK_REALTIME to `ns` since the epoch.
pub fn set_realtime(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(ns / 1_000_000_000)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec for the duration of the call.
    cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok(())
}

/// Drops the cached blocks of block device `dev` (`BLKFLSBUF`): a disk
/// swapped under a VM restored from a template must not be read through
/// the page cache of the placeholder the template was booted with.
pub fn flush_block_cache(dev: &std::fs::File) -> io::Result<()> {
    const BLKFLSBUF: u32 = 0x1261; // _IO(0x12, 97)
                                   // SAFETY: BLKFLSBUF takes no argument.
    cvt(unsafe { libc::ioctl(dev.as_raw_fd(), BLKFLSBUF as _) })?;
    Ok(())
}

/// The size of block device `dev` in bytes (`BLKGETSIZE64`).
pub fn block_size_bytes(dev: &std::fs::File) -> io::Result<u64> {
    const BLKGETSIZE64: u32 = 0x8008_1272; // _IOR(0x12, 114, size_t)
    let mut size: u64 = 0;
    // SAFETY: the kernel writes one u64 to `size`, which outlives the call.
    cvt(unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64 as _, &mut size) })?;
    Ok(size)
}
