//! The VMM's control socket (`husk vm --api-sock PATH`): a Unix stream
//! socket, mode 0600, one JSON request per connection, one JSON line back.
//!
//! ```text
//! {"action":"pause"}     vCPUs out of the guest, acknowledged
//! {"action":"resume"}
//! {"action":"status"}    {"ok":true,"state":"running"|"paused"}
//! {"action":"snapshot"}  with two fds (SCM_RIGHTS): the state file, then the memory file
//! {"action":"stop"}      the VM ends as if shut down
//! ```
//!
//! The VMM opens no path for a snapshot: the caller creates the files and
//! passes them, so the event-loop thread that serves requests keeps its
//! seccomp filter (no file creation) and never follows a caller's path.
//! Requests are served on the event-loop thread between device events, so
//! no device runs while a snapshot reads the VM; a connection that sends
//! nothing for `IO_TIMEOUT` is dropped.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Bytes of `sockaddr_un.sun_path`, the terminating NUL included.
const SUN_PATH_MAX: usize = 108;
/// Longest request line accepted.
pub const MAX_REQUEST: usize = 4096;
/// How long a connection may take to send its request or read the reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long each vCPU may take to leave the guest or report its state.
pub const VCPU_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors creating the socket or talking to it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket path is taken.
    #[error("API socket {0} already exists (another VM's? remove it if stale)")]
    Exists(String),
    /// bind/chmod/connect/IO failed.
    #[error("API socket {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The other side's answer is not one.
    #[error("API socket {0}: bad reply: {1}")]
    BadReply(String, String),
}

/// A request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Request {
    /// Take the vCPUs out of the guest.
    Pause,
    /// Let them run again.
    Resume,
    /// Running or paused.
    Status,
    /// Write a snapshot into the two files passed along (paused VMs only).
    Snapshot,
    /// End the VM.
    Stop,
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// "running" or "paused" (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Bytes of guest memory written (snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes_written: Option<u64>,
}

impl Response {
    /// Success with nothing to add.
    pub fn ok() -> Self {
        Self {
            ok: true,
            error: None,
            state: None,
            memory_bytes_written: None,
        }
    }

    /// Failure.
    pub fn err(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            ..Self::ok()
        }
    }
}

/// The listening socket; its path is removed when dropped.
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiSocket {
    /// Binds `path` (which must not exist), mode 0600, non-blocking. The
    /// socket is bound and listening under a temporary name first, then
    /// renamed into place: once `path` exists, it accepts connections (a
    /// client that waits for it to appear may connect at once).
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let name = || path.display().to_string();
        if path.symlink_metadata().is_ok() {
            return Err(ApiError::Exists(name()));
        }
        let mut tag = [0u8; 4];
        crate::sys::fill_random(&mut tag).map_err(|e| ApiError::Io(name(), e))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{:08x}", u32::from_ne_bytes(tag)));
        // (A path too long for sun_path with the suffix is bound as is.)
        let tmp = match PathBuf::from(tmp) {
            t if t.as_os_str().len() < SUN_PATH_MAX => t,
            _ => path.to_path_buf(),
        };
        let listener = UnixListener::bind(&tmp).map_err(|e| ApiError::Io(name(), e))?;
        // From here the Drop below removes the path on every error.
        let mut sock = Self {
            listener,
            path: tmp.clone(),
        };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ApiError::Io(name(), e))?;
        sock.listener
            .set_nonblocking(true)
            .map_err(|e| ApiError::Io(name(), e))?;
        if tmp != path {
            crate::sys::rename_noreplace(&tmp, path).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => ApiError::Exists(name()),
                _ => ApiError::Io(name(), e),
            })?;
        }
        sock.path = path.to_path_buf();
        Ok(sock)
    }

    /// The listening fd, for the event loop.
    pub fn raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The next waiting connection, if any.
    pub fn accept(&self) -> Option<UnixStream> {
        match self.listener.accept() {
            Ok((s, _)) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => {
                tracing::warn!("API socket: accept: {e}");
                None
            }
        }
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Wakes the event loop when a connection waits; the loop serves it.
pub struct ApiWatcher {
    fd: RawFd,
    pending: Arc<AtomicBool>,
}

impl ApiWatcher {
    /// Watches the listening socket `fd`.
    pub fn new(fd: RawFd, pending: Arc<AtomicBool>) -> Self {
        Self { fd, pending }
    }
}

impl MutEventSubscriber for ApiWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.pending.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data_raw(self.fd, 0, EventSet::IN)) {
            tracing::error!("cannot watch the API socket: {e:?}");
        }
    }
}

/// A request as read from a connection, with the files passed along.
pub struct Incoming {
    /// The request, or why it could not be read.
    pub request: Result<Request, String>,
    /// Files passed with it (at most two).
    pub files: Vec<File>,
}

/// Reads one request line (and up to two fds) from `stream`.
pub fn read_request(stream: &UnixStream) -> Incoming {
    let mut files = Vec::new();
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
    if let Err(e) = setup {
        return Incoming {
            request: Err(format!("socket setup: {e}")),
            files,
        };
    }
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut fds = [-1 as RawFd; 2];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points into `buf`, which outlives the call and may
    // hold any bytes; received fds are written into `fds`.
    let got = unsafe { stream.recv_with_fds(&mut iov, &mut fds) };
    let (mut n, nfds) = match got {
        Ok(v) => v,
        Err(e) => {
            return Incoming {
                request: Err(format!("reading the request: {e}")),
                files,
            }
        }
    };
    for &fd in &fds[..nfds.min(fds.len())] {
        if fd >= 0 {
            // SAFETY: recvmsg gave us these fds; nothing else owns them.
            files.push(unsafe { File::from_raw_fd(fd) });
        }
    }
    // The rest of the line, if it came in pieces.
    let mut reader = stream;
    while n > 0 && !buf[..n].contains(&b'\n') && n < MAX_REQUEST {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) => {
                return Incoming {
                    request: Err(format!("reading the request: {e}")),
                    files,
                }
            }
        }
    }
    let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or(&[]);
    let request = if line.len() >= MAX_REQUEST {
        Err(format!("request longer than {MAX_REQUEST} bytes"))
    } else {
        serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
    };
    Incoming { request, files }
}

/// Writes `resp` as one line; a caller that went away is not an error.
pub fn write_response(mut stream: &UnixStream, resp: &Response) {
    let mut line = serde_json::to_vec(resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    if let Err(e) = stream.write_all(&line) {
        tracing::debug!("API socket: writing the reply: {e}");
    }
}

/// Sends `req` with `files` to the VMM at `path` and waits up to
/// `timeout` for its reply.
pub fn request(
    path: &Path,
    req: Request,
    files: &[&File],
    timeout: Duration,
) -> Result<Response, ApiError> {
    let name = || path.display().to_string();
    let io = |e| ApiError::Io(name(), e);
    let stream = UnixStream::connect(path).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(&req).map_err(|e| io(e.into()))?;
    line.push(b'\n');
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let sent = stream
        .send_with_fds(&[line.as_slice()], &fds)
        .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno())))?;
    if sent != line.len() {
        (&stream).write_all(&line[sent..]).map_err(io)?;
    }
    let mut reply = Vec::new();
    (&stream)
        .take(MAX_REQUEST as u64)
        .read_to_end(&mut reply)
        .map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                ApiError::Io(
                    name(),
                    std::io::Error::other(format!("no reply within {} s", timeout.as_secs())),
                )
            } else {
                io(e)
            }
        })?;
    let text = String::from_utf8_lossy(&reply);
    serde_json::from_str(text.trim()).map_err(|e| {
        ApiError::BadReply(
            name(),
            if text.trim().is_empty() {
                "the VMM closed the connection without answering".into()
            } else {
                e.to_string()
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknown_ones_are_refused() {
        let r: Request = serde_json::from_str(r#"{"action":"pause"}"#).unwrap();
        assert_eq!(r, Request::Pause);
        assert!(serde_json::from_str::<Request>(r#"{"action":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Snapshot).unwrap(),
            r#"{"action":"snapshot"}"#
        );
    }

    #[test]
    fn a_request_and_its_files_arrive_and_a_reply_goes_back() {
        let dir = std::env::temp_dir().join(format!("husk-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let sock = ApiSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(ApiSocket::bind(&path), Err(ApiError::Exists(_))));
        let server = std::thread::spawn(move || {
            let stream = loop {
                if let Some(s) = sock.accept() {
                    break s;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let inc = read_request(&stream);
            let mut f = &inc.files[0];
            f.write_all(b"written by the server").unwrap();
            write_response(&stream, &Response::ok());
            (inc.request.unwrap(), inc.files.len(), sock)
        });
        let file = tempfile(&dir.join("f"));
        let resp = request(&path, Request::Snapshot, &[&file], Duration::from_secs(5)).unwrap();
        assert!(resp.ok);
        let (req, nfiles, sock) = server.join().unwrap();
        assert_eq!((req, nfiles), (Request::Snapshot, 1));
        assert_eq!(
            std::fs::read_to_string(dir.join("f")).unwrap(),
            "written by the server"
        );
        drop(sock);
        assert!(!path.exists(), "the socket is removed with the VM");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_and_silence_get_an_error_not_a_hang() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"{not json}\n").unwrap();
        assert!(read_request(&b).request.is_err());
        let (_a, b) = UnixStream::pair().unwrap();
        let t = std::time::Instant::now();
        assert!(read_request(&b).request.is_err());
        assert!(t.elapsed() < IO_TIMEOUT * 3);
    }

    fn tempfile(p: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .unwrap()
    }
}
