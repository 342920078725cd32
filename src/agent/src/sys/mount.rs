//! Mounts, namespaces, host and domain names, and files made relative
//! to a directory descriptor.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::ptr;

use super::{cpath, cstring, cvt, cvt_long};

/// Mounts cgroup2 at `target` with `favordynmods` (where the kernel, 6.0
/// or later, knows it): moving a process between cgroups (every
/// container's init joins its own) and enabling controllers then take the
/// threadgroup lock without waiting for an RCU grace period, slow where
/// guest kernel code is emulated; forks pay an atomic instead. A mount in
/// the initial cgroup namespace sets the hierarchy's flags anew, so a
/// container's own mount passes it too.
pub fn mount_cgroup2(target: &Path, flags: u64) -> io::Result<()> {
    let src = Some(Path::new("cgroup2"));
    match mount(src, target, Some("cgroup2"), flags, Some("favordynmods")) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            mount(src, target, Some("cgroup2"), flags, None)
        }
        r => r,
    }
}

/// `mount(2)`.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: u64,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cpath).transpose()?;
    let target = cpath(target)?;
    let fstype = fstype.map(|s| cstring(OsStr::new(s))).transpose()?;
    let data = data
        .filter(|d| !d.is_empty())
        .map(|s| cstring(OsStr::new(s)))
        .transpose()?;
    // SAFETY: every pointer is either null or a NUL-terminated string that
    // outlives the call; the kernel copies what it needs.
    cvt(unsafe {
        libc::mount(
            source.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            flags as libc::c_ulong,
            data.as_ref().map_or(ptr::null(), |s| s.as_ptr().cast()),
        )
    })?;
    Ok(())
}

/// `umount2(2)`.
pub fn umount2(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = cpath(target)?;
    // SAFETY: `target` is a valid C string for the duration of the call.
    cvt(unsafe { libc::umount2(target.as_ptr(), flags) })?;
    Ok(())
}

/// `pivot_root(2)`.
pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let new_root = cpath(new_root)?;
    let put_old = cpath(put_old)?;
    // SAFETY: two valid C strings; the syscall takes no other memory.
    cvt_long(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) })?;
    Ok(())
}

/// `chroot(2)`.
pub fn chroot(path: &Path) -> io::Result<()> {
    let path = cpath(path)?;
    // SAFETY: a valid C string for the duration of the call.
    cvt(unsafe { libc::chroot(path.as_ptr()) })?;
    Ok(())
}

/// `unshare(2)`.
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: no pointers involved.
    cvt(unsafe { libc::unshare(flags) })?;
    Ok(())
}

/// `setns(2)`.
pub fn setns(fd: &OwnedFd, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor owned by the caller.
    cvt(unsafe { libc::setns(fd.as_raw_fd(), nstype) })?;
    Ok(())
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// `setdomainname(2)`.
pub fn setdomainname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    cvt(unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// A directory as an `O_PATH` descriptor for the `*at` calls, without
/// following a final symlink.
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let path = cpath(path)?;
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid C string; the fd is owned right below.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), flags) })?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mknodat(2)`: `name` in `dir`; `mode` holds the file type
/// (`S_IFCHR`, `S_IFBLK`, `S_IFIFO`) and the permission bits.
pub fn mknodat(dir: &OwnedFd, name: &OsStr, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let name = cstring(name)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: a valid descriptor and C string for the duration of the call.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) })?;
    Ok(())
}

/// `unlinkat(2)` of a non-directory `name` in `dir`.
pub fn unlinkat(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: a valid descriptor and C string for the duration of the call.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })?;
    Ok(())
}

/// `fchownat(2)` of `name` in `dir`, not following a symlink.
pub fn fchownat(dir: &OwnedFd, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    let name = cstring(name)?;
    let flags = libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: a valid descriptor and C string for the duration of the call.
    cvt(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, flags) })?;
    Ok(())
}

/// `fchmodat(2)` of `name` in `dir`.
pub fn fchmodat(dir: &OwnedFd, name: &OsStr, mode: u32) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: a valid descriptor and C string for the duration of the call.
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) })?;
    Ok(())
}

/// `symlinkat(2)`: `name` in `dir`, pointing at `target`.
pub fn symlinkat(target: &OsStr, dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let (target, name) = (cstring(target)?, cstring(name)?);
    // SAFETY: a valid descriptor and C strings for the duration of the call.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}
