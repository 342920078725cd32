//! Thin safe wrappers over the Linux system calls the agent needs. All FFI
//! of the crate lives here (and in `vsock.rs`, `vfork.rs`); callers add
//! context.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

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

/// Which side of a `fork` we are on.
pub enum Fork {
    /// The new process.
    Child,
    /// The caller; the child's pid.
    Parent(libc::pid_t),
}

/// `fork(2)` through glibc, whose atfork handlers keep `malloc` usable in
/// the child of a multithreaded parent.
///
/// # Safety
/// In the child, the caller must not touch locks that other threads of the
/// parent may have held (no stdout/stderr locks, no agent mutexes), and must
/// leave only through `exec` or `_exit`.
pub unsafe fn fork() -> io::Result<Fork> {
    // SAFETY: the caller upholds the child-side contract above.
    match cvt(unsafe { libc::fork() })? {
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid)),
    }
}

/// `_exit(2)`: leaves the process without running destructors or atexit
/// handlers (the right way out of a forked child).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` has no preconditions and does not return.
    unsafe { libc::_exit(code) }
}

/// `waitpid(2)`; `None` with `WNOHANG` when nothing changed.
pub fn waitpid(pid: libc::pid_t, flags: libc::c_int) -> io::Result<Option<(libc::pid_t, i32)>> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let ret = unsafe { libc::waitpid(pid, &mut status, flags) };
        match ret {
            -1 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Ok(None),
            pid => return Ok(Some((pid, status))),
        }
    }
}

/// `kill(2)`.
pub fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: no pointers involved.
    cvt(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// `setsid(2)`.
pub fn setsid() -> io::Result<()> {
    // SAFETY: no pointers involved.
    cvt(unsafe { libc::setsid() })?;
    Ok(())
}

/// Makes the terminal on `fd` the caller's controlling terminal.
pub fn set_controlling_tty(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument, no memory.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) })?;
    Ok(())
}

/// Sets a terminal's window size (`TIOCSWINSZ`).
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a `winsize` from the valid pointer.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Opens a pty master at `ptmx` and returns (master, slave); the slave is
/// opened through `TIOCGPTPEER`, so it belongs to the same devpts instance
/// without a path lookup.
pub fn open_pty(ptmx: &Path) -> io::Result<(OwnedFd, OwnedFd)> {
    let path = cpath(ptmx)?;
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: a valid C string; the returned fd is checked and owned below.
    let master = cvt(unsafe { libc::open(path.as_ptr(), flags) })?;
    // SAFETY: `master` was just opened by us and is not owned elsewhere.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from the valid pointer.
    cvt(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // SAFETY: TIOCGPTPEER takes open flags as its integer argument.
    let slave = cvt(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) })?;
    // SAFETY: the ioctl returned a new descriptor that nobody else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok((master, slave))
}

/// `dup2(2)`.
pub fn dup2(old: RawFd, new: RawFd) -> io::Result<()> {
    // SAFETY: dup2 only manipulates the descriptor table.
    cvt(unsafe { libc::dup2(old, new) })?;
    Ok(())
}

/// Marks every descriptor from `first` up close-on-exec.
pub fn cloexec_from(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    // Kernels before 5.11: walk /proc/self/fd.
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= first)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD on a possibly-closed descriptor fails harmlessly.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// `fchown(2)`.
pub fn fchown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: no pointers involved.
    cvt(unsafe { libc::fchown(fd, uid, gid) })?;
    Ok(())
}

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

/// Starts reading all of `file` into the page cache
/// (`POSIX_FADV_WILLNEED`).
pub fn read_ahead_all(file: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: advice on a descriptor `file` holds open; no memory passed.
    match unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// `madvise(MADV_POPULATE_READ)`: reads (if need be) and maps every
/// page of `[addr, addr + len)` of the calling process.
pub fn populate_read(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: advice only: it faults in pages of the caller's own
    // mappings, changing no memory; bad ranges fail with an errno.
    cvt(unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_READ) })
        .map(drop)
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

/// The argument and environment arrays of an `execve(2)`, made ahead of
/// it (a process that shares the agent's heap must not allocate at its
/// exec: see `vfork.rs`).
pub struct ExecArgs<'a> {
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    _strings: std::marker::PhantomData<&'a CString>,
}

impl<'a> ExecArgs<'a> {
    /// NULL-terminated pointer arrays over `args` and `env`.
    pub fn new(args: &'a [CString], env: &'a [CString]) -> Self {
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|a| a.as_ptr())
                .chain(std::iter::once(ptr::null()))
                .collect()
        };
        ExecArgs {
            argv: ptrs(args),
            envp: ptrs(env),
            _strings: std::marker::PhantomData,
        }
    }
}

/// `execve(2)`; returns only on failure.
pub fn execve(path: &CStr, args: &ExecArgs) -> io::Error {
    // SAFETY: NULL-terminated arrays of C strings that `args` borrows, so
    // they outlive the call; only returns on failure.
    unsafe { libc::execve(path.as_ptr(), args.argv.as_ptr(), args.envp.as_ptr()) };
    io::Error::last_os_error()
}

/// Whether `path` certainly does not exist: `access(F_OK)` fails with
/// ENOENT or ENOTDIR (other failures, e.g. EACCES, are left to the exec).
pub fn is_missing(path: &CStr) -> bool {
    // SAFETY: a valid C string for the duration of the call.
    let r = unsafe { libc::access(path.as_ptr(), libc::F_OK) };
    r == -1
        && matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOENT | libc::ENOTDIR)
        )
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

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: `set` is valid; invalid numbers are rejected by the call.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Blocks `signals` in the calling thread (and threads it creates later).
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: valid set pointer, null old-set pointer.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Unblocks every signal and restores every disposition to the default
/// (a forked child inherits the agent's mask and ignored signals, which
/// survive `execve`).
pub fn reset_signals() {
    let set = sigset(&[]);
    // SAFETY: valid set pointer, null old-set pointer.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &set, ptr::null_mut()) };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL needs no handler; invalid numbers fail harmlessly.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// Waits up to `timeout_ms` for one of `signals` (which must be blocked);
/// returns whether one arrived.
pub fn wait_signal(signals: &[libc::c_int], timeout_ms: u64) -> bool {
    let set = sigset(signals);
    let ts = libc::timespec {
        tv_sec: (timeout_ms / 1000) as libc::time_t,
        tv_nsec: ((timeout_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: valid set and timeout pointers; the info pointer may be null.
    unsafe { libc::sigtimedwait(&set, ptr::null_mut(), &ts) > 0 }
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

/// A close-on-exec `pipe2(2)`: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A close-on-exec `SOCK_SEQPACKET` socket pair (message boundaries kept).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    let ty = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    // SAFETY: `fds` has room for two descriptors.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) })?;
    // SAFETY: socketpair returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

const FD_CMSG_SPACE: usize = 64;

/// Sends one message, optionally passing a descriptor (`SCM_RIGHTS`).
pub fn send_msg(sock: RawFd, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cmsg_buf = [0u8; FD_CMSG_SPACE];
    // SAFETY: msghdr is plain data; zero is a valid initial value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(mem::size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` (<= 64) zeroed bytes, so the
        // first header is in bounds; we fill it and its data in place.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) as usize;
            ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    loop {
        // SAFETY: `msg` and everything it points to are valid for the call.
        let ret = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if ret >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message into `buf`; returns its length (0 at end of
/// stream) and a passed descriptor, if any.
pub fn recv_msg(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg_buf = [0u8; FD_CMSG_SPACE];
    // SAFETY: msghdr is plain data; zero is a valid initial value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_buf.len();
    let n = loop {
        // SAFETY: `msg` points at valid, writable buffers of the given sizes.
        let ret = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if ret >= 0 {
            break ret as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut passed = None;
    // SAFETY: the kernel filled `msg_control`/`msg_controllen`; the CMSG
    // macros walk only within them, and SCM_RIGHTS data holds descriptors
    // that are now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let fd = ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                passed = Some(OwnedFd::from_raw_fd(fd));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n, passed))
}

/// Writes all of `data` to a raw descriptor (used in forked children, where
/// std's locked handles must be avoided).
pub fn write_all_fd(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: the pointer and length describe `data`.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n <= 0 {
            if n == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        data = &data[n as usize..];
    }
}

/// Opens a file read-only and close-on-exec, as an owned descriptor.
pub fn open_ro(path: &Path) -> io::Result<OwnedFd> {
    let path = cpath(path)?;
    // SAFETY: a valid C string; the fd is owned right below.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The calling process's pid.
pub fn getpid() -> libc::pid_t {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// Whether `fd` refers to a terminal.
pub fn isatty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Whether `fd` is a pipe.
pub fn is_fifo(fd: RawFd) -> bool {
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: a valid out-pointer; a bad descriptor fails harmlessly.
    let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
    ok && st.st_mode & libc::S_IFMT == libc::S_IFIFO
}

/// Closes every descriptor from 3 up except `keep`. For a freshly forked
/// child: descriptors that other threads of the agent had open (another
/// container's pipes or setup socket) must not stay open in this one, or
/// their owners would wait for an end of stream that never comes. Objects
/// owning them are never dropped in the child (it leaves through `_exit`
/// or `execve`).
pub fn close_fds_except(keep: &[RawFd]) {
    // close_range(2) over the gaps: a handful of system calls instead of
    // listing /proc/self/fd (a procfs directory read, one entry formatted
    // per descriptor: slow where guest kernel code is emulated).
    let mut kept: Vec<libc::c_uint> = keep
        .iter()
        .filter(|&&fd| fd > 2)
        .map(|&fd| fd as libc::c_uint)
        .collect();
    kept.sort_unstable();
    kept.dedup();
    let mut from: libc::c_uint = 3;
    let mut ranged = true;
    for upto in kept.iter().map(|&k| Some(k)).chain([None]) {
        let last = match upto {
            Some(k) if k == from => {
                from = k + 1;
                continue;
            }
            Some(k) => k - 1,
            None => libc::c_uint::MAX,
        };
        // SAFETY: closes descriptors this process owns and no longer uses.
        if unsafe { libc::syscall(libc::SYS_close_range, from, last, 0) } != 0 {
            ranged = false;
            break;
        }
        if let Some(k) = upto {
            from = k + 1;
        }
    }
    if ranged {
        return;
    }
    // Kernels before 5.9.
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor; the directory's own (already
            // closed) descriptor just fails with EBADF.
            unsafe { libc::close(fd) };
        }
    }
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
