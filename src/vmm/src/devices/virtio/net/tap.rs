//! A Linux tap opened by name (the FFI for virtio-net lives here).
//!
//! Opening a name that does not exist creates a tap that lives only as
//! long as this file descriptor: the kernel deletes it when husk exits, and
//! a tap someone else created is left alone.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::packet::VNET_HDR_LEN;
use super::NetError;

const IFNAMSIZ: usize = 16;
const IFF_UP: i16 = 0x1;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
// _IOW('T', n, int): direction 1 (write) << 30 | size 4 << 16 | 'T' << 8 | n.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `struct ifreq` with the flags member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> Self {
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
}

/// Whether `name` exists in this thread's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Checks an interface name the way the kernel will.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

/// An open tap, non-blocking, frames prefixed by a 12-byte virtio-net header.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    created: bool,
}

impl Tap {
    /// Opens tap `name`, creating it (up, for this process's lifetime) if absent.
    pub fn open(name: &str) -> Result<Self, NetError> {
        if !valid_name(name) {
            return Err(NetError::BadName(name.to_string()));
        }
        let existed = interface_exists(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let fd = OwnedFd::from(file);
        let err = |op| {
            let e = std::io::Error::last_os_error();
            NetError::Ioctl(name.to_string(), op, e)
        };
        let mut req = IfReq::new(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` has
        // its layout and size and outlives the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(err("TUNSETIFF"));
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(err("TUNSETVNETHDRSZ"));
        }
        // No offloads: the tap hands over plain frames with final checksums.
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(err("TUNSETOFFLOAD"));
        }
        let tap = Tap {
            fd,
            name: name.to_string(),
            created: !existed,
        };
        if tap.created {
            tap.set_up()
                .map_err(|e| NetError::Ioctl(name.to_string(), "SIOCSIFFLAGS", e))?;
        }
        Ok(tap)
    }

    /// Wraps any packet-preserving fd (tests use a socketpair).
    pub fn from_fd(fd: OwnedFd, name: &str) -> Self {
        Tap {
            fd,
            name: name.to_string(),
            created: false,
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether husk created this tap (it disappears when husk exits).
    pub fn created(&self) -> bool {
        self.created
    }

    fn set_up(&self) -> std::io::Result<()> {
        // SAFETY: plain socket(2) call; the result is checked.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `s` is a new socket nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(s) };
        let mut req = IfReq::new(&self.name, 0);
        // SAFETY: SIOCGIFFLAGS fills the flags of one `struct ifreq`.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.flags |= IFF_UP;
        // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one packet (header + frame) into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: read(2) writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one packet (header + frame).
    pub fn write(&self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: write(2) reads at most `buf.len()` bytes from `buf`.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("tap0"));
        assert!(valid_name("a23456789012345"));
        assert!(!valid_name("a234567890123456"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(".."));
        assert!(matches!(Tap::open("bad/name"), Err(NetError::BadName(_))));
    }

    #[test]
    fn a_tap_husk_creates_vanishes_with_it() {
        // In a private network namespace (this thread only), as root.
        let t = std::thread::spawn(|| {
            // A missing precondition fails rather than passing unrun.
            // SAFETY: unshare affects only this thread's namespaces.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "cannot unshare the network namespace (needs root)");
            assert!(Path::new("/dev/net/tun").exists(), "no /dev/net/tun");
            let tap = Tap::open("husktest0").unwrap();
            assert!(tap.created());
            assert!(interface_exists("husktest0"));
            drop(tap);
            assert!(!interface_exists("husktest0"), "deleted with its fd");
        });
        t.join().unwrap();
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
