//! The host side of virtio-vsock is a Unix socket: connect, write
//! `CONNECT <port>\n`, read `OK <hostport>\n`, then the stream is the
//! guest connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_proto::{Client, FrameError, Hello, ProtoError, StreamHello};

use crate::RuntimeError;

/// Time left until `deadline`, at least a second (a deadline that passed
/// while the caller worked still gives the agent a moment to answer).
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1))
}

/// A read that timed out becomes [`RuntimeError::AgentTimeout`].
fn timed_out(e: RuntimeError, bound: Duration) -> RuntimeError {
    let io = match &e {
        RuntimeError::Agent(ProtoError::Frame(FrameError::Io(io))) => Some(io.kind()),
        _ => None,
    };
    match io {
        Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            RuntimeError::AgentTimeout(bound.as_secs().max(1))
        }
        _ => e,
    }
}

/// A control client on a connected stream: the agent must answer the
/// handshake by `deadline`; afterwards each reply may take up to `reply`
/// (None: no bound, for `Wait`, which lasts as long as the container).
pub fn client(
    s: UnixStream,
    deadline: Instant,
    reply: Option<Duration>,
) -> Result<Client<UnixStream>, RuntimeError> {
    let bound = left(deadline);
    let io = |e| RuntimeError::Io("agent connection".into(), e);
    s.set_read_timeout(Some(bound)).map_err(io)?;
    let client = Client::connect(s, &Hello::new("husk", env!("CARGO_PKG_VERSION")))
        .map_err(|e| timed_out(e.into(), bound))?;
    client.get_ref().set_read_timeout(reply).map_err(io)?;
    Ok(client)
}

/// Attaches a fresh stdio connection to the stream `hello` names; the
/// agent must accept or reject it by `deadline`. The stream then carries
/// output for as long as the process writes (no read timeout).
pub fn attach(
    s: UnixStream,
    hello: &StreamHello,
    deadline: Instant,
) -> Result<UnixStream, RuntimeError> {
    let bound = left(deadline);
    let io = |e| RuntimeError::Io("agent stream".into(), e);
    s.set_read_timeout(Some(bound)).map_err(io)?;
    let s = crate::sandbox::attach_stream(s, hello).map_err(|e| timed_out(e, bound))?;
    s.set_read_timeout(None).map_err(io)?;
    Ok(s)
}

/// Connects to guest vsock `port` through the VM's Unix socket `uds`,
/// retrying until `deadline` while the guest is not listening yet.
pub fn connect(uds: &Path, port: u32, deadline: Instant) -> std::io::Result<UnixStream> {
    loop {
        // A stopped (or paused) VM accepts the connection but never
        // answers: bound the wait for the reply too.
        match try_connect(uds, port, left(deadline)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn try_connect(uds: &Path, port: u32, reply: Duration) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(reply))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the reply a byte at a time: what follows it is the guest's data.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        if s.read(&mut b)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("guest port {port} refused the connection"),
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    if line.starts_with(b"OK ") {
        s.set_read_timeout(None)?;
        Ok(s)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "unexpected vsock reply {:?}",
                String::from_utf8_lossy(&line)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn handshake_and_refusal() {
        let dir = std::env::temp_dir().join(format!("husk-uds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            // First client: refused (closed); second: accepted, then data.
            let (mut a, _) = l.accept().unwrap();
            let mut buf = [0u8; 13];
            a.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            drop(a);
            let (mut b, _) = l.accept().unwrap();
            b.read_exact(&mut buf).unwrap();
            b.write_all(b"OK 1073741824\nhello").unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut s = connect(&sock, 1024, deadline).unwrap();
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
        t.join().unwrap();
        let err = connect(&dir.join("none.sock"), 1, Instant::now()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A guest that accepted the connection and then says nothing.
    fn silent_peer() -> (UnixStream, std::thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut b = b;
            let mut sink = Vec::new();
            // Reads until the client side goes away; never answers.
            let _ = b.read_to_end(&mut sink);
        });
        (a, t)
    }

    #[test]
    fn a_silent_agent_times_out_the_handshake_and_the_attach() {
        for attach_stream in [false, true] {
            let (a, t) = silent_peer();
            let start = Instant::now();
            let deadline = start + Duration::from_secs(1);
            let err = if attach_stream {
                let hello = crate::sandbox::Sandbox::hello("c", husk_proto::StreamKind::Stdout);
                attach(a, &hello, deadline).unwrap_err()
            } else {
                client(a, deadline, None).unwrap_err()
            };
            assert!(matches!(err, RuntimeError::AgentTimeout(1)), "{err}");
            assert!(start.elapsed() < Duration::from_secs(10));
            t.join().unwrap();
        }
    }

    #[test]
    fn replies_after_the_handshake_are_bounded_when_asked() {
        let (a, b) = UnixStream::pair().unwrap();
        // An agent that completes the handshake, then never answers.
        let t = std::thread::spawn(move || {
            let mut b = b;
            husk_proto::handshake(&mut b, &Hello::new("silent-agent", "0")).unwrap();
            let mut sink = Vec::new();
            let _ = b.read_to_end(&mut sink);
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut c = client(a, deadline, Some(Duration::from_millis(200))).unwrap();
        let start = Instant::now();
        let err = c.start("c").unwrap_err();
        assert!(
            matches!(&err, ProtoError::Frame(FrameError::Io(_))),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(c);
        t.join().unwrap();
    }
}
