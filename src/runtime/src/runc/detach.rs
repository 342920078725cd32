//! Detached helper processes (a container's VMM, an exec's relay): started
//! in their own session so that they outlive the command that started them
//! (re-parented to the caller's subreaper), they report "ok" or
//! "error: ..." on a pipe once ready, and their pid is what a shim reaps.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::RuntimeError;

/// Names the fd on which a detached helper reports readiness.
pub const READY_FD_ENV: &str = "HUSK_READY_FD";

/// A pipe, both ends close-on-exec: (read, write).
pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(RuntimeError::Io(
            "pipe".into(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `husk ARGS...` detached and waits, up to `timeout`, for its
/// report; returns its pid (the process is left running). `terminal`: a
/// pty slave to be its stdin, stdout and stderr instead of ours.
pub fn spawn(
    args: &[OsString],
    timeout: Duration,
    terminal: Option<&OwnedFd>,
) -> Result<i32, RuntimeError> {
    let exe = std::env::current_exe().map_err(|e| RuntimeError::Io("current exe".into(), e))?;
    let (r, w) = pipe()?;
    let w_fd = w.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args).env(READY_FD_ENV, w_fd.to_string());
    if let Some(t) = terminal {
        let dup = |t: &OwnedFd| {
            t.try_clone()
                .map_err(|e| RuntimeError::Io("dup the terminal".into(), e))
        };
        cmd.stdin(dup(t)?).stdout(dup(t)?).stderr(dup(t)?);
    }
    // SAFETY: between fork and exec only async-signal-safe calls: setsid
    // and fcntl on an fd we own.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::fcntl(w_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| RuntimeError::Io("start a helper process".into(), e))?;
    drop(w);
    let pid = child.id() as i32;
    match read_report(r, Instant::now() + timeout) {
        Ok(line) if line == "ok" => Ok(pid),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let why = match other {
                Ok(line) => line.strip_prefix("error: ").unwrap_or(&line).to_owned(),
                Err(e) => e,
            };
            Err(RuntimeError::Invalid(why))
        }
    }
}

/// The readiness fd of a detached helper, taken from the environment.
pub fn ready_fd() -> Option<File> {
    let fd: RawFd = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
    std::env::remove_var(READY_FD_ENV);
    // SAFETY: our parent passed this fd open for us alone; we take ownership.
    (fd > 2).then(|| unsafe { File::from_raw_fd(fd) })
}

/// Reports `line` ("ok" or "error: ...") on the readiness fd, closing it.
pub fn report(ready: Option<File>, line: &str) {
    if let Some(mut f) = ready {
        let _ = writeln!(f, "{}", line.replace('\n', " "));
    }
}

/// Reads a helper's one-line report, bounded by `deadline`.
fn read_report(r: OwnedFd, deadline: Instant) -> Result<String, String> {
    let mut f = File::from(r);
    let mut buf = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the helper did not report within the boot timeout \
                        (set HUSK_BOOT_TIMEOUT to wait longer)"
                .into());
        }
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(1000) as i32;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        let mut chunk = [0u8; 4096];
        match f.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 64 << 10 || buf.ends_with(b"\n") {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the helper's report: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&buf).trim().to_owned();
    if text.is_empty() {
        Err("the helper process exited before it was ready".into())
    } else {
        Ok(text)
    }
}
