//! `clone(CLONE_VM | CLONE_VFORK)`: a new process that runs on this
//! process's memory until it execs or exits, as `posix_spawn` does, while
//! the calling thread waits. A container's init starts this way (see
//! `container/child.rs`): a fork would copy the agent's page tables, make
//! every page the agent then writes fault and copy while the container is
//! being set up, and unmap the copy again at the container's exec; each
//! page fault and page-table walk costs ~0.1-1 ms where guest kernel code
//! is emulated.

use std::io;
use std::ptr;
use std::sync::atomic::AtomicI32;

/// The child's stack: reserved, only the pages it touches are made.
const STACK_SIZE: usize = 8 << 20;
/// An unmapped page below the stack, so that an overflow faults.
const GUARD_SIZE: usize = 4096;

/// An anonymous mapping used as the child's stack; unmapped on drop.
struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

impl Stack {
    fn new() -> io::Result<Self> {
        let len = STACK_SIZE + GUARD_SIZE;
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack { base, len };
        // SAFETY: the lowest page of the mapping made above.
        if unsafe { libc::mprotect(base, GUARD_SIZE, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The initial stack pointer (stacks grow down; 16-byte aligned).
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which is page-aligned.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used (see
        // `clone_vfork`: the child exec'd or exited before we return).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

struct Call<'a> {
    f: &'a mut dyn FnMut(),
}

extern "C" fn trampoline(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Call` on `clone_vfork`'s frame, which stays
    // alive (its thread suspended) until this process execs or exits.
    let call = unsafe { &mut *arg.cast::<Call>() };
    (call.f)();
    // SAFETY: `_exit` has no preconditions; `f` should not return.
    unsafe { libc::_exit(1) }
}

/// Runs `f` in a new process with `flags` (`CLONE_NEW*`) on this
/// process's memory and a stack of its own; returns its pid (in our pid
/// namespace) once it has exec'd or exited. Before `f` runs, the kernel
/// stores that pid in `tid`, where `f` can read it (a child in a new pid
/// namespace sees itself as 1). It gets SIGCHLD as exit signal.
///
/// # Safety
/// `f` runs as this thread would (same memory, same thread-local storage
/// while this thread is suspended), in a process of its own (its own
/// descriptor table, credentials, namespaces, signal handlers). It must
/// leave through `execve` or `_exit`, and must not wait for anything this
/// thread would have to do. Other threads of the caller go on: whatever
/// kills the child must do so only where it holds no lock they take (in
/// particular, not inside `malloc`), or they would wait forever.
pub unsafe fn clone_vfork(
    flags: libc::c_int,
    tid: &AtomicI32,
    f: &mut dyn FnMut(),
) -> io::Result<libc::pid_t> {
    let stack = Stack::new()?;
    let mut call = Call { f };
    let flags =
        flags | libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID | libc::SIGCHLD;
    // SAFETY: `trampoline` gets a pointer to `call`, and the child runs on
    // `stack`; both outlive the child's use of them, because CLONE_VFORK
    // suspends this thread until the child execs or exits. `tid` is a
    // valid i32 for the kernel's CLONE_PARENT_SETTID store.
    let pid = unsafe {
        libc::clone(
            trampoline,
            stack.top(),
            flags,
            (&mut call as *mut Call).cast(),
            tid.as_ptr(),
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn the_child_shares_memory_sees_its_pid_and_the_caller_waits() {
        let tid = AtomicI32::new(0);
        let seen = AtomicI32::new(0);
        let mut f = || {
            // Written into the caller's memory: visible after the return.
            seen.store(tid.load(Ordering::SeqCst), Ordering::SeqCst);
            // SAFETY: leaving the child.
            unsafe { libc::_exit(7) }
        };
        // SAFETY: the child only stores to memory and exits.
        let pid = unsafe { clone_vfork(0, &tid, &mut f) }.expect("clone");
        assert!(pid > 0);
        assert_eq!(tid.load(Ordering::SeqCst), pid);
        assert_eq!(seen.load(Ordering::SeqCst), pid);
        let mut status = 0;
        // SAFETY: valid out-pointer; `pid` is our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7);
    }
}
