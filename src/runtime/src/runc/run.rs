//! runc's `run`: create and start a container, then (unless detached)
//! wait for it in the foreground, forwarding signals, and delete it. The
//! VMM process has our stdio; with a terminal in the config and no
//! console socket, our own terminal is the container's.

use super::create::{self, CreateOptions};
use super::lifecycle;
use crate::RuntimeError;

/// Signals passed on to the container while `run` waits.
const FORWARDED: [libc::c_int; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
];

/// Runs container `o.id`; returns the exit code to leave with (the
/// container's; 0 when detached).
pub fn run(
    root: &std::path::Path,
    o: &CreateOptions,
    detach: bool,
    keep: bool,
) -> Result<i32, RuntimeError> {
    let timeout = o.boot_timeout;
    create::create(root, o)?;
    let pid = super::store::Container::open(root, &o.id)?.state()?.pid;
    if let Err(e) = lifecycle::start(root, &o.id, timeout) {
        let _ = lifecycle::delete(root, &o.id, true, timeout);
        return Err(e);
    }
    if detach {
        return Ok(0);
    }
    let code = wait_forwarding(root, &o.id, pid);
    if !keep {
        lifecycle::delete(root, &o.id, true, timeout)?;
    }
    Ok(code)
}

/// Waits for the VMM process (our child) to exit, passing the signals we
/// get on to the container; its exit code (128+N for signal N).
fn wait_forwarding(root: &std::path::Path, id: &str, pid: i32) -> i32 {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset/sigaddset/sigprocmask on our own set.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let poll = libc::timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            return 128 + libc::WTERMSIG(status);
        }
        if r < 0 {
            return super::vmm::LOST;
        }
        // SAFETY: sigtimedwait with our set and a valid timeout.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &poll) };
        if sig > 0 {
            if let Err(e) = lifecycle::kill(root, id, &sig.to_string(), false) {
                tracing::warn!("forwarding signal {sig}: {e}");
            }
        }
    }
}
