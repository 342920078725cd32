//! Host sockets of the vsock device: clients accepted on the listening
//! socket, their `CONNECT <port>` handshake and the REQUEST that connects
//! each to a guest port (with a local port of its own); and the guest's
//! connections to `<uds_path>_<port>`.

use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::super::connection::{ConnKey, Connection};
use super::super::packet::Header;
use super::super::{unix, FIRST_HOST_PORT, MAX_CONNECTIONS, MAX_CONNECT_LINE, MAX_HANDSHAKES};
use super::Muxer;

/// How long the listener rests after `accept` failed for lack of
/// resources (e.g. no fd left), instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(500);

/// A host client that has not sent its `CONNECT` line yet.
pub(super) struct Handshake {
    pub(super) stream: UnixStream,
    pub(super) line: Vec<u8>,
    pub(super) deadline: Instant,
    pub(super) registered: bool,
}

/// Parses `CONNECT <port>\n` (a `\r` before the newline is tolerated).
pub(super) fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let port = line.strip_prefix(b"CONNECT ")?;
    if port.is_empty() || port.len() > 10 || !port.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(port).ok()?.parse().ok()
}

impl Muxer {
    /// The guest connects to host port `key.local_port`: connect to
    /// `<uds_path>_<port>`, answer RESPONSE, or RST if nothing listens.
    pub(super) fn connect_for_guest(&mut self, key: ConnKey, req: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!("vsock: connection limit reached, refusing {key:?}");
            self.push_reset(key);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        match unix::connect(Path::new(&path)) {
            Ok(stream) => {
                let c = Connection::new_peer(stream, key, self.guest_cid, req);
                self.insert(c);
            }
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connection to {} refused: {e}",
                    Path::new(&path).display()
                );
                self.push_reset(key);
            }
        }
    }

    /// Accepts waiting host clients.
    pub(in super::super) fn accept_clients(&mut self) {
        for _ in 0..MAX_HANDSHAKES {
            match self.listener.accept() {
                Ok((stream, _)) => self.new_client(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e)
                    if e.kind() == ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    tracing::warn!(
                        "vsock: cannot accept on {}: {e}; retrying shortly",
                        self.uds_path.display()
                    );
                    let at = Instant::now() + ACCEPT_BACKOFF;
                    self.listener_paused_until = Some(at);
                    self.arm_timer(at);
                    break;
                }
            }
        }
    }

    fn new_client(&mut self, stream: UnixStream) {
        if !self.driver_ready
            || self.handshakes.len() >= MAX_HANDSHAKES
            || self.conns.len() >= MAX_CONNECTIONS
            || stream.set_nonblocking(true).is_err()
        {
            // Closing is the answer: the client may retry.
            return;
        }
        let fd = stream.as_raw_fd();
        let deadline = Instant::now() + self.handshake_timeout;
        self.handshakes.insert(
            fd,
            Handshake {
                stream,
                line: Vec::new(),
                deadline,
                registered: false,
            },
        );
        self.new_handshakes.push(fd);
        self.arm_timer(deadline);
    }

    pub(super) fn drop_handshake(&mut self, fd: RawFd) {
        if let Some(h) = self.handshakes.remove(&fd) {
            if h.registered {
                self.graveyard.push(h.stream);
            }
        }
    }

    pub(super) fn on_handshake_event(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE.saturating_sub(h.line.len());
        let n = match unix::peek(fd, &mut buf[..room]) {
            Ok(0) => return self.drop_handshake(fd),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => return self.drop_handshake(fd),
        };
        // Take the line and not a byte more: what follows is connection data.
        let take = buf[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        let got = match h.stream.read(&mut buf[..take]) {
            Ok(0) | Err(_) => return self.drop_handshake(fd),
            Ok(got) => got,
        };
        h.line.extend_from_slice(&buf[..got]);
        if h.line.last() != Some(&b'\n') {
            if h.line.len() >= MAX_CONNECT_LINE {
                tracing::debug!("vsock: host client sent an overlong CONNECT line");
                self.drop_handshake(fd);
            }
            return;
        }
        match parse_connect(&h.line) {
            Some(port) => self.connect_to_guest(fd, port),
            None => {
                tracing::debug!(
                    "vsock: host client sent {:?}, not CONNECT <port>",
                    String::from_utf8_lossy(&h.line)
                );
                self.drop_handshake(fd);
            }
        }
    }

    /// A free local port for a connection to guest port `peer_port`.
    fn alloc_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS + 1 {
            let p = self.next_port;
            self.next_port = p.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            let key = ConnKey {
                local_port: p,
                peer_port,
            };
            if !self.host_ports.contains(&p) && !self.conns.contains_key(&key) {
                return Some(p);
            }
        }
        None
    }

    /// A host client asked for guest port `port`: send the guest a REQUEST.
    fn connect_to_guest(&mut self, fd: RawFd, port: u32) {
        if !self.driver_ready || self.conns.len() >= MAX_CONNECTIONS {
            return self.drop_handshake(fd);
        }
        let Some(local) = self.alloc_port(port) else {
            return self.drop_handshake(fd);
        };
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        let key = ConnKey {
            local_port: local,
            peer_port: port,
        };
        let mut c = Connection::new_local(h.stream, key, self.guest_cid);
        c.registered = h.registered.then_some(EventSet::IN);
        c.deadline = Some(Instant::now() + self.connect_timeout);
        self.host_ports.insert(local);
        self.insert(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect(b"CONNECT 1024\n"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 0\r\n"), Some(0));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296\n"[..],
            b"CONNECT 1024",
            b"CONNECT \n",
            b"CONNECT +5\n",
            b"CONNECT -5\n",
            b"connect 5\n",
            b"CONNECT  5\n",
            b"CONNECT 5 \n",
            b"OK 5\n",
            b"\n",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
