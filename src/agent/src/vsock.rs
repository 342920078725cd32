//! AF_VSOCK stream sockets (the guest side of virtio-vsock), via libc.

use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::transport::{Conn, Listener};

/// A listening vsock socket.
pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Listens on `port` for any CID.
    pub fn bind(port: u32) -> io::Result<Self> {
        let ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, ty, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
        let ret = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                len,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: no pointers involved.
        if unsafe { libc::listen(sock.as_raw_fd(), 64) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockListener(sock))
    }
}

impl Listener for VsockListener {
    type Conn = VsockStream;

    fn accept_conn(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: null address pointers are allowed; the fd is owned below.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a fresh descriptor nobody else owns.
                return Ok(VsockStream(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// A connected vsock stream.
pub struct VsockStream(OwnedFd);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the pointer and length describe `buf`.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the pointer and length describe `buf`; MSG_NOSIGNAL turns
        // a closed peer into EPIPE instead of a signal.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Conn for VsockStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        Ok(VsockStream(self.0.try_clone()?))
    }

    fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: no pointers involved.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
