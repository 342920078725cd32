//! husk-agent: PID 1 of a husk guest. It mounts the basic filesystems,
//! reaps zombies, serves the host over vsock (see the `husk-proto` crate)
//! and runs OCI containers: root filesystem from a read-only disk with an
//! overlay upper layer, namespaces, cgroups, user, capabilities, terminal.
//!
//! The binary (`main.rs`) is PID 1 in the guest, or with `--unix DIR` a
//! debug server on Unix sockets. The library is what the host-side tests
//! drive: [`server::serve_control`] and [`stdio::serve_stdio`] work over
//! any [`transport::Conn`], e.g. a `UnixStream` pair.

pub mod agent;
pub mod container;
pub mod init;
pub mod marks;
pub mod net;
pub mod reaper;
pub mod server;
pub mod state;
pub mod stdio;
pub mod sys;
pub mod transport;
pub mod vfork;
pub mod vsock;

/// Logs one line to stderr (the guest console when PID 1).
#[macro_export]
macro_rules! log {
    ($($t:tt)*) => {
        eprintln!("husk-agent: {}", format_args!($($t)*))
    };
}
