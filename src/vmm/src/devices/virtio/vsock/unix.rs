//! The Unix socket calls std does not offer (the FFI of the vsock device
//! lives here): a connect that never blocks, sends that never raise
//! SIGPIPE, peeking, and the listening socket with stale-file handling.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::VsockError;

/// A `sockaddr_un` for `path`, with its length.
fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // Keep the terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path is empty, too long or contains NUL",
        ));
    }
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Connects a non-blocking stream socket to `path`. A listener whose
/// backlog is full answers `WouldBlock` instead of stalling the caller.
///
/// The guest picks the port, and so the path: only a socket this process's
/// user owns is connected to, never through a symlink (the path is opened
/// with `O_PATH | O_NOFOLLOW`, checked, and connected to through
/// `/proc/self/fd`, so it cannot be swapped in between).
pub(super) fn connect(path: &Path) -> io::Result<UnixStream> {
    let file = crate::sys::open_path(path, libc::O_PATH | libc::O_NOFOLLOW)?;
    let st = crate::sys::fstat(&file)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a socket (symlinks are not followed)",
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if st.st_uid != unsafe { libc::geteuid() } {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the socket belongs to uid {}", st.st_uid),
        ));
    }
    let via = format!("/proc/self/fd/{}", file.as_raw_fd());
    let (addr, len) = sockaddr(Path::new(&via))?;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Sends without blocking and without SIGPIPE (a closed peer is `EPIPE`).
pub(super) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: send(2) reads at most `buf.len()` bytes from `buf`.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Looks at the bytes waiting on `fd` without consuming them.
pub(super) fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Puts `fd` in non-blocking mode.
pub(super) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL only reads the fd's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL only changes the fd's status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Listens on `path` (non-blocking). A socket file left behind by a dead
/// process (nobody accepts on it) is replaced; anything else there is an
/// error, never removed.
pub(super) fn listen(path: &Path) -> Result<UnixListener, VsockError> {
    let shown = || path.display().to_string();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let stale = meta.file_type().is_socket()
            && matches!(
                connect(path),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED)
            );
        if !stale {
            return Err(VsockError::PathInUse(shown()));
        }
        std::fs::remove_file(path).map_err(|e| VsockError::Bind(shown(), e))?;
    }
    sockaddr(path).map_err(|e| VsockError::Bind(shown(), e))?;
    let listener = UnixListener::bind(path).map_err(|e| VsockError::Bind(shown(), e))?;
    // Whoever connects reaches the guest's ports (the agent among them):
    // this user only, whatever the umask.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| VsockError::Bind(shown(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| VsockError::Bind(shown(), e))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("husk-vsock-unix-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_and_files_are_not() {
        let d = dir("stale");
        let p = d.join("v.sock");
        let l = listen(&p).unwrap();
        assert!(matches!(listen(&p), Err(VsockError::PathInUse(_))), "live");
        drop(l);
        let l = listen(&p).expect("stale socket replaced");
        drop(l);
        let f = d.join("file");
        std::fs::write(&f, b"keep").unwrap();
        assert!(matches!(listen(&f), Err(VsockError::PathInUse(_))));
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn connect_fails_fast_and_send_does_not_raise_sigpipe() {
        let d = dir("connect");
        assert!(connect(&d.join("nothing")).is_err());
        assert!(connect(Path::new(&"x".repeat(200))).is_err());
        let p = d.join("s");
        let l = UnixListener::bind(&p).unwrap();
        let c = connect(&p).unwrap();
        let (a, _) = l.accept().unwrap();
        assert_eq!(send(c.as_raw_fd(), b"hi").unwrap(), 2);
        let mut b = [0u8; 8];
        assert_eq!(peek(a.as_raw_fd(), &mut b).unwrap(), 2);
        assert_eq!(
            peek(a.as_raw_fd(), &mut b).unwrap(),
            2,
            "peek keeps the bytes"
        );
        drop(a);
        let e = send(c.as_raw_fd(), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn guest_connections_follow_no_symlink_and_reach_only_our_sockets() {
        use std::os::unix::fs::MetadataExt;
        let d = dir("nofollow");
        let real = d.join("real");
        let l = UnixListener::bind(&real).unwrap();
        let link = d.join("v.sock_5");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = connect(&link).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        let file = d.join("v.sock_6");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(
            connect(&file).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        // Our own socket: connected (through /proc/self/fd).
        let c = connect(&real).unwrap();
        let (a, _) = l.accept().unwrap();
        assert_eq!(send(c.as_raw_fd(), b"ok").unwrap(), 2);
        let mut b = [0u8; 2];
        assert_eq!(peek(a.as_raw_fd(), &mut b).unwrap(), 2);
        // Someone else's socket (as root, the test can make one).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&real, Some(65534), None).unwrap();
            assert_eq!(std::fs::metadata(&real).unwrap().uid(), 65534);
            let e = connect(&real).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_listening_socket_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("mode");
        let p = d.join("v.sock");
        // Whatever the umask (the test runner's is usually 022).
        let _l = listen(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(d).unwrap();
    }
}
