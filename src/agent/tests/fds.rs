//! Descriptor hygiene of the agent's forked children.

use std::os::fd::{AsRawFd, RawFd};

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

#[test]
fn close_fds_except_keeps_exactly_the_listed_descriptors() {
    let files: Vec<std::fs::File> = (0..6)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    // Adjacent, repeated and out-of-order entries, and stdio (always kept).
    let keep = [fds[4], fds[1], fds[2], fds[4], 1];
    // SAFETY: the child only makes system calls and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        husk_agent::sys::close_fds_except(&keep);
        let want = |fd: RawFd| keep.contains(&fd);
        let ok = fds.iter().all(|&fd| is_open(fd) == want(fd));
        // SAFETY: leaving the forked child.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
    // The parent's descriptors are untouched.
    assert!(fds.iter().all(|&fd| is_open(fd)));
}
