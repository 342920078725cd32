//! Processes: fork, exec, wait, kill and signals.

use std::ffi::{CStr, CString};
use std::io;
use std::mem;
use std::ptr;

use super::cvt;

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

/// The calling process's pid.
pub fn getpid() -> libc::pid_t {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}
