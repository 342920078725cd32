//! A PID namespace for a jailed VMM (`--jail ...,pidns`).
//!
//! KVM ties a VM to the address space that created it, so a VMM cannot
//! fork into a new PID namespace once its VM exists: the process forks
//! first, before anything is opened. The child is PID 1 of a new PID
//! namespace and goes on to build, jail and run the VM; it sees no other
//! process of the host. The parent stays outside as a supervisor that only
//! passes signals on to it and exits with its status (or dies of the same
//! signal). The child dies with the supervisor (PR_SET_PDEATHSIG), so a
//! `kill -9` of the process the caller started ends the VM too.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use super::{require_single_thread, step, JailError};
use crate::event_loop::STOP_SIGNALS;
use crate::sys::sigset;

/// The calling thread's mask; with valid arguments pthread_sigmask cannot
/// fail.
fn sigmask(how: libc::c_int, set: &libc::sigset_t, old: Option<&mut libc::sigset_t>) {
    let _ = crate::sys::sigmask(how, set, old);
}

/// What the supervisor passes on to the VMM.
const FORWARDED: [libc::c_int; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// Does nothing: a namespace's init receives only the signals it handles
/// (the kernel drops the others, even from the supervisor), and the stop
/// signals stay blocked, for the event loop's signalfd.
extern "C" fn ignore(_: libc::c_int) {}

/// Forks into a new PID namespace. Returns in the child (PID 1 there);
/// the parent never returns: it supervises the child and exits with its
/// status. Call it single-threaded, before the VM is built.
pub fn enter() -> Result<(), JailError> {
    require_single_thread("enter a PID namespace")?;
    // SAFETY: unshare(2) with a flag; it changes the namespace of this
    // process's future children only.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(step("unshare(CLONE_NEWPID)")(io::Error::last_os_error()));
    }
    // The supervisor holds the write end until it exits: the child sees
    // it closed if the supervisor died before PR_SET_PDEATHSIG took hold.
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(step("pipe")(io::Error::last_os_error()));
    }
    // SAFETY: both fds are new and owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Blocked across the fork: no signal is lost before the supervisor
    // waits for them, or taken by the child before it is ready.
    let mut watched = FORWARDED.to_vec();
    watched.push(libc::SIGCHLD);
    let watched = sigset(&watched);
    // SAFETY: an all-zero sigset_t is valid storage for the old mask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    sigmask(libc::SIG_BLOCK, &watched, Some(&mut old));
    // SAFETY: the process is single-threaded (checked above), so the child
    // may run any code.
    match unsafe { libc::fork() } {
        -1 => {
            let e = io::Error::last_os_error();
            sigmask(libc::SIG_SETMASK, &old, None);
            Err(step("fork into the PID namespace")(e))
        }
        0 => {
            drop(write_end);
            let _ = SUPERVISOR.set(read_end);
            if arm().is_err() {
                // SAFETY: _exit(2) ends the child at once.
                unsafe { libc::_exit(1) };
            }
            for &sig in &STOP_SIGNALS {
                // SAFETY: installs a handler that does nothing.
                unsafe { libc::signal(sig, ignore as *const () as libc::sighandler_t) };
            }
            sigmask(libc::SIG_SETMASK, &old, None);
            sigmask(libc::SIG_BLOCK, &sigset(&STOP_SIGNALS), None);
            Ok(())
        }
        child => {
            drop(read_end);
            let _keep = write_end;
            supervise(child, &watched)
        }
    }
}

/// The child's end of the pipe whose other end the supervisor holds.
static SUPERVISOR: OnceLock<OwnedFd> = OnceLock::new();

/// In the child, right after the fork: dies with the supervisor; an error
/// if it is gone already.
fn arm() -> Result<(), JailError> {
    // SAFETY: prctl(2) with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    supervisor_alive()
}

/// In the child: an error if the supervisor is gone (its pipe closed; it
/// never writes). getppid() cannot tell across the namespace: it is 0.
/// Ok outside a PID namespace of husk's.
pub(super) fn supervisor_alive() -> Result<(), JailError> {
    let Some(fd) = SUPERVISOR.get() else {
        return Ok(());
    };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    match unsafe { libc::poll(&mut pfd, 1, 0) } {
        0 => Ok(()),
        _ => Err(JailError::Invalid(
            "the PID namespace's supervisor is gone".into(),
        )),
    }
}

/// Passes signals on to `child` until it ends, then exits as it did.
fn supervise(child: libc::pid_t, watched: &libc::sigset_t) -> ! {
    loop {
        // SAFETY: `watched` is initialised and blocked; siginfo may be null.
        let sig = unsafe { libc::sigwaitinfo(watched, std::ptr::null_mut()) };
        if sig < 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        let mut status = 0;
        // SAFETY: waitpid(2) of our own child, without blocking.
        if unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) } != child {
            continue;
        }
        if libc::WIFEXITED(status) {
            std::process::exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            // Die of the same signal, so the caller sees what happened.
            // SAFETY: default disposition, then the signal to ourselves,
            // unblocked.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::kill(libc::getpid(), sig);
            }
            sigmask(libc::SIG_UNBLOCK, &sigset(&[sig]), None);
            std::process::exit(128 + sig);
        }
    }
}
