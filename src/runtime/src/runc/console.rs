//! `--console-socket`: runc makes the container's terminal and sends its
//! master over the caller's Unix socket (SCM_RIGHTS, the slave's path as
//! the message). husk's container terminal is in the guest, so husk makes
//! a host pty pair, sends its master, and the VMM (or exec) process keeps
//! the slave as its stdio, in raw mode, relaying it to the guest's pty;
//! the caller's resizes of the master reach the guest (see `run.rs`).

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::RuntimeError;

fn os_err(what: &str) -> RuntimeError {
    RuntimeError::Io(what.into(), std::io::Error::last_os_error())
}

/// A host pty pair: (master, slave, slave's path). The slave is in raw
/// mode: the guest's terminal does the line discipline.
fn open_pty() -> Result<(OwnedFd, OwnedFd, String), RuntimeError> {
    // SAFETY: posix_openpt returns a new fd we own, or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(os_err("open a pty"));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt on the master we own.
    if unsafe { libc::grantpt(m) } != 0 || unsafe { libc::unlockpt(m) } != 0 {
        return Err(os_err("unlock the pty"));
    }
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name into our buffer.
    if unsafe { libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()) } != 0 {
        return Err(os_err("name the pty"));
    }
    // SAFETY: ptsname_r succeeded, so `buf` holds a C string.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    // SAFETY: open(2) of the slave by its NUL-terminated name.
    let s = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(os_err("open the pty's slave"));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: termios is plain data, filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr/cfmakeraw/tcsetattr on our slave and our struct.
    unsafe {
        if libc::tcgetattr(s, &mut t) != 0 {
            return Err(os_err("read the pty's modes"));
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(s, libc::TCSANOW, &t) != 0 {
            return Err(os_err("set the pty raw"));
        }
    }
    Ok((master, slave, name.to_string_lossy().into_owned()))
}

/// Makes a pty, sends its master to the socket at `socket` and returns
/// the slave.
pub fn hand_over(socket: &Path) -> Result<OwnedFd, RuntimeError> {
    let (master, slave, name) = open_pty()?;
    let what = || format!("console socket {}", socket.display());
    let sock = UnixStream::connect(socket).map_err(|e| RuntimeError::Io(what(), e))?;
    sock.send_with_fd(name.as_bytes(), master.as_raw_fd())
        .map_err(|e| RuntimeError::Io(what(), std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(slave)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_master_travels_and_the_slave_is_raw() {
        let dir = std::env::temp_dir().join(format!("husk-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pty.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let slave = hand_over(&path).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let (n, fd) = conn.recv_with_fd(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("/dev/pts/"));
        let mut master = fd.unwrap();
        let mut slave = std::fs::File::from(slave);
        // Raw: no echo, no newline translation.
        master.write_all(b"ab\n").unwrap();
        let mut got = [0u8; 3];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ab\n");
        slave.write_all(b"x\n").unwrap();
        let mut got = [0u8; 2];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x\n");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
