//! Credentials and confinement: ids, capabilities, prctl, seccomp,
//! resource limits.

use std::io;
use std::ptr;

use super::{cvt, cvt_long};

/// `setgroups(2)`, as the raw syscall like [`setgid_all`]: glibc's
/// wrapper would signal every thread of its thread list to change too, and
/// a container's init, cloned on the agent's memory (`vfork.rs`), sees the
/// agent's threads in that list: it would signal tids of its own pid
/// namespace (tid 1 is itself) and wait for them forever.
pub fn setgroups(gids: &[u32]) -> io::Result<()> {
    // SAFETY: the pointer and length describe `gids`.
    cvt_long(unsafe { libc::syscall(libc::SYS_setgroups, gids.len(), gids.as_ptr()) })?;
    Ok(())
}

/// `setresgid(2)` with one gid for all three. The raw syscall changes only
/// this thread, which is all there is in a container's process (and glibc's
/// wrapper must not run there: see [`setgroups`]).
pub fn setgid_all(gid: u32) -> io::Result<()> {
    // SAFETY: no pointers involved.
    cvt_long(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })?;
    Ok(())
}

/// `setresuid(2)` with one uid for all three (raw, see [`setgid_all`]).
pub fn setuid_all(uid: u32) -> io::Result<()> {
    // SAFETY: no pointers involved.
    cvt_long(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })?;
    Ok(())
}

/// `umask(2)`; returns the previous mask.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask) }
}

const PR_SET_PDEATHSIG: libc::c_int = 1;

const PR_SET_KEEPCAPS: libc::c_int = 8;

const PR_CAPBSET_DROP: libc::c_int = 24;

const PR_SET_CHILD_SUBREAPER: libc::c_int = 36;

const PR_SET_NO_NEW_PRIVS: libc::c_int = 38;

const PR_CAP_AMBIENT: libc::c_int = 47;

const PR_CAP_AMBIENT_RAISE: libc::c_ulong = 2;

const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;

fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> io::Result<()> {
    // SAFETY: every option used here takes integer arguments only.
    cvt(unsafe { libc::prctl(option, arg2, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong) })?;
    Ok(())
}

/// `PR_SET_KEEPCAPS`.
pub fn set_keepcaps(on: bool) -> io::Result<()> {
    prctl(PR_SET_KEEPCAPS, on.into(), 0)
}

/// `PR_SET_NO_NEW_PRIVS`.
pub fn set_no_new_privs() -> io::Result<()> {
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0)
}

/// One classic BPF instruction: the kernel's `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct SockFilter {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

impl SockFilter {
    /// Instructions from their in-memory bytes (8 each, native endian), as
    /// libseccomp exports them; `None` if the length is not a multiple of 8.
    pub fn parse(bytes: &[u8]) -> Option<Vec<SockFilter>> {
        let chunks = bytes.chunks_exact(8);
        if !chunks.remainder().is_empty() {
            return None;
        }
        Some(
            chunks
                .map(|c| SockFilter {
                    code: u16::from_ne_bytes([c[0], c[1]]),
                    jt: c[2],
                    jf: c[3],
                    k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
                })
                .collect(),
        )
    }
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)`. It leaves
/// no_new_privs alone (the OCI process decides).
pub fn seccomp_set_filter(prog: &[SockFilter], flags: libc::c_ulong) -> io::Result<()> {
    let len = u16::try_from(prog.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seccomp filter too long"))?;
    let fprog = libc::sock_fprog {
        len,
        // SockFilter is the kernel's struct sock_filter (repr(C) u16, u8,
        // u8, u32), as is libc's.
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `len` valid instructions for the duration of
    // the call; the kernel copies them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `PR_SET_CHILD_SUBREAPER`.
pub fn set_child_subreaper() -> io::Result<()> {
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0)
}

/// `PR_SET_PDEATHSIG`.
pub fn set_parent_death_signal(signal: libc::c_int) -> io::Result<()> {
    prctl(PR_SET_PDEATHSIG, signal as libc::c_ulong, 0)
}

/// Drops one capability from the bounding set.
pub fn capbset_drop(cap: u32) -> io::Result<()> {
    prctl(PR_CAPBSET_DROP, cap.into(), 0)
}

/// Clears the ambient set.
pub fn cap_ambient_clear() -> io::Result<()> {
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0)
}

/// Raises one capability in the ambient set.
pub fn cap_ambient_raise(cap: u32) -> io::Result<()> {
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap.into())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `capset(2)` for the calling thread; each set is a bitmask by cap number.
pub fn capset(effective: u64, permitted: u64, inheritable: u64) -> io::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: effective as u32,
            permitted: permitted as u32,
            inheritable: inheritable as u32,
        },
        CapData {
            effective: (effective >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: (inheritable >> 32) as u32,
        },
    ];
    // SAFETY: version 3 reads one header and two data structs, both valid.
    cvt_long(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) })?;
    Ok(())
}

/// `prlimit(2)` on the calling process.
pub fn setrlimit(resource: libc::c_int, soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `limit` is valid to read; the old-limit pointer is null.
    cvt(unsafe { libc::prlimit64(0, resource as _, &limit, ptr::null_mut()) })?;
    Ok(())
}
