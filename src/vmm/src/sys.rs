//! Thin wrappers over the libc calls std does not offer, shared by the
//! VMM's parts: paths as C strings, `open(2)` with any flags (`O_PATH`),
//! `fstat(2)` of a descriptor, eventfds, the kernel's RNG, a rename that
//! does not replace, signal sets and the calling thread's signal mask.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `p` as a NUL-terminated string.
pub fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// `open(2)` of `p` with `flags` (and `O_CLOEXEC`).
pub fn open_path(p: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = c_path(p)?;
    // SAFETY: open(2) of a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat(2)` of `fd`.
pub fn fstat(fd: &impl AsRawFd) -> io::Result<libc::stat> {
    // SAFETY: all-zero bytes are a valid `stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open; `st` is a valid out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Renames `from` to `to` unless `to` exists (`renameat2(2)` with
/// RENAME_NOREPLACE: an existing `to` is `AlreadyExists`).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (c_path(from)?, c_path(to)?);
    // SAFETY: renameat2(2) of two NUL-terminated paths relative to the
    // working directory; the result is checked.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A non-blocking, close-on-exec eventfd: every eventfd of the VMM's (a
/// process that starts virtiofsd) is made here.
pub fn eventfd() -> io::Result<vmm_sys_util::eventfd::EventFd> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// A signal set holding `signals`.
pub fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    for &sig in signals {
        // SAFETY: as above; sig is a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// `pthread_sigmask(3)` of the calling thread: `how` (SIG_BLOCK,
/// SIG_UNBLOCK, SIG_SETMASK) with `set`; the previous mask into `old`.
pub fn sigmask(
    how: libc::c_int,
    set: &libc::sigset_t,
    old: Option<&mut libc::sigset_t>,
) -> io::Result<()> {
    let old = old.map_or(std::ptr::null_mut(), |o| o as *mut _);
    // SAFETY: `set` is initialised; `old` is null or a valid sigset_t.
    let rc = unsafe { libc::pthread_sigmask(how, set, old) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Fills `buf` from the kernel's RNG (getrandom(2): no /dev needed, so it
/// works in a jail).
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom(2) writes at most `rest.len()` bytes into `rest`.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += got as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_fstat_and_random() {
        let fd = open_path(Path::new("/proc"), libc::O_PATH | libc::O_DIRECTORY).unwrap();
        assert_eq!(fstat(&fd).unwrap().st_mode & libc::S_IFMT, libc::S_IFDIR);
        assert!(c_path(Path::new("a\0b")).is_err());
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
    }
}
