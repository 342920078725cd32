//! The host side of virtio-vsock is a Unix socket: connect, write
//! `CONNECT <port>\n`, read `OK <hostport>\n`, then the stream is the
//! guest connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Connects to guest vsock `port` through the VM's Unix socket `uds`,
/// retrying until `deadline` while the guest is not listening yet.
pub fn connect(uds: &Path, port: u32, deadline: Instant) -> std::io::Result<UnixStream> {
    loop {
        // A stopped (or paused) VM accepts the connection but never
        // answers: bound the wait for the reply too.
        let reply = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match try_connect(uds, port, reply) {
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
}
