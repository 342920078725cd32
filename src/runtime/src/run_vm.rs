//! `husk run`'s VM process. `husk run` stays outside as root and keeps what
//! needs the host: it made the run directory and removes it afterwards,
//! holds the name's lock, passes on the signals sent to it and reports the
//! outcome. The VM, the agent protocol and the stdio relays run in a child,
//! `husk run-vm DIR` (fds 0-2 inherited), which enters a jail of its own
//! once the VM is built, as the runtime's VMM processes do: a uid and gid
//! of its own, no capability, a mount namespace that holds only the run
//! directory. What the guest sends is read there, not by a root process.
//!
//! The two talk over a socket pair: `husk run` writes there, one byte
//! each, the signals processes send it, and the VM process writes its
//! outcome back. A terminal's ^C reaches both processes (the kernel signals
//! the whole foreground group); the VM process passes that one on itself.
//! A process's signal reaches the container only through `husk run`, even
//! when a process-group kill delivers a copy to the VM process as well:
//! relayed as a signal instead, it could merge with that pending copy.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use husk_vmm::event_loop::{SavedTerminal, SignalInfo};

use crate::run::{RunOutcome, Session, SessionConfig, FORWARDED};
use crate::RuntimeError;

/// The hidden subcommand the VM's process runs: `husk run-vm DIR`.
pub const SUBCOMMAND: &str = "run-vm";
/// Names the VM process's end of the socket pair.
pub const CHANNEL_FD_ENV: &str = "HUSK_RUN_FD";
/// The session, in the run directory until the child has read it.
const CONFIG_FILE: &str = "session.json";
/// The largest outcome read from the child (it has talked to the guest).
const REPORT_MAX: usize = 1 << 20;

/// Why the VM process's session failed.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Failure {
    /// The error, one line.
    error: String,
    /// The signal that stopped it before the container started.
    #[serde(default)]
    interrupted_by: Option<i32>,
}

/// Whether a process sent the signal (kill(2), sigqueue(3), tgkill(2)),
/// not the kernel (a terminal's ^C or hang-up, to the whole foreground
/// process group): `husk run` relays the first kind, the VM process passes
/// on only the second.
pub fn sent_by_a_process(info: &SignalInfo) -> bool {
    info.code <= 0
}

fn invalid(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Invalid(e.to_string())
}

/// Runs the session `cfg` in a child VM process; returns its outcome. The
/// caller removes the run directory afterwards.
pub(crate) fn supervise(cfg: &SessionConfig) -> Result<RunOutcome, RuntimeError> {
    let config = cfg.run_dir.join(CONFIG_FILE);
    std::fs::write(&config, serde_json::to_vec(cfg).map_err(invalid)?)
        .map_err(|e| RuntimeError::Io(config.display().to_string(), e))?;
    cfg.give_run_dir_to_jail()?;
    // Blocked here before the child exists (it starts with none blocked):
    // this process must outlive a ^C to report the container's status.
    let sigfd = husk_vmm::event_loop::signalfd(&FORWARDED)
        .map_err(|e| RuntimeError::Io("signalfd".into(), e))?;
    // Put back if the child dies with the terminal in raw mode.
    let terminal = match cfg.host_terminal {
        true => SavedTerminal::save(0),
        false => None,
    };
    let exe = std::env::current_exe().map_err(|e| RuntimeError::Io("current exe".into(), e))?;
    let (mine, theirs) =
        UnixStream::pair().map_err(|e| RuntimeError::Io("socketpair".into(), e))?;
    let w_fd = theirs.as_raw_fd();
    // SAFETY: getpid(2) has no preconditions.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new(exe);
    cmd.arg(SUBCOMMAND)
        .arg(&cfg.run_dir)
        .env(CHANNEL_FD_ENV, w_fd.to_string());
    // SAFETY: between fork and exec only async-signal-safe calls with
    // integer arguments, and errors that do not allocate.
    unsafe {
        cmd.pre_exec(move || {
            // The VM goes when `husk run` goes, as when it was a thread.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::fcntl(w_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| RuntimeError::Io("start the VM's process".into(), e))?;
    drop(theirs);
    let report = read_report(mine, &sigfd);
    let status = child
        .wait()
        .map_err(|e| RuntimeError::Io("wait for the VM's process".into(), e))?;
    drop(terminal);
    match report.map(|r| serde_json::from_slice::<Result<RunOutcome, Failure>>(&r)) {
        Ok(Ok(Ok(outcome))) => Ok(outcome),
        Ok(Ok(Err(Failure {
            interrupted_by: Some(signal),
            ..
        }))) => Err(RuntimeError::Interrupted(signal)),
        Ok(Ok(Err(f))) => Err(RuntimeError::Invalid(f.error)),
        Ok(Err(_)) | Err(_) => Err(RuntimeError::Invalid(format!(
            "the VM's process ended without a report ({status})"
        ))),
    }
}

/// Reads the child's report until it closes its end, relaying the signals
/// processes send us meanwhile.
fn read_report(mut channel: UnixStream, sigfd: &OwnedFd) -> Result<Vec<u8>, ()> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [channel.as_raw_fd(), sigfd.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(());
        }
        if fds[1].revents != 0 {
            while let Some(info) = husk_vmm::event_loop::read_signal_info(sigfd) {
                if sent_by_a_process(&info) {
                    // The child may be gone already: its report tells.
                    let _ = channel.write_all(&[info.signo as u8]);
                }
            }
        }
        if fds[0].revents != 0 {
            match channel.read(&mut buf) {
                Ok(0) => return Ok(bytes),
                Ok(n) if bytes.len() + n <= REPORT_MAX => bytes.extend_from_slice(&buf[..n]),
                Ok(_) => return Err(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
    }
}

/// The VM's process (`husk run-vm DIR`): runs the session `husk run` left
/// in DIR and writes its outcome to the socket in `HUSK_RUN_FD`.
pub fn serve(dir: &Path) -> i32 {
    // Until the session's own signalfd exists, a signal waits: a
    // terminal's ^C is the container's, to pass on once it runs.
    if let Err(e) = husk_vmm::event_loop::block_signals(&FORWARDED) {
        eprintln!("husk: block signals: {e}");
        return 1;
    }
    let Some(mut out) = take_channel() else {
        eprintln!("husk: {SUBCOMMAND} is started by husk run ({CHANNEL_FD_ENV} is not set)");
        return 1;
    };
    let result = serve_session(dir, &out).map_err(|e| Failure {
        error: e.to_string(),
        interrupted_by: match e {
            RuntimeError::Interrupted(signal) => Some(signal),
            _ => None,
        },
    });
    let json = serde_json::to_vec(&result).unwrap_or_default();
    match out.write_all(&json) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// The socket husk run passed, made close-on-exec (virtiofsd must not
/// hold it open).
fn take_channel() -> Option<UnixStream> {
    let fd: RawFd = std::env::var(CHANNEL_FD_ENV).ok()?.parse().ok()?;
    if fd <= 2 {
        return None;
    }
    // SAFETY: fcntl(2) on an integer fd; fails harmlessly if it is not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: husk run handed us this fd; nothing else in this process
    // owns it.
    Some(unsafe { UnixStream::from_raw_fd(fd) })
}

fn serve_session(dir: &Path, channel: &UnixStream) -> Result<RunOutcome, RuntimeError> {
    let path = dir.join(CONFIG_FILE);
    let bytes =
        std::fs::read(&path).map_err(|e| RuntimeError::Io(path.display().to_string(), e))?;
    let _ = std::fs::remove_file(&path);
    let cfg: SessionConfig = serde_json::from_slice(&bytes)
        .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", path.display())))?;
    if cfg.run_dir != dir {
        return Err(RuntimeError::Invalid(format!(
            "{}: the session is for {}",
            path.display(),
            cfg.run_dir.display()
        )));
    }
    let relayed = channel
        .try_clone()
        .map_err(|e| RuntimeError::Io("husk run's socket".into(), e))?;
    Session::create(&cfg, Some(relayed))?.run_to_end()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(code: i32) -> SignalInfo {
        SignalInfo {
            signo: libc::SIGTERM,
            code,
            pid: 100,
        }
    }

    #[test]
    fn processes_signals_are_relayed_the_kernels_are_not() {
        // kill(2), tgkill(2), sigqueue(3): husk run relays them.
        for code in [libc::SI_USER, libc::SI_TKILL, libc::SI_QUEUE] {
            assert!(sent_by_a_process(&info(code)), "{code}");
        }
        // A terminal's ^C: the VM process gets its own.
        assert!(!sent_by_a_process(&info(libc::SI_KERNEL)));
    }
}
