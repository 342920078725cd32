//! What the servers need from a connection, so that the same code serves
//! vsock in the guest and Unix sockets in tests and the debug mode.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};

/// A bidirectional byte stream that can be split and half-closed.
pub trait Conn: Read + Write + Send + Sized + 'static {
    /// A second handle to the same connection (for a writer thread).
    fn try_clone_conn(&self) -> io::Result<Self>;
    /// Half-closes: the peer reads end of stream.
    fn shutdown_write(&self) -> io::Result<()>;
}

/// Accepts connections.
pub trait Listener: Send + 'static {
    /// The connection type.
    type Conn: Conn;
    /// Blocks for the next connection.
    fn accept_conn(&self) -> io::Result<Self::Conn>;
}

impl Conn for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Listener for UnixListener {
    type Conn = UnixStream;

    fn accept_conn(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}
